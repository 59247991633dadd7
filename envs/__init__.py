"""Environments, Minari datasets, dataset making and normalised scores (``diffpolicy.envs``).

Grows with the offline-RL work; the package exists so that ``diffpolicy.envs`` is importable.
"""
