"""How a run computes, not what: torch.compile of the networks and bf16 autocast leave the run's
identity (config, checkpoint layout) alone; compile gives the same weights as eager."""
import json

import torch

from diffpolicy.agents import make_agent
from diffpolicy.agents.trainer import TrainConfig, compile_networks, train_offline
from diffpolicy.checkpoint import load_checkpoint


def _run(data, run_dir=None, **how):
    torch.manual_seed(0)
    agent = make_agent("diffusion_ql", data.obs_dim, data.act_dim, hidden=32, ema_start=2, ema_every=1)
    train_offline(agent, data, TrainConfig(steps=6, batch_size=16, log_every=3, **how), run_dir=run_dir,
                  progress=False, evaluate=False)
    return agent


def test_compiled_networks_train_to_the_same_weights(pendulum_data, tmp_path):
    eager = _run(pendulum_data)
    compiled = _run(pendulum_data, tmp_path / "c", compile="eager")  # dynamo traces the nets; no C++ build
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    assert hasattr(compiled.actor.net, "_compiled_call_impl") and compiled.actor.net._compiled_call_impl is not None
    saved = load_checkpoint(tmp_path / "c")["agent"]
    assert set(saved) == set(eager.state_dict())  # same keys: a compiled run's checkpoint loads anywhere
    assert "compile" not in json.dumps(json.loads((tmp_path / "c" / "config.json").read_text())["train"])


def test_bf16_autocast_trains_float32_weights_and_resumes_without_it(pendulum_data, tmp_path):
    agent = _run(pendulum_data, tmp_path / "b", bf16=True)
    assert all(p.dtype == torch.float32 for p in agent.parameters())
    losses = (tmp_path / "b" / "train.csv").read_text().splitlines()
    assert len(losses) == 3 and "nan" not in "".join(losses).lower()
    # the same run continues in float32: bf16 is not part of its identity
    torch.manual_seed(0)
    more = make_agent("diffusion_ql", pendulum_data.obs_dim, pendulum_data.act_dim, hidden=32, ema_start=2, ema_every=1)
    train_offline(more, pendulum_data, TrainConfig(steps=9, batch_size=16, log_every=3), run_dir=tmp_path / "b",
                  progress=False, evaluate=False)
    assert load_checkpoint(tmp_path / "b")["state"]["step"] == 9


def test_compile_picks_the_denoisers_and_critics():
    agent = make_agent("diffusion_ql", 3, 1, hidden=16)
    assert compile_networks(agent, "eager") == 4  # actor net, its EMA copy, critic, target critic
    assert compile_networks(make_agent("td3_bc", 3, 1), "eager") == 0  # TorchRL's own modules are left alone
