"""Environments, Minari datasets, dataset making and normalised scores (``diffpolicy.envs``).

* :mod:`~diffpolicy.envs.factory`: gymnasium ids as (vectorised) TorchRL envs with actions in
  ``[-1, 1]`` and dataset-normalised observations; :func:`evaluate` runs fixed-seed episodes.
* :mod:`~diffpolicy.envs.datasets`: :func:`make_dataset` (D4RL-style qualities from SB3
  behaviour policies), :func:`load_dataset`, :class:`OfflineData`, :func:`normalized_score`.
* :mod:`~diffpolicy.envs.behaviour`: the cached stable-baselines3 behaviour runs.
"""
from .datasets import (
    QUALITIES, DatasetCorruptError, DatasetNotFoundError, NonFiniteDataError, OfflineData, dataset_id, load_dataset, local_datasets,
    make_dataset, normalized_score,
)
from .factory import ENV_IDS, EvalResult, evaluate, make_env

__all__ = [
    "QUALITIES", "DatasetCorruptError", "DatasetNotFoundError", "NonFiniteDataError", "OfflineData", "dataset_id", "load_dataset",
    "local_datasets", "make_dataset", "normalized_score", "ENV_IDS", "EvalResult", "evaluate", "make_env",
]
