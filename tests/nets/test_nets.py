"""Tests for diffpolicy.nets: shapes, time/cond dependence, CFG dropout, input
validation, a tiny overfitting check and gradient flow.  All nets are tiny."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffpolicy.nets import MLPDenoiser, SinusoidalEmbedding, TemporalUnet1D, TimeEmbedding, Unet2D

OBS = 5
ACT = 2
HORIZON = 8
IMG = 8
N_CLASSES = 10


def make_mlp(cond: bool, **kw):
    return MLPDenoiser(x_dim=3, obs_dim=OBS if cond else 0, hidden=32, **kw)


def make_unet1d(cond: bool):
    return TemporalUnet1D(ACT, obs_dim=OBS if cond else 0, down_dims=(8, 16, 32), n_groups=4, time_dim=16)


def make_unet2d(cond: bool, **kw):
    kw.setdefault("num_classes", N_CLASSES if cond else 0)
    return Unet2D(in_channels=1, base_channels=8, channel_mults=(1, 2), groups=4, **kw)


def sample_x(kind: str, batch: int) -> torch.Tensor:
    shape = {"mlp": (batch, 3), "unet1d": (batch, HORIZON, ACT), "unet2d": (batch, 1, IMG, IMG)}[kind]
    return torch.randn(shape)


def sample_cond(kind: str, batch: int) -> torch.Tensor:
    if kind == "unet2d":
        return torch.randint(0, N_CLASSES, (batch,))
    return torch.randn(batch, OBS)


MAKERS = {"mlp": make_mlp, "unet1d": make_unet1d, "unet2d": make_unet2d}
KINDS = list(MAKERS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_cond", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("t_form", ["vector", "0d", "float"])
def test_output_shape_matches_input(kind, use_cond, batch, t_form):
    net = MAKERS[kind](use_cond)
    x = sample_x(kind, batch)
    t = {"vector": torch.full((batch,), 7.0), "0d": torch.tensor(7.0), "float": 7.0}[t_form]
    cond = sample_cond(kind, batch) if use_cond else None
    out = net(x, t, cond)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_time_forms_broadcast_identically(kind):
    net = MAKERS[kind](True).eval()
    x, cond = sample_x(kind, 3), sample_cond(kind, 3)
    ref = net(x, torch.full((3,), 12.5), cond)
    for t in (12.5, torch.tensor(12.5), torch.tensor([12.5]), torch.full((3, 1), 12.5)):
        torch.testing.assert_close(net(x, t, cond), ref)


def test_integer_time_index_is_accepted():
    net = make_mlp(True)
    x, cond = sample_x("mlp", 4), sample_cond("mlp", 4)
    idx = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(net(x, idx, cond), net(x, idx.float(), cond))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_are_independent(kind):
    net = MAKERS[kind](True).eval()
    x, cond, t = sample_x(kind, 3), sample_cond(kind, 3), torch.tensor([1.0, 50.0, 900.0])
    full = net(x, t, cond)
    for i in range(3):
        torch.testing.assert_close(net(x[i : i + 1], t[i : i + 1], cond[i : i + 1]), full[i : i + 1],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("activation", ["mish", "relu", "silu", "gelu", "tanh", "elu"])
def test_mlp_variants_shapes(residual, layer_norm, activation):
    net = make_mlp(True, residual=residual, layer_norm=layer_norm, activation=activation, depth=2)
    x = sample_x("mlp", 2)
    assert net(x, torch.tensor([1.0, 2.0]), sample_cond("mlp", 2)).shape == x.shape
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in net.modules()) == 2 * residual + 2 * layer_norm


def test_unet1d_default_config_and_horizons():
    net = TemporalUnet1D(action_dim=ACT, obs_dim=OBS, down_dims=(8, 16, 32), n_groups=4, time_dim=16)
    for horizon in (4, 8, 16):
        x = torch.randn(2, horizon, ACT)
        assert net(x, torch.tensor([0.0, 1.0]), torch.randn(2, OBS)).shape == x.shape


def test_unet2d_with_attention_and_16px_images():
    net = Unet2D(in_channels=1, base_channels=8, channel_mults=(1, 2, 2), groups=4, num_res_blocks=2,
                 num_classes=N_CLASSES, attention=True)
    x = torch.randn(2, 1, 16, 16)
    assert net(x, torch.tensor([3.0, 4.0]), torch.tensor([1, 2])).shape == x.shape
    assert net.null_class == N_CLASSES


# --------------------------------------------------------------------------- embeddings


def closed_form_embedding(t: np.ndarray, dim: int, max_period: float = 10000.0) -> np.ndarray:
    half = dim // 2
    freqs = np.array([max_period ** (-i / (half - 1)) for i in range(half)])
    args = t[:, None].astype(np.float64) * freqs[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


@pytest.mark.parametrize("dim", [4, 16, 64])
@pytest.mark.parametrize("max_period", [10000.0, 100.0])
def test_sinusoidal_matches_closed_form(dim, max_period):
    t = np.array([0.0, 1.0, 2.5, 37.0, 999.0, -1.3, 0.125])
    emb = SinusoidalEmbedding(dim, max_period=max_period)(torch.tensor(t, dtype=torch.float32))
    assert emb.shape == (len(t), dim)
    np.testing.assert_allclose(emb.numpy(), closed_form_embedding(t, dim, max_period), atol=3e-4, rtol=0)
    # first coordinate has frequency 1: sin(t); first cosine coordinate: cos(t)
    np.testing.assert_allclose(emb[:, 0].numpy(), np.sin(t), atol=3e-4)
    np.testing.assert_allclose(emb[:, dim // 2].numpy(), np.cos(t), atol=3e-4)


@settings(max_examples=50, deadline=None)
@given(t=st.floats(-10.0, 1000.0, allow_nan=False), half=st.integers(2, 32))
def test_sinusoidal_closed_form_property(t, half):
    emb = SinusoidalEmbedding(2 * half)(torch.tensor([t], dtype=torch.float32))
    t32 = np.array([np.float32(t)])
    np.testing.assert_allclose(emb.numpy(), closed_form_embedding(t32, 2 * half), atol=3e-4, rtol=0)


def test_sinusoidal_distinct_times_give_distinct_embeddings():
    emb = SinusoidalEmbedding(16)(torch.arange(1000, dtype=torch.float32))
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))
    assert dist.min() > 1e-2
    cont = SinusoidalEmbedding(16)(torch.linspace(-2.0, 2.0, 101))  # continuous ln(sigma)/4 style
    cdist = torch.cdist(cont, cont)
    cdist.fill_diagonal_(float("inf"))
    assert cdist.min() > 1e-3


def test_sinusoidal_rejects_odd_dim():
    with pytest.raises(ValueError, match="dim"):
        SinusoidalEmbedding(7)


def test_time_embedding_shape_and_dependence():
    emb = TimeEmbedding(16, 32)
    out = emb(torch.tensor([0.0, 1.0, 500.0]))
    assert out.shape == (3, 16)
    assert not torch.allclose(out[0], out[1])
    assert TimeEmbedding(8, 32, out_dim=24)(torch.zeros(2)).shape == (2, 24)


# --------------------------------------------------------------------------- dependence


@pytest.mark.parametrize("kind", KINDS)
def test_output_depends_on_t(kind):
    net = MAKERS[kind](True).eval()
    x, cond = sample_x(kind, 2), sample_cond(kind, 2)
    a, b = net(x, torch.tensor([3.0, 3.0]), cond), net(x, torch.tensor([400.0, 400.0]), cond)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_output_depends_on_cond(kind):
    net = MAKERS[kind](True).eval()
    x, t = sample_x(kind, 2), torch.tensor([5.0, 5.0])
    cond_a = sample_cond(kind, 2)
    cond_b = (cond_a + 1) % N_CLASSES if kind == "unet2d" else cond_a + 1.0
    assert (net(x, t, cond_a) - net(x, t, cond_b)).abs().max() > 1e-4
    if kind == "unet2d":  # a class label differs from the null class
        assert (net(x, t, cond_a) - net(x, t, None)).abs().max() > 1e-4


# --------------------------------------------------------------------------- CFG dropout


def test_cfg_dropout_one_in_train_mode_equals_unconditional():
    net = make_unet2d(True, cfg_dropout=1.0).train()
    x, t, labels = sample_x("unet2d", 4), torch.full((4,), 10.0), torch.tensor([0, 3, 7, 9])
    torch.manual_seed(1)
    dropped = net(x, t, labels)
    torch.manual_seed(1)
    uncond = net(x, t, None)
    torch.testing.assert_close(dropped, uncond)
    null = torch.full((4,), net.null_class)
    torch.testing.assert_close(net.eval()(x, t, null), uncond)


def test_cfg_dropout_never_applied_in_eval_mode():
    net = make_unet2d(True, cfg_dropout=1.0).eval()
    x, t, labels = sample_x("unet2d", 4), torch.full((4,), 10.0), torch.tensor([0, 3, 7, 9])
    cond_out, uncond = net(x, t, labels), net(x, t, None)
    per_row = (cond_out - uncond).flatten(1).abs().amax(dim=1)
    assert (per_row > 1e-5).all()
    torch.testing.assert_close(net(x, t, labels), cond_out)


def test_cfg_dropout_partial_drops_some_rows():
    net = make_unet2d(True, cfg_dropout=0.5)
    x, t = sample_x("unet2d", 64), torch.full((64,), 10.0)
    labels = torch.randint(0, N_CLASSES, (64,))
    net.eval()
    cond_out, uncond = net(x, t, labels), net(x, t, None)
    net.train()
    out = net(x, t, labels)
    dropped = torch.isclose(out, uncond, atol=1e-6).flatten(1).all(dim=1)
    kept = torch.isclose(out, cond_out, atol=1e-6).flatten(1).all(dim=1)
    assert (dropped | kept).all()
    assert 10 < int(dropped.sum()) < 54


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("net_factory, x, bad_cond", [
    (lambda: make_mlp(True), torch.randn(2, 3), torch.randn(2, OBS + 1)),
    (lambda: make_mlp(True), torch.randn(2, 3), None),
    (lambda: make_mlp(False), torch.randn(2, 3), torch.randn(2, OBS)),
    (lambda: make_unet1d(True), torch.randn(2, HORIZON, ACT), torch.randn(2, OBS - 1)),
    (lambda: make_unet1d(True), torch.randn(2, HORIZON, ACT), None),
    (lambda: make_unet2d(True), torch.randn(2, 1, IMG, IMG), torch.randn(2)),
    (lambda: make_unet2d(False), torch.randn(2, 1, IMG, IMG), torch.tensor([1, 2])),
])
def test_bad_cond_raises_naming_cond(net_factory, x, bad_cond):
    with pytest.raises(ValueError, match=r"\bcond\b"):
        net_factory()(x, torch.zeros(2), bad_cond)


def test_wrong_cond_size_message_gives_expected_size():
    with pytest.raises(ValueError, match=rf"cond.*{OBS}"):
        make_mlp(True)(torch.randn(2, 3), torch.zeros(2), torch.randn(2, 7))


@pytest.mark.parametrize("horizon", [2, 6, 10])
def test_unet1d_bad_horizon_raises_naming_x(horizon):
    net = make_unet1d(True)  # 3 levels -> multiple of 4
    with pytest.raises(ValueError, match=r"\bx\b.*multiple of 4"):
        net(torch.randn(2, horizon, ACT), torch.zeros(2), torch.randn(2, OBS))


@pytest.mark.parametrize("size", [(7, 8), (8, 5), (6, 6)])
def test_unet2d_bad_spatial_size_raises_naming_x(size):
    net = Unet2D(base_channels=8, channel_mults=(1, 2, 2), groups=4)  # divisible by 4
    with pytest.raises(ValueError, match=r"\bx\b.*divisible by 4"):
        net(torch.randn(1, 1, *size), torch.zeros(1))


def test_wrong_x_and_t_shapes_raise():
    net = make_mlp(True)
    with pytest.raises(ValueError, match=r"\bx\b"):
        net(torch.randn(2, 4), torch.zeros(2), torch.randn(2, OBS))
    with pytest.raises(ValueError, match=r"\bt\b"):
        net(torch.randn(2, 3), torch.zeros(3), torch.randn(2, OBS))


def test_unknown_activation_lists_valid_ones():
    with pytest.raises(ValueError, match="mish.*relu|relu.*mish"):
        MLPDenoiser(3, activation="swishy")


# --------------------------------------------------------------------------- learning / gradients


def test_residual_blocks_widen_and_drop_out_like_idqls_mlpresnet():
    """IDQL's MLPResNetBlock: dropout -> LayerNorm -> Linear(w, 4w) -> act -> Linear(4w, w), plus the input."""
    net = make_mlp(True, residual=True, expansion=4, dropout=0.5, depth=2)
    block = net.body[1]
    assert [type(m).__name__ for m in block.net] == ["Dropout", "LayerNorm", "Linear", "Mish", "Linear"]
    assert (block.net[2].in_features, block.net[2].out_features, block.net[4].out_features) == (32, 128, 32)
    h = torch.randn(5, 32)
    block.eval()
    torch.testing.assert_close(block(h), h + block.net[4](block.net[3](block.net[2](block.net[1](h)))))
    x, t, c = sample_x("mlp", 8), torch.full((8,), 3.0), sample_cond("mlp", 8)
    net.train()
    assert not torch.allclose(net(x, t, c), net(x, t, c))  # dropout draws anew in training mode
    net.eval()
    torch.testing.assert_close(net(x, t, c), net(x, t, c))
    # without dropout the blocks keep their parameter names: checkpoints from before still load
    assert "body.1.net.0.weight" in make_mlp(True, residual=True).state_dict()  # the LayerNorm
    with pytest.raises(ValueError, match="set residual=True"):
        make_mlp(True, expansion=4)
    with pytest.raises(ValueError, match="dropout in"):
        make_mlp(True, residual=True, dropout=1.0)


