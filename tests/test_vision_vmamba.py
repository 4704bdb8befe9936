"""2DVMamba and its 1D cross-scan twin: shapes, strides, the twins' equal parameters, the SS2D scans
against the float64 reference backend, gradient flow, one optimiser step, timm registration."""

from __future__ import annotations

import pytest
import torch

from mamba2d.vision import BUILDERS, SS2D, TIMM_REGISTERED, vmamba1d_tiny, vmamba2d_small, vmamba2d_tiny

SMALL = dict(dims=16, depths=(1, 1, 2, 1), num_classes=5, backend="torch")


def _tiny(builder=vmamba2d_tiny, **kw):
    torch.manual_seed(0)
    return builder(**{**SMALL, **kw})


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_config_builds_and_classifies_non_square_images(name):
    torch.manual_seed(0)
    model = BUILDERS[name](num_classes=7, backend="torch").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 64))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    n = sum(p.numel() for p in model.parameters())
    # VMamba-T is about 30M parameters and VMamba-S about 50M.
    assert (25e6 < n < 35e6) if name.endswith("tiny") else (40e6 < n < 60e6)


def test_intermediates_have_strides_4_8_16_32():
    model = _tiny().eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    with torch.no_grad():
        only = model.forward_intermediates(torch.randn(2, 3, 64, 96), indices=(1,))
    assert [tuple(m.shape) for m in only] == [(2, 32, 8, 12)]
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1, 1, 128)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 40, 32))


def test_the_1d_and_2d_twins_differ_only_in_the_scan():
    two, one = _tiny(vmamba2d_tiny).eval(), _tiny(vmamba1d_tiny).eval()
    s2, s1 = two.state_dict(), one.state_dict()
    assert {k: v.shape for k, v in s2.items()} == {k: v.shape for k, v in s1.items()}
    one.load_state_dict(s2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (two(x) - one(x)).abs().max() > 1e-4  # same weights, different scans


@pytest.mark.parametrize("scan", ["2d", "1d"])
def test_ss2d_torch_backend_matches_the_float64_reference(scan):
    torch.manual_seed(1)
    mixer = SS2D(12, d_state=3, ssm_ratio=2.0, scan=scan, backend="torch").double()
    with torch.no_grad():  # non-trivial D and decays, so every term of the scan matters
        mixer.D.uniform_(0.5, 1.5)
        mixer.A_log.add_(torch.rand_like(mixer.A_log))
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64, requires_grad=True)
    got = mixer(x)
    mixer.backend = "reference"
    want = mixer(x)
    assert (got - want).abs().max() / want.abs().max() < 1e-10
    g_got = torch.autograd.grad(got.square().sum(), x)[0]
    g_want = torch.autograd.grad(want.square().sum(), x)[0]
    assert (g_got - g_want).abs().max() / g_want.abs().max() < 1e-10


def test_1d_orders_round_trip_and_directions_are_distinct():
    mixer = SS2D(8, scan="1d")
    xs = torch.randn(2, 8, 5 * 7)
    for k in range(4):
        u, order = mixer._order(xs, k, 5, 7)
        assert torch.equal(mixer._unorder(u, order, 5, 7), xs)
    cols, _ = mixer._order(xs, 1, 5, 7)
    # Column-major: the second token is the first column's second row, i.e. row-major index 7.
    assert torch.equal(cols[..., 1], xs[..., 7])


@pytest.mark.parametrize("builder", [vmamba2d_tiny, vmamba1d_tiny])
def test_gradients_reach_every_parameter_and_one_step_trains(builder):
    model = _tiny(builder, drop_path_rate=0.1).train()
    # 64 x 64 so that the last stage has a 2 x 2 grid: on one cell A has no effect (zero gradient).
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "head" in n)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_small_config_uses_ssm_ratio_two():
    model = vmamba2d_small(num_classes=0, backend="torch")
    block = model.stages[0][0].mixer
    assert block.d_inner == 2 * 96 and len(model.stages[2]) == 15


def test_checkpoint_round_trip(tmp_path):
    model = _tiny().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    other = _tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), other.eval()(x))


@pytest.mark.skipif(not TIMM_REGISTERED, reason="timm is not importable here")
def test_timm_create_model():
    import timm

    model = timm.create_model("vmamba2d_tiny", num_classes=3, backend="torch")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
