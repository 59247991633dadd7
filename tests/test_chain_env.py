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


class _FlatMLP(torch.nn.Module):
    """An MLP denoiser on samples of any event shape (flattened)."""

    def __init__(self, event_shape):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.mlp = MLPDenoiser(int(torch.Size(event_shape).numel()), obs_dim=3, hidden=32, depth=2, time_dim=8)

    def forward(self, x, t, cond):
        return self.mlp(x.flatten(1), t, cond).view(x.shape)


def _setup(event_shape=(2,), schedule=None):
    torch.manual_seed(0)
    den = Denoiser(_FlatMLP(event_shape), schedule or S.DiscreteVP(100), "eps")
    ts = den.schedule.timesteps(K)
    cond = torch.randn(B, 3)
    reward = lambda x, c: -(x**2).flatten(1).sum(-1)
    env = DenoisingChainEnv(den.schedule, ts, event_shape, B, reward_fn=reward, cond_fn=lambda n: cond,
                            cond_shape=(3,))
    return den, ts, cond, env, reward


@pytest.mark.parametrize("event_shape", [(2,), (4, 3)])
def test_env_rollout_equals_fused_rollout(event_shape):
    den, ts, cond, env, reward = _setup(event_shape)
    actor = chain_actor(den, eta=1.0, min_std=0.05, conditional=True, event_dims=len(event_shape))
    torch.manual_seed(7)
    with torch.no_grad():
        td_env = env.rollout(K, actor)
    assert td_env["action_log_prob"].shape == (B, K)
    torch.manual_seed(7)
    x = env.schedule.prior_std() * torch.randn((B,) + tuple(event_shape))
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


def test_deterministic_step_on_the_env_path_raises_instead_of_nan():
    den, ts, cond, env, _ = _setup()
    with pytest.raises(ValueError, match="std 0"):
        env.rollout(K, chain_actor(den, eta=0.0, conditional=True))
    # eta > 0 but a grid whose last step lands on sigma = 0 (alpha = 1): same clear error.
    den, ts, cond, env, _ = _setup(schedule=S.DiscreteVP(100, final_alpha_one=True))
    assert float(den.schedule.alpha_sigma(torch.as_tensor(ts[-1:]))[1]) == 0.0
    with pytest.raises(ValueError, match="std 0"):
        env.rollout(K, chain_actor(den, eta=1.0, conditional=True))
    env.rollout(K, chain_actor(den, eta=1.0, min_std=0.1, conditional=True))  # a floor makes it defined
