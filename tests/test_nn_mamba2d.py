"""The Mamba2D layer and its residual block: shapes, initialisation, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mamba2d import Mamba2D, Mamba2DBlock

F64_BOUND = 1e-10  # float64 end to end: only rounding differs


def _layer(seed=0, **kw) -> Mamba2D:
    torch.manual_seed(seed)
    kw.setdefault("backend", "torch")
    return Mamba2D(16, d_state=4, **kw).double()


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("conv", ["1d", "2d"])
@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (5, 9)], ids=lambda s: "{}x{}".format(*s))
def test_shapes_and_dtype(conv, directions, hw):
    H, W = hw
    m = Mamba2D(16, d_state=4, conv=conv, directions=directions)
    x = torch.randn(2, H, W, 16)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


def test_initialisation_follows_mamba():
    m = Mamba2D(32, d_state=16, dt_min=1e-3, dt_max=1e-1)
    assert m.dt_rank == math.ceil(32 / 16)
    A = -torch.exp(m.core.A_log.detach())
    expected = -torch.arange(1, 17, dtype=torch.float32).repeat(m.d_inner, 1)
    assert torch.allclose(A, expected, rtol=1e-6, atol=0)  # exp(log(k)) rounds in float32
    assert torch.equal(m.core.D.detach(), torch.ones(m.d_inner))
    dt = F.softplus(m.core.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)


def test_masked_cells_are_transparent_with_2d_conv():
    # A 4 x 5 grid alone, and the same grid at the top-left of a 6 x 8 canvas of random padding.
    m = _layer(conv="2d", directions=4)
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(1, 4, 5, 16, generator=g, dtype=torch.float64)
    canvas = torch.randn(1, 6, 8, 16, generator=g, dtype=torch.float64)
    canvas[:, :4, :5] = grid
    mask = torch.zeros(1, 6, 8, dtype=torch.bool)
    mask[:, :4, :5] = True
    alone = m(grid)
    padded = m(canvas, mask)
    assert _rel(padded[:, :4, :5], alone) < F64_BOUND
    assert torch.count_nonzero(padded[~mask]) == 0


def test_masked_rows_below_are_transparent_with_1d_conv():
    # Padding that keeps the row width leaves the raster, hence the causal 1D conv, unchanged.
    m = _layer(conv="1d", directions=4)
    g = torch.Generator().manual_seed(2)
    grid = torch.randn(1, 3, 6, 16, generator=g, dtype=torch.float64)
    canvas = torch.randn(1, 5, 6, 16, generator=g, dtype=torch.float64)
    canvas[:, :3] = grid
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    mask[:, :3] = True
    assert _rel(m(canvas, mask)[:, :3], m(grid)) < F64_BOUND


def test_batch_of_two_grid_sizes_matches_each_alone():
    m = _layer(conv="2d", directions=2)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 3, 4, 16, generator=g, dtype=torch.float64)
    b = torch.randn(1, 5, 2, 16, generator=g, dtype=torch.float64)
    x = torch.zeros(2, 5, 4, 16, dtype=torch.float64)
    mask = torch.zeros(2, 5, 4, dtype=torch.bool)
    x[0, :3, :4], mask[0, :3, :4] = a[0], True
    x[1, :5, :2], mask[1, :5, :2] = b[0], True
    y = m(x, mask)
    assert _rel(y[:1, :3, :4], m(a)) < F64_BOUND
    assert _rel(y[1:, :5, :2], m(b)) < F64_BOUND


def test_block_keeps_masked_cells_unchanged():
    torch.manual_seed(4)
    block = Mamba2DBlock(16, d_state=4, conv="2d", backend="torch")
    x = torch.randn(2, 4, 4, 16)
    mask = torch.rand(2, 4, 4) > 0.3
    y = block(x, mask)
    assert torch.equal(y[~mask], x[~mask])
    assert not torch.allclose(y[mask], x[mask])


def test_mean_merge_is_sum_over_directions():
    x = torch.randn(1, 4, 6, 16, dtype=torch.float64)
    summed = _layer(seed=5, directions=4, merge="sum")
    mean = _layer(seed=5, directions=4, merge="mean")
    # out_proj is linear with no bias, so averaging before it is the sum divided by 4.
    assert _rel(mean(x) * 4, summed(x)) < F64_BOUND


def test_directions_differ_from_one_origin():
    x = torch.randn(1, 4, 6, 16, dtype=torch.float64)
    assert _rel(_layer(seed=6, directions=2)(x), _layer(seed=6, directions=1)(x)) > 1e-3


def test_backends_agree_inside_the_layer():
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64, requires_grad=True)
    outs = []
    for backend in ("reference", "torch"):
        m = _layer(seed=7, directions=4, backend=backend)
        y = m(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        outs.append((y.detach(), gx))
    assert _rel(outs[1][0], outs[0][0]) < F64_BOUND
    assert _rel(outs[1][1], outs[0][1]) < F64_BOUND


def test_gradients_reach_every_parameter():
    m = _layer(seed=8, conv="2d", directions=2)
    x = torch.randn(2, 4, 5, 16, dtype=torch.float64)
    mask = torch.rand(2, 4, 5) > 0.2
    m(x, mask).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_batch_elements_are_independent():
    m = _layer(seed=9)
    x = torch.randn(3, 4, 4, 16, dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    assert _rel(m(x)[perm], m(x[perm])) < F64_BOUND


@pytest.mark.parametrize("kwargs,match", [
    (dict(conv="3d"), "conv"), (dict(directions=3), "directions"), (dict(merge="max"), "merge"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2D(16, **kwargs)


def test_bad_shapes():
    m = Mamba2D(16, d_state=4)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(2, 4, 4, 8))
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(2, 4, 4, 16), torch.ones(2, 4, 5, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_triton_backend_inside_the_layer():
    # On a machine without CUDA this runs the Triton kernels in Triton's interpreter (tests/conftest.py).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(10)
    ref = Mamba2D(8, d_state=2, conv="2d", directions=2, backend="torch").to(device)
    tri = Mamba2D(8, d_state=2, conv="2d", directions=2, backend="triton").to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 5, 8, device=device)
    mask = torch.ones(1, 3, 5, dtype=torch.bool, device=device)
    mask[0, 2, 3:] = False
    assert _rel(tri(x, mask), ref(x, mask)) < 5e-5  # both float32 inside the scan


def test_block_norm_choice():
    assert isinstance(Mamba2DBlock(16, d_state=4).norm, torch.nn.RMSNorm)
    assert isinstance(Mamba2DBlock(16, d_state=4, norm="layer").norm, torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="norm"):
        Mamba2DBlock(16, norm="batch")
