"""The chain as a TorchRL environment: rollout, fused-path equality, collectors, GAE, ClipPPOLoss."""
import pytest
import torch
from tensordict.nn import TensorDictModule

from diffpolicy import schedules as S
from diffpolicy.chain import rollout, set_reward
from diffpolicy.chain_env import DenoisingChainEnv, chain_actor
from diffpolicy.denoiser import Denoiser
from diffpolicy.nets import MLPDenoiser

B, K = 6, 4


def _setup():
    torch.manual_seed(0)
    den = Denoiser(MLPDenoiser(2, obs_dim=3, hidden=32, depth=2, time_dim=8), S.DiscreteVP(100), "eps")
    ts = den.schedule.timesteps(K)
    cond = torch.randn(B, 3)
    reward = lambda x, c: -(x**2).sum(-1)
    env = DenoisingChainEnv(den.schedule, ts, (2,), B, reward_fn=reward, cond_fn=lambda n: cond, cond_shape=(3,))
    return den, ts, cond, env, reward


def test_env_rollout_equals_fused_rollout():
    den, ts, cond, env, reward = _setup()
    actor = chain_actor(den, eta=1.0, min_std=0.05, conditional=True)
    torch.manual_seed(7)
    with torch.no_grad():
        td_env = env.rollout(K, actor)
    torch.manual_seed(7)
    x = env.schedule.prior_std() * torch.randn(B, 2)
    with torch.no_grad():
        td = rollout(den, x, ts, cond, eta=1.0, min_std=0.05, min_logprob_std=0.05, reduction="sum")
    set_reward(td, reward(td["next", "x"][:, -1], cond))
    pairs = {"x": "x", "t": "t", "s": "s", "cond": "cond", "mean": "mean", "log_prob": "action_log_prob",
             ("next", "x"): ("next", "x"), ("next", "reward"): ("next", "reward"), ("next", "done"): ("next", "done")}
    for ours, theirs in pairs.items():
        torch.testing.assert_close(td[ours], td_env[theirs], rtol=1e-5, atol=1e-5, msg=str(ours))
    torch.testing.assert_close(td["std"], td_env["std"], rtol=1e-5, atol=1e-6)


def test_torchrl_collector_gae_and_clip_ppo_run_unchanged():
    from torchrl.collectors import Collector
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    den, ts, cond, env, _ = _setup()
    actor = chain_actor(den, min_std=0.05, conditional=True)
    critic = TensorDictModule(torch.nn.Sequential(torch.nn.LazyLinear(32), torch.nn.Tanh(), torch.nn.Linear(32, 1)),
                              in_keys=["x"], out_keys=["state_value"])
    critic(env.reset())
    collector = Collector(env, actor, frames_per_batch=B * K, total_frames=B * K)
    batch = next(iter(collector))
    assert batch.numel() == B * K and bool(batch["next", "done"].any())
    GAE(gamma=1.0, lmbda=0.95, value_network=critic)(batch)
    loss = ClipPPOLoss(actor, critic)
    out = loss(batch.reshape(-1))
    total = out["loss_objective"] + out["loss_critic"]
    total.backward()
    assert torch.isfinite(total) and any(p.grad is not None for p in den.parameters())
    collector.shutdown()


def test_env_errors():
    den, ts, cond, env, _ = _setup()
    with pytest.raises(ValueError, match="1-D grid"):
        DenoisingChainEnv(den.schedule, ts[:1], (2,), B)
