"""2DVMamba and its 1D cross-scan twin: shapes, strides, the twins' equal parameters, the SS2D scans
against the float64 reference backend, gradient flow, one optimiser step, timm registration,
features_only and checkpoint loading through timm, registration on a plain `import mamba2d`, and
gradient checkpointing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mamba2d
import mamba2d.vision
from mamba2d.vision import (
    BUILDERS,
    SS2D,
    VMamba2D,
    vmamba1d_tiny,
    vmamba2d_small,
    vmamba2d_tiny,
)

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
    # VMamba-T is about 30M parameters, VMamba-S about 50M and VMamba-B about 89M.
    low, high = {"tiny": (25e6, 35e6), "small": (40e6, 60e6), "base": (80e6, 95e6)}[name.rsplit("_", 1)[1]]
    assert low < n < high


def test_intermediates_have_strides_4_8_16_32():
    model = _tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=(1, -1), intermediates_only=True)
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
        features = model.forward_features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    assert [info["reduction"] for info in model.feature_info] == [4, 8, 16, 32]
    assert [info["num_chs"] for info in model.feature_info] == [16, 32, 64, 128]
    assert torch.equal(final, features) and features.shape == (2, 2, 3, 128)
    assert torch.equal(only[0], maps[1]) and torch.equal(only[1], maps[3])
    assert torch.equal(last_two[1], maps[3].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=(4,))


def test_pruning_for_features_keeps_the_maps_and_drops_the_rest():
    model = _tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers((0, 1)) == [0, 1]
        got = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    assert len(model.stages) == 2 and isinstance(model.head, torch.nn.Identity)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_classifier_reset_and_weight_decay_exclusions():
    model = _tiny()
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    skip = model.no_weight_decay()
    assert skip and all(n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias") for n in skip)
    assert sum(n.endswith("A_log") for n in skip) == sum(len(s) for s in model.stages)


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


def test_timm_registers_every_builder_with_metadata():
    timm = pytest.importorskip("timm")
    assert set(timm.list_models("vmamba*")) >= set(BUILDERS)
    model = timm.create_model("vmamba2d_tiny", num_classes=3, drop_path_rate=0.05, backend="torch")
    assert isinstance(model, VMamba2D) and model.num_classes == 3
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["first_conv"] == "stem.0"
    assert cfg["classifier"] == "head" and cfg["paper_ids"] == "arXiv:2412.00678"
    assert not cfg.get("url") and not cfg.get("hf_hub_id")  # nothing to download
    rates = [b.drop_path for stage in model.stages for b in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05)
    # timm's kwargs override the config, as with the builder itself.
    assert timm.create_model("vmamba1d_small", depths=(1, 1, 1, 1), dims=8, backend="torch").scan == "1d"
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("vmamba2d_tiny", pretrained=True)


def test_timm_features_only_gives_strides_4_to_32_on_non_square_input():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    feats = timm.create_model("vmamba2d_tiny", features_only=True, out_indices=(0, 1, 2, 3), backend="torch",
                              dims=16, depths=(1, 1, 1, 1)).eval()
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    assert feats.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        maps = feats(torch.randn(2, 3, 96, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 24, 16), (2, 32, 12, 8), (2, 64, 6, 4), (2, 128, 3, 2)]
    two = timm.create_model("vmamba1d_tiny", features_only=True, out_indices=(1, 2), backend="torch",
                            dims=16, depths=(1, 1, 1, 1))
    assert two.feature_info.reduction() == [8, 16] and len(two.model.stages) == 3  # stage 4 pruned


def test_save_and_load_round_trip_through_timm(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = dict(backend="torch", dims=16, depths=(1, 1, 2, 1))
    model = timm.create_model("vmamba2d_tiny", num_classes=4, **kw).eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        want = model(x)
        from_ckpt = timm.create_model("vmamba2d_tiny", num_classes=4, checkpoint_path=str(path), **kw).eval()
        overlay = {"file": str(path), "num_classes": 4}
        from_file = timm.create_model("vmamba2d_tiny", pretrained=True, num_classes=4,
                                      pretrained_cfg_overlay=overlay, **kw).eval()
        assert torch.equal(from_ckpt(x), want) and torch.equal(from_file(x), want)
        # Fine-tuning to another class count keeps the backbone and starts a fresh head (timm's rule).
        other = timm.create_model("vmamba2d_tiny", pretrained=True, num_classes=2,
                                  pretrained_cfg_overlay=overlay, **kw).eval()
        assert torch.equal(other.forward_features(x), model.forward_features(x))
        assert other(x).shape == (2, 2)
        # A segmentation backbone from the classifier's checkpoint: the same four maps.
        feats = timm.create_model("vmamba2d_tiny", features_only=True, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(path)}, **kw).eval()
        for got, want in zip(feats(x), model.forward_intermediates(x, intermediates_only=True), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("scan", ["2d", "1d"])
def test_ss2d_triton_path_matches_the_float64_reference(scan, monkeypatch):
    # The layer's GPU path (the Triton kernels with every direction's layout flags), run by Triton's
    # CPU interpreter when there is no GPU (conftest sets TRITON_INTERPRET=1); outputs poisoned with
    # NaN before launch, so an unwritten element fails the comparison.
    pytest.importorskip("triton")
    from mamba2d.ops import scan_triton

    monkeypatch.setattr(scan_triton, "POISON_OUTPUTS", True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    layer = SS2D(8, d_state=2, scan=scan, backend="triton").to(device)
    ref = SS2D(8, d_state=2, scan=scan, backend="reference").to(device).double()
    with torch.no_grad():
        layer.D.uniform_(0.5, 1.5)
        layer.A_log.add_(torch.rand_like(layer.A_log))
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(1, 3, 5, 8, device=device)
    xt, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    yt, yr = layer(xt), ref(xr)
    g = torch.randn_like(yr)
    yt.backward(g.float())
    yr.backward(g)
    assert (yt.double() - yr).abs().max() / yr.abs().max() < 1e-4
    assert (xt.grad.double() - xr.grad).abs().max() / xr.grad.abs().max() < 1e-4
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        err = (p.grad.double() - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)
        assert err < 1e-3, name


def test_a_plain_import_registers_with_timm_without_importing_it():
    # A fresh interpreter: `import mamba2d` must not load timm (seconds of start-up), yet timm must
    # know the models once the user imports it, in either order.
    pytest.importorskip("timm")
    src = str(Path(mamba2d.__file__).resolve().parents[1])
    code = (
        "import sys, mamba2d\n"
        "assert 'timm' not in sys.modules, 'import mamba2d imported timm'\n"
        "import timm\n"
        "m = timm.create_model('vmamba2d_tiny', dims=8, depths=(1, 1, 1, 1), num_classes=3)\n"
        "assert type(m).__name__ == 'VMamba2D', type(m)\n"
        "assert sorted(timm.list_models('vmamba*')) == sorted(mamba2d.BUILDERS_NAMES)\n"
        "assert timm.__loader__.__class__.__name__ != '_RegisteringLoader'\n"
    ).replace("mamba2d.BUILDERS_NAMES", repr(sorted(BUILDERS)))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_builder_is_exposed_by_the_package_and_vision():
    for name, builder in BUILDERS.items():
        assert getattr(mamba2d, name) is builder and name in mamba2d.__all__
        assert getattr(mamba2d.vision, name) is builder and name in mamba2d.vision.__all__
    assert {"vmamba2d_base", "vmamba1d_base"} <= set(BUILDERS)


def _saved_numel(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Elements autograd keeps for the backward pass of ``model(x)``, and the output."""
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return count[0], out


def test_grad_checkpointing_keeps_gradients_and_saves_memory():
    # Train mode with drop path, so the recomputed forward must see the same random numbers.
    torch.manual_seed(0)
    model = vmamba2d_tiny(**{**SMALL, "drop_path_rate": 0.3}).train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    saved = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        n, out = _saved_numel(model, x)
        out.square().sum().backward()
        saved.append(n)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert saved[1] < saved[0] / 2  # activations inside the blocks are recomputed, not kept
    with torch.no_grad():  # inference is untouched
        model.eval()
        torch.testing.assert_close(model(x), (model.set_grad_checkpointing(False), model(x))[1])
