"""The CUDA-graph sampling path: same samples as eager sampling, the right per-step noise for
every stochastic sampler, clear errors; on CPU the same object samples eagerly (the graph
replay itself is checked where a GPU is present)."""
import pytest
import torch

from diffpolicy import Denoiser
from diffpolicy import schedules as S
from diffpolicy.graphs import GraphedSampler, noise_draws
from diffpolicy.samplers import consistency_timesteps, prior, run_sampler
from diffpolicy.toys import GaussianMixtureDenoiser
from gaussian_toy import COV, MU, N, GaussianFlowMap, moments_ok

CASES = {  # sampler -> (schedule, prediction, grid, options): each stochastic sampler, plus ddim eta 0
    "ddpm": (S.DiscreteVP(1000, "linear"), "eps", 200, {}),
    "ddim": (S.DiscreteVP(1000, "linear"), "eps", 100, {"eta": 0.5}),
    "sde": (S.VPSDE(), "v", 200, {}),
    "langevin": (S.VE(0.05, 10.0), "eps", 30, {"n_steps_each": 20, "step_lr": 0.5 * 0.05**2}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_graphed_stochastic_samplers_match_the_gaussian_moments(name):
    """Per-step noise is drawn for the graph outside it: wrong counts, or noise reused across
    steps, would break the exact Gaussian's moments."""
    sched, kind, n, opts = CASES[name]
    den = GaussianMixtureDenoiser(sched, MU, COV, prediction=kind)
    ts = sched.timesteps(n)
    gs = GraphedSampler(den, (N, 2), ts, name, **opts)
    assert gs.draws == noise_draws(name, n, **opts) > 0 and not gs.graphed
    moments_ok(gs(generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("name,sched", [("consistency", S.EDM()), ("lcm", S.DiscreteVP()), ("trigflow", S.TrigFlow())])
def test_graphed_consistency_samplers(name, sched):
    den = GaussianFlowMap(sched)
    gs = GraphedSampler(den, (N, 2), sched.timesteps(3), name)
    assert gs.draws == 3
    moments_ok(gs(generator=torch.Generator().manual_seed(4)))


def test_same_inputs_same_samples_as_eager_sampling():
    sched = S.DiscreteVP(1000)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    den = Denoiser(lambda x, t, c: net(torch.cat([x, c], -1)), sched, "eps")
    ts, cond = sched.timesteps(10), torch.randn(5, 1)
    g = torch.Generator().manual_seed(1)
    x, noise = prior(den, (5, 2), generator=g), torch.randn(10, 5, 2, generator=g)
    expected = run_sampler("ddpm", den, x, ts, cond=cond, noise=noise)
    out = GraphedSampler(den, (5, 2), ts, "ddpm", cond=cond)(cond, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, expected)
    det = GraphedSampler(den, (5, 2), ts, "euler", cond=cond)
    assert det.draws == 0
    torch.testing.assert_close(det(cond, x), run_sampler("euler", den, x, ts, cond=cond))


def test_bad_inputs_are_clear_errors():
    sched = S.DiscreteVP(1000)
    den = GaussianMixtureDenoiser(sched, MU, COV)
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        GraphedSampler(den, (4, 2), sched.timesteps(5), "nope")
    with pytest.raises(ValueError, match="no callback or noise"):
        GraphedSampler(den, (4, 2), sched.timesteps(5), "ddpm", noise=torch.zeros(5, 4, 2))
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedSampler(den, (4, 2), sched.timesteps(5), warmup=0)
    with pytest.raises(ValueError, match="batch size 3"):
        GraphedSampler(den, (4, 2), sched.timesteps(5), cond=torch.zeros(3, 1))
    gs = GraphedSampler(den, (4, 2), sched.timesteps(5))
    with pytest.raises(ValueError, match=r"x must have shape \(4, 2\)"):
        gs(x=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="built without conditioning"):
        gs(torch.zeros(4, 1))
    withc = GraphedSampler(den, (4, 2), sched.timesteps(5), cond=torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"cond must have shape \(4, 1\)"):
        withc(torch.zeros(4, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_eager_and_sees_weight_updates():
    from diffpolicy.nets.mlp import MLPDenoiser

    dev = torch.device("cuda")
    torch.manual_seed(0)
    sched = S.DiscreteVP(1000)
    net = MLPDenoiser(x_dim=3, obs_dim=11).to(dev).eval()
    den = Denoiser(net, sched, "eps")
    ts = sched.timesteps(20)
    obs = torch.randn(8, 11, device=dev)
    for name, opts in (("ddim", {}), ("ddpm", {})):
        gs = GraphedSampler(den, (8, 3), ts, name, cond=obs, **opts)
        assert gs.graphed
        for seed in (0, 1):  # the second replay takes new inputs
            gen = torch.Generator(dev).manual_seed(seed)
            x = prior(den, (8, 3), generator=gen, device=dev)
            noise = torch.randn(gs.draws, 8, 3, generator=gen, device=dev) if gs.draws else None
            with torch.no_grad():
                ref = run_sampler(name, den, x, ts, cond=obs, **({"noise": noise} if gs.draws else {}))
            out = gs(obs, generator=torch.Generator(dev).manual_seed(seed))
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        with torch.no_grad():  # an in-place weight update (an optimiser step, an EMA copy) is replayed
            for p in net.parameters():
                p.mul_(0.5)
            x = prior(den, (8, 3), generator=torch.Generator(dev).manual_seed(5), device=dev)
            gen = torch.Generator(dev).manual_seed(5)
        if name == "ddim":
            torch.testing.assert_close(gs(obs, x), run_sampler(name, den, x, ts, cond=obs).detach(),
                                       atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("case", ["clip_x0", "consistency"])
def test_cuda_graph_with_the_policies_denoisers(case):
    """What the agents use: x0 clipping on DiscreteVP (reads the schedule's table) and a
    consistency preconditioner on EDM (checks alpha): both capture and equal eager sampling."""
    from diffpolicy import ConsistencyPrecond
    from diffpolicy.nets.mlp import MLPDenoiser

    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = MLPDenoiser(x_dim=3, obs_dim=11).to(dev).eval()
    obs = torch.randn(8, 11, device=dev)
    if case == "clip_x0":
        sched = S.DiscreteVP(1000)
        den, name, ts, opts = Denoiser(net, sched, "eps"), "ddpm", sched.timesteps(10), {"clip_x0": 1.0}
    else:
        sched = S.EDM()
        den, name, opts = Denoiser(net, sched, precond=ConsistencyPrecond()), "consistency", {}
        ts = consistency_timesteps(sched, 2)
    gs = GraphedSampler(den, (8, 3), ts, name, cond=obs, **opts)
    gen = torch.Generator(dev).manual_seed(0)
    x = prior(den, (8, 3), generator=gen, device=dev)
    noise = torch.randn(gs.draws, 8, 3, generator=gen, device=dev)
    with torch.no_grad():
        ref = run_sampler(name, gs.denoiser, x, ts, cond=obs, noise=noise)
    out = gs(obs, generator=torch.Generator(dev).manual_seed(0))
    assert gs._graph is not None
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
