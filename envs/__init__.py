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


def _mujoco_warnings_to_python() -> None:
    """MuJoCo prints each warning and appends it to ``MUJOCO_LOG.TXT`` in the working directory
    (HalfCheetah-v5's deprecated ``settotalmass``: once per env made). Route them to Python's
    ``warnings`` instead (shown once, filterable), unless a handler is already set."""
    try:
        import mujoco
    except ImportError:
        return
    if mujoco.get_mju_user_warning() is None:
        import sys
        import warnings

        def warn(msg: str) -> None:  # called from MuJoCo's C code: an exception must not escape (it aborts)
            try:
                warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2)
            except Exception:  # warnings made errors (-W error): print it, as MuJoCo would
                sys.stderr.write(f"MuJoCo warning: {msg}\n")

        mujoco.set_mju_user_warning(warn)


_mujoco_warnings_to_python()

__all__ = [
    "QUALITIES", "DatasetCorruptError", "DatasetNotFoundError", "NonFiniteDataError", "OfflineData", "dataset_id", "load_dataset",
    "local_datasets", "make_dataset", "normalized_score", "ENV_IDS", "EvalResult", "evaluate", "make_env",
]
