"""One RL / fine-tuning algorithm per module (``diffpolicy.agents``).

Grows with the offline and online RL work; the package exists so that ``diffpolicy.agents``
is importable.
"""
