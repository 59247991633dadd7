"""Run directories shared by every training loop: seeds, RNG states in checkpoints, atomic saves,
and CSV + TensorBoard logs that a resumed run continues without duplicate rows."""
from __future__ import annotations

import csv
import json
import os
import pathlib
import random

import numpy as np
import torch

from .checkpoint import find_checkpoint, load_checkpoint

__all__ = ["set_seed", "rng_state", "set_rng_state", "open_run", "release_run", "with_config_defaults",
           "RunInUseError", "RunLogger", "process_group", "check_device", "check_compile_backend"]


class RunInUseError(RuntimeError):
    """Another process is training in this run directory."""


_HELD: dict[str, int] = {}  # run directories this process trains in -> the descriptor holding their lock


def _claim(path: pathlib.Path) -> bool:
    """Lock run directory ``path`` for this process (``flock`` on the directory itself, so nothing is
    written into it); True when this call took the lock, False when this process already held it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): runs are not guarded
        return False
    key = str(path.resolve())
    if key in _HELD:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunInUseError(f"{path} is in use by another process, which is training this run: wait for it to "
                            "finish, or use another run directory") from None
    _HELD[key] = fd
    return True


def release_run(run_dir) -> None:
    """Let other processes train in ``run_dir`` again (the training loops call it when they end; the
    lock also goes when the process does)."""
    if run_dir is not None:
        fd = _HELD.pop(str(pathlib.Path(run_dir).resolve()), None)
        if fd is not None:
            os.close(fd)


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_device(spec: str) -> torch.device:
    """``torch.device(spec)`` when this torch can use it, else a ValueError that says what can be
    used (checked before a run writes anything)."""
    from .config import ConfigError

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={spec!r} is not a device ('cpu', 'cuda', 'cuda:1', 'mps'): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fix = ("check the driver and CUDA_VISIBLE_DEVICES" if torch.backends.cuda.is_built()
                   else "or install a CUDA build of torch")
            raise ConfigError(f"device={spec!r}, but this torch ({torch.__version__}) sees no CUDA GPU; use device=cpu, "
                              f"{fix}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={spec!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={spec!r}, but MPS is not available here; use device=cpu")
    return device


def check_compile_backend(backend: str) -> None:
    """A ValueError naming the valid ones when ``backend`` (``""``: off) is not a torch.compile backend."""
    if backend:
        from torch._dynamo import list_backends

        valid = list_backends(exclude_tags=())
        if backend not in valid:
            from .config import ConfigError

            raise ConfigError(f"compile={backend!r} is not a torch.compile backend; valid: {', '.join(valid)} (some, "
                              "such as tvm or openxla, need their own packages), or compile= for none")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states (torch CPU and, once initialised, every CUDA device; numpy; Python) as tensors and
    plain values, so they fit a safetensors checkpoint."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def with_config_defaults(old: dict, config, keep: dict | None = None, legacy: dict | None = None) -> dict:
    """An older ``config.json`` completed for comparison: ``agent_config`` settings added since the run
    started take ``config``'s dataclass defaults, or ``legacy``'s values where a later default would
    change the run's network (the agent's ``legacy_settings``), and ``keep`` (settings that may change
    on a resume) the current values. ``open_run``'s ``fill_old`` for the training loops."""
    import dataclasses

    defaults = json.loads(json.dumps(dataclasses.asdict(type(config)()), default=str))
    return {**old, "agent_config": {**defaults, **(legacy or {}), **old.get("agent_config", {}), **(keep or {})}}


def open_run(run_dir, config: dict, budget: dict, *, fill_old=None, load=None) -> dict | None:
    """Check and record a run directory; returns its checkpoint (or None for a new run).

    ``config`` (JSON-able) must equal the ``config.json`` of an existing checkpointed run, except
    for the ``budget`` keys, which are recorded but may change between calls (e.g. ``{"steps": n}``:
    a longer run continues the same one; where the run came from, sizes read back by ``load_agent``);
    ``fill_old(old)`` may first complete an older file (settings added since, at their defaults);
    ``load(saved)`` restores the caller's objects before ``config.json`` is rewritten, so a
    checkpoint that does not fit leaves the run directory exactly as it was.
    Any difference raises a ValueError naming the differing keys, before anything is written.
    The checkpoint loads through :func:`~diffpolicy.checkpoint.load_checkpoint` (safetensors +
    JSON: it never runs code from the file; a corrupt one is a ``CheckpointError``).
    The directory stays locked to this process until :func:`release_run` (or the process ends): a
    second process opening it raises :class:`RunInUseError` instead of writing over the first's
    checkpoints.
    """
    if run_dir is None:
        return None
    path = pathlib.Path(run_dir)
    claimed = _claim(path) if path.is_dir() else False
    try:
        saved = _check_and_load(path, config, budget, fill_old, load)
    except BaseException:
        if claimed:
            release_run(path)
        raise
    path.mkdir(parents=True, exist_ok=True)
    _claim(path)
    (path / "config.json").write_text(json.dumps({**config, **budget}, indent=1))
    return saved


def _check_and_load(path: pathlib.Path, config: dict, budget: dict, fill_old, load):
    ckpt = find_checkpoint(path) if path.is_dir() else None
    saved = None
    if ckpt is not None:
        if (path / "config.json").exists():
            old = json.loads((path / "config.json").read_text())
            old = fill_old(old) if fill_old is not None else old
            old = {k: v for k, v in old.items() if k not in budget}
            if old != config:
                diff = sorted(k for k in set(config) | set(old) if old.get(k) != config.get(k))
                raise ValueError(f"{path} holds a run with a different configuration ({', '.join(diff)} differ); "
                                 "resume it with the same settings or use a new run_dir")
        saved = load_checkpoint(ckpt)
        if load is not None:
            load(saved)
    return saved


class RunLogger:
    """CSV files (``train.csv``, ``eval.csv``) and TensorBoard events in the run directory."""

    def __init__(self, run_dir: pathlib.Path | None, resume_step: int = 0):
        self.run_dir, self.tb = run_dir, None
        self._headers: dict[str, list[str]] = {}  # each CSV's columns, once read or written
        if run_dir is None:
            return
        for kind in ("train", "eval"):  # rows written after the checkpoint we resume from are redone
            path = run_dir / f"{kind}.csv"
            if path.exists():
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f))
                keep = [r for r in rows if int(float(r["step"])) <= resume_step]
                if len(keep) < len(rows):
                    with path.open("w", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=list(rows[0]))
                        w.writeheader()
                        w.writerows(keep)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self.tb = None

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        """Append a row to ``<kind>.csv``. Columns follow the file's header: a value the header lacks
        (a metric added since the run started) widens the file, earlier rows left blank there."""
        if self.run_dir is None:
            return
        path = self.run_dir / f"{kind}.csv"
        row = {"step": step, **values}
        header = self._headers.get(kind)
        if header is None and path.exists():
            with path.open(newline="") as f:
                header = next(csv.reader(f), None)
        if header is not None and not set(row) <= set(header):
            with path.open(newline="") as f:
                rows = [{k: v for k, v in r.items() if k is not None} for r in csv.DictReader(f)]  # no stray cells
            header = header + [k for k in row if k not in header]
            tmp = path.with_suffix(".csv.tmp")
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, path)
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header or list(row))
            if header is None:
                w.writeheader()
            w.writerow(row)
        self._headers[kind] = list(w.fieldnames)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
