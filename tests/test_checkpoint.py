"""Safetensors checkpoints: exact round trips of everything a run saves, atomic replacement,
older ``.pt`` checkpoints, and clear errors (never a crash) for damaged files."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffpolicy.checkpoint import (
    CHECKPOINT, CheckpointError, find_checkpoint, load_checkpoint, load_state_checked, resolve_checkpoint,
    save_checkpoint,
)
from diffpolicy.ema import EMA
from diffpolicy.runlog import rng_state, set_rng_state


def _assert_same(a, b):
    # state dicts are OrderedDicts and come back as dicts (same keys, same order)
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def _training_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    ema = EMA(net, 0.9, warmup=True)
    ema.update(net)
    w = torch.randn(4, 6)
    return {"model": net.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "rng": rng_state(),
            "state": {"step": 7, "history": [{"step": 5, "loss": 0.25, "score": float("nan")}], "done": False,
                      "best": None, "name": "run"},
            "tied": (w, w), "view": w.t()[1:3], "bf16": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0, 2),
            "int_keys": {0: "a", 3: [1, 2]}, "marker_key": {"__tensor__": "not a tensor"}, "big": 2 ** 70}


def test_round_trip_is_exact_for_everything_a_run_saves(tmp_path):
    obj = _training_state()
    path = save_checkpoint(obj, tmp_path / CHECKPOINT)
    back = load_checkpoint(path)
    _assert_same(back, obj)
    # The optimiser state (int keys) loads into a fresh optimiser; the RNG state restores the stream.
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    net.load_state_dict(back["model"])
    torch.optim.Adam(net.parameters()).load_state_dict(back["opt"])
    set_rng_state(back["rng"])
    a = torch.rand(3)
    set_rng_state(obj["rng"])
    assert torch.equal(a, torch.rand(3))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"x": torch.ones(2)}, tmp_path / CHECKPOINT)
    with pytest.raises(TypeError, match="got object"):
        save_checkpoint({"x": torch.zeros(2), "bad": object()}, path)
    # the write fails after the temporary file exists (a full disk, a kill before the rename)
    import diffpolicy.checkpoint as C

    def broken_replace(src, dst):
        raise OSError("No space left on device")

    monkeypatch.setattr(C.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no temporary file left behind


def test_older_pt_checkpoints_load_and_the_next_save_replaces_them(tmp_path):
    torch.save({"agent": {"w": torch.arange(3)}, "state": {"step": 4}}, tmp_path / "checkpoint.pt")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
    assert load_checkpoint(tmp_path)["state"]["step"] == 4
    save_checkpoint({"state": {"step": 5}}, tmp_path / CHECKPOINT)
    assert find_checkpoint(tmp_path) == tmp_path / CHECKPOINT and not (tmp_path / "checkpoint.pt").exists()
    # a path recorded as .../checkpoint.pt still means the run's checkpoint
    assert resolve_checkpoint(tmp_path / "checkpoint.pt") == tmp_path / CHECKPOINT
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "other.pt")


def test_a_safetensors_file_of_another_program_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / CHECKPOINT))
    with pytest.raises(CheckpointError, match="not a diffpolicy checkpoint"):
        load_checkpoint(tmp_path)


def test_a_state_of_another_shape_names_the_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="(?s)does not fit this critic.*size mismatch"):
        load_state_checked(torch.nn.Linear(3, 2), torch.nn.Linear(3, 4).state_dict(), "critic", tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1, exclude_max=True), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                       st.integers(1, 255)), max_size=4))
def test_damaged_files_give_checkpoint_errors_only(tmp_path, cut, flips):
    """Truncated files and flipped bytes: either the file still decodes (a flip inside tensor
    data changes values; safetensors has no checksum) or a CheckpointError says what to do."""
    path = tmp_path / CHECKPOINT
    save_checkpoint(_training_state(), path)
    raw = bytearray(path.read_bytes())
    for where, xor in flips:
        raw[int(where * len(raw))] ^= xor
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw[: max(1, int(len(raw) * (1 - cut))) if cut > 0.5 else len(raw)]))
    try:
        load_checkpoint(damaged)
    except CheckpointError as e:
        assert "restore it from a copy" in str(e)
    os.remove(damaged)
