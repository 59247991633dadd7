import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same cases on every run ("ci", the default), so a red CI is always a
# real, reproducible failure; HYPOTHESIS_PROFILE=explore draws fresh random cases (run it locally
# to look for new failures, then keep each as an @example).
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def offline_home(tmp_path_factory):
    """Private Minari and diffpolicy cache directories for the whole test session."""
    root = tmp_path_factory.mktemp("offline")
    old = {k: os.environ.get(k) for k in ("MINARI_DATASETS_PATH", "DIFFPOLICY_HOME")}
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    os.environ["DIFFPOLICY_HOME"] = str(root / "home")
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def pendulum_data(offline_home):
    """A tiny Pendulum-v1 'medium' dataset (2000 transitions) made through the real pipeline.

    The behaviour run is only 1000 SB3 steps (all in SAC's random warm-up), so it is fast; the
    reference scores come from 2 episodes.
    """
    from diffpolicy.envs.datasets import OfflineData, make_dataset

    ds = make_dataset("Pendulum-v1", "medium", n_transitions=2000, behaviour_steps=1000, behaviour_eval_every=500,
                      ref_episodes=2, progress=False)
    return OfflineData.from_minari(ds)


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("images")``: the script ``benchmarks/<name>.py`` as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_bench",
                                                      Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod
    return load
