"""Checkpoints as safetensors: loading never runs code from the file, writes are atomic.

A checkpoint is any nest of dicts, lists and tuples whose leaves are tensors, numbers, strings,
booleans or ``None`` (model / optimiser / EMA state dicts, RNG states, progress counters,
evaluation histories). :func:`save_checkpoint` stores the tensors in one ``.safetensors`` file
and the nest's structure as JSON in that file's header metadata, so a whole checkpoint is one
file that is replaced atomically (write to ``.tmp``, flush to disk, ``os.replace``): a crash
mid-write leaves the previous checkpoint intact. :func:`load_checkpoint` parses only the
safetensors format and JSON, so a crafted file cannot execute anything; a truncated or corrupt
file is a :class:`CheckpointError` that says what to do.

Older run directories hold ``checkpoint.pt`` (``torch.save``); :func:`find_checkpoint` still
finds them and they load with ``torch.load(weights_only=True)``, which also refuses code. The
next save of such a run writes ``checkpoint.safetensors`` and removes the old file.
"""
from __future__ import annotations

import json
import numbers
import os
import pathlib

import torch

__all__ = ["CHECKPOINT", "CheckpointError", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "load_state_checked",
           "resolve_checkpoint"]

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
_FORMAT = "diffpolicy-checkpoint-1"
_MARKERS = ("__tensor__", "__tuple__", "__dict__")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file and the way out."""


def _encode(obj, tensors: dict):
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        # own contiguous CPU copy: safetensors refuses tensors that share storage (tied weights, views)
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a checkpoint holds tensors, numbers, strings, None and dicts/lists/tuples of them; "
                    f"got {type(obj).__name__}")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__dict__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key):
    if isinstance(key, (list, dict, torch.Tensor)):
        raise CheckpointError(f"a dict key in the checkpoint is a {type(key).__name__}")
    return key


def save_checkpoint(obj, path) -> pathlib.Path:
    """Write ``obj`` to ``path`` (a ``.safetensors`` file) atomically; returns the path.

    A ``checkpoint.pt`` of an older version beside it is removed once the new file is in place.
    """
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    tensors: dict = {}
    structure = json.dumps(_encode(obj, tensors))
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": _FORMAT, "structure": structure})
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave a renamed empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # a failed write (full disk, ...): the previous checkpoint stays as it was
            tmp.unlink()
    legacy = path.with_name(LEGACY_CHECKPOINT)
    if path.name == CHECKPOINT and legacy.exists():
        legacy.unlink()
    return path


def find_checkpoint(run_dir) -> pathlib.Path | None:
    """The checkpoint file of a run directory (``checkpoint.safetensors``, or an older
    ``checkpoint.pt``), or None when the run has none yet."""
    run = pathlib.Path(run_dir)
    for name in (CHECKPOINT, LEGACY_CHECKPOINT):
        if (run / name).is_file():
            return run / name
    return None


def resolve_checkpoint(path) -> pathlib.Path:
    """The checkpoint file meant by ``path``: a run directory's checkpoint, the file itself, or, for
    a ``checkpoint.pt`` / ``checkpoint.safetensors`` path that does not exist, the checkpoint that
    the same run directory holds now (paths recorded before the format changed keep working)."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no checkpoint ({CHECKPOINT}): has the run saved one yet?")
        return found
    if path.is_file():
        return path
    if path.name in (CHECKPOINT, LEGACY_CHECKPOINT) and path.parent.is_dir():
        found = find_checkpoint(path.parent)
        if found is not None:
            return found
    raise FileNotFoundError(f"no checkpoint at {path} (give a run directory or its {CHECKPOINT})")


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint` (or a run directory's checkpoint).

    Tensors load on the CPU. Nothing in the file is executed: the format is safetensors plus
    JSON (an older ``.pt`` checkpoint is read with ``torch.load(weights_only=True)``).
    """
    path = resolve_checkpoint(path)
    advice = ("it may be truncated or corrupt (a copy that did not finish, a full disk, an edited file); "
              "restore it from a copy, or remove it to start the run afresh (its logs and config stay)")
    if path.suffix == ".pt":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, refused globals, zip errors
            raise CheckpointError(f"cannot read the checkpoint {path}: {type(e).__name__}: {e}; {advice}") from None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, header errors, short reads
        raise CheckpointError(f"cannot read the checkpoint {path}: {type(e).__name__}: {e}; {advice}") from None
    if meta.get("format") != _FORMAT or "structure" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a diffpolicy checkpoint "
                              f"(format {meta.get('format')!r}); {advice}")
    try:
        return _decode(json.loads(meta["structure"]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the structure stored in {path} is damaged ({e}); {advice}") from None


def load_state_checked(module, state: dict, what: str, where) -> None:
    """``module.load_state_dict(state)``, with a mismatch (a checkpoint of another size or model)
    reported as a :class:`CheckpointError` that names the checkpoint and the differing entries."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint {where} does not fit this {what}: {str(e).rstrip('.')}. It was written by a run "
                              f"with other settings (or other code); use that run's settings or a new run "
                              f"directory") from None