def test_mlp_overfits_fixed_batch():
    net = MLPDenoiser(x_dim=3, obs_dim=OBS)
    x, cond = torch.randn(64, 3), torch.randn(64, OBS)
    t = torch.randint(0, 1000, (64,)).float()
    target = torch.randn(64, 3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = None
    for _ in range(200):
        loss = ((net(x, t, cond) - target) ** 2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = ((net(x, t, cond) - target) ** 2).mean().item()
    assert final < first / 10, (first, final)


GRAD_NETS = {
    "mlp": lambda: make_mlp(True),
    "mlp_residual_ln": lambda: make_mlp(True, residual=True, layer_norm=True),
    "unet1d": lambda: make_unet1d(True),
    "unet2d": lambda: make_unet2d(True),
    "unet2d_attention": lambda: make_unet2d(True, attention=True, cfg_dropout=0.3),
}


@pytest.mark.parametrize("name", list(GRAD_NETS))
def test_gradients_reach_every_parameter(name):
    net = GRAD_NETS[name]().train()
    kind = name.split("_")[0]
    x, cond = sample_x(kind, 4), sample_cond(kind, 4)
    net(x, torch.tensor([1.0, 10.0, 100.0, 999.0]), cond).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    if name == "unet2d_attention":
        assert any(type(m).__name__ == "SelfAttention2D" for m in net.modules())


def test_unet2d_guidance_embedding_uses_w_and_demands_the_pair():
    net = Unet2D(1, 16, (1, 2), 1, num_classes=N_CLASSES, guidance_embed=True).eval()
    x, t, labels = sample_x("unet2d", 4), torch.full((4,), 10.0), torch.tensor([0, 3, 7, 9])
    a, b = net(x, t, (labels, torch.full((4,), 1.0))), net(x, t, (labels, torch.full((4,), 4.0)))
    assert (a - b).flatten(1).abs().amax(1).min() > 1e-5  # every row sees its own w
    mixed = net(x, t, (labels, torch.tensor([1.0, 4.0, 1.0, 4.0])))
    torch.testing.assert_close(mixed[[0, 2]], a[[0, 2]])
    torch.testing.assert_close(mixed[[1, 3]], b[[1, 3]])
    with pytest.raises(ValueError, match=r"cond must be \(labels or None, w \[B\]\)"):
        net(x, t, labels)
