"""Every registered MIL model: one interface, shapes for both tasks, order (in)dependence."""

from __future__ import annotations

import pytest
import torch

from mamba2d.mil import MODELS, build_model, count_parameters
from mamba2d.train.engine import AUX_WEIGHTS

PS = 256
IN_DIM = 20


def _slide(n, seed=0):
    """n patches of a slide with a hole: coords on a 256-pixel lattice, 6 columns wide."""
    g = torch.Generator().manual_seed(seed)
    cells = [(i // 6, i % 6) for i in range(n + 1) if i != 3][:n]
    coords = torch.tensor([[c * PS, r * PS] for r, c in cells], dtype=torch.float32)
    return torch.randn(n, IN_DIM, generator=g), coords


def _build(name, task="classification", seed=0):
    torch.manual_seed(seed)
    kw = {"backend": "torch"} if "mamba" in name else {}
    n_out = 3 if task == "classification" else 4
    return build_model(name, IN_DIM, n_out, task=task, d_model=32, **kw).eval()


@pytest.mark.parametrize("task", ["classification", "survival"])
@pytest.mark.parametrize("n", [1, 6, 17])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs(name, n, task):
    feats, coords = _slide(n)
    out = _build(name, task)(feats, coords, PS, return_embedding=True)
    n_out = 3 if task == "classification" else 4
    assert out.logits.shape == (n_out,) and torch.isfinite(out.logits).all()
    assert out.attention.shape == (n,) and torch.allclose(out.attention.sum(), torch.tensor(1.0))
    assert out.embedding.shape == (32,)
    if task == "classification":
        assert torch.allclose(out.probs.sum(), torch.tensor(1.0))
    else:
        assert (out.survival[1:] <= out.survival[:-1]).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_autocast_forward_and_backward(name):
    """The trainer runs models under bf16 autocast on GPUs; CPU autocast exercises the same casts."""
    feats, coords = _slide(17, seed=5)
    m = _build(name).train()
    kwargs = {"label": 1} if name in AUX_WEIGHTS else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(feats, coords, PS, **kwargs)
        loss = torch.nn.functional.cross_entropy(out.logits.float()[None], torch.tensor([1]))
        if out.aux_loss is not None:
            loss = loss + out.aux_loss.float()
    loss.backward()
    assert torch.isfinite(loss)
    assert out.attention.dtype == torch.float32 and torch.isfinite(out.attention).all()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["abmil", "clam_sb", "dsmil", "dtfd", "meanmil", "maxmil", "2dmambamil"])
def test_order_invariant_models(name):
    feats, coords = _slide(17, seed=1)
    m = _build(name, seed=1)
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(m(feats, coords, PS).logits, m(feats[perm], coords[perm], PS).logits, atol=1e-6)


@pytest.mark.parametrize("variant", ["sr", "plain"])
def test_mambamil_depends_on_patch_order(variant):
    feats, coords = _slide(17, seed=2)
    torch.manual_seed(2)
    m = build_model("mambamil", IN_DIM, 3, d_model=32, variant=variant, backend="torch").eval()
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(4))
    diff = (m(feats, coords, PS).logits - m(feats[perm], coords[perm], PS).logits).abs().max()
    assert diff > 1e-4


def test_raster_ablation_differs_only_in_the_scan():
    feats, coords = _slide(17, seed=5)
    two_d, raster = _build("2dmambamil", seed=5), None
    torch.manual_seed(5)
    raster = build_model("2dmambamil", IN_DIM, 3, d_model=32, scan="raster", backend="torch").eval()
    raster.load_state_dict(two_d.state_dict())  # identical parameters
    diff = (two_d(feats, coords, PS).logits - raster(feats, coords, PS).logits).abs().max()
    assert diff > 1e-5


def test_mambamil_sr_adds_one_ssm_branch_per_layer():
    sr, plain = (build_model("mambamil", IN_DIM, 3, variant=v, backend="torch") for v in ("sr", "plain"))
    branch = sum(p.numel() for p in sr.layers[0].mixer.reordered_core.parameters())
    assert count_parameters(sr) == count_parameters(plain) + len(sr.layers) * branch
    with pytest.raises(ValueError, match="variant"):
        build_model("mambamil", IN_DIM, 3, variant="bi")


def test_registry_errors_and_parameter_counts():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", IN_DIM, 2)
    counts = {name: count_parameters(_build(name)) for name in MODELS}
    assert all(c > 0 for c in counts.values())
    assert counts["meanmil"] == counts["maxmil"] == IN_DIM * 32 + 32 + 32 * 3 + 3


def test_nystrom_attention_is_exact_with_one_landmark_per_token():
    # With as many landmarks as tokens the Nystrom factorisation reproduces softmax attention.
    from mamba2d.mil.transmil import NystromAttention

    torch.manual_seed(6)
    attn = NystromAttention(16, heads=2, landmarks=8, pinv_iters=30).double().eval()
    torch.nn.init.zeros_(attn.residual.weight)
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(1, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
    exact = ((q * 8**-0.5) @ k.transpose(-1, -2)).softmax(-1) @ v
    exact = attn.out(exact.transpose(1, 2).reshape(1, 8, 16))
    assert torch.allclose(attn(x), exact, atol=1e-8)


@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_instance_loss(subtyping):
    feats, coords = _slide(17, seed=7)
    torch.manual_seed(7)
    m = build_model("clam_sb", IN_DIM, 3, d_model=32, k_sample=4, subtyping=subtyping)
    out = m(feats, coords, PS, label=1)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0 and out.aux_loss > 0
    out.aux_loss.backward()
    assert m.instance_heads[1].weight.grad.abs().sum() > 0
    other = m.instance_heads[0].weight.grad
    assert (other is not None and other.abs().sum() > 0) == subtyping
    assert m(feats, coords, PS).aux_loss is None  # no label, no instance loss


def test_dtfd_tier_one_loss_and_training_split():
    feats, coords = _slide(17, seed=8)
    torch.manual_seed(8)
    m = build_model("dtfd", IN_DIM, 3, d_model=32, n_groups=4)
    out = m(feats, coords, PS, label=2)  # training mode: random pseudo-bags
    assert out.aux_loss is not None and out.aux_loss > 0
    assert torch.allclose(out.attention.sum(), torch.tensor(1.0))
    (out.aux_loss + out.logits.sum()).backward()
    assert m.head1.weight.grad.abs().sum() > 0 and m.head2.weight.grad.abs().sum() > 0


def test_s4d_kernel_convolution_matches_the_recurrence():
    # The FFT convolution with the S4D kernel equals running the discretised diagonal SSM step by step.
    from mamba2d.mil.s4mil import S4DLayer

    torch.manual_seed(9)
    layer = S4DLayer(3, d_state=4).double()
    u = torch.randn(7, 3, dtype=torch.float64)
    k = layer.kernel(7).double()
    conv = torch.stack([(k[:, : t + 1].flip(-1) * u[: t + 1].t()).sum(-1) for t in range(7)])
    dt = layer.log_dt.exp().double()[:, None]
    A = torch.complex(-layer.log_A_real.exp().double(), layer.A_imag.double())
    dA, dB = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A
    C = torch.view_as_complex(layer.C.double().contiguous())
    state = torch.zeros(3, 2, dtype=torch.complex128)
    rec = []
    for t in range(7):
        state = dA * state + dB * u[t][:, None]
        rec.append(2 * (C * state).sum(-1).real)
    assert torch.allclose(conv, torch.stack(rec), atol=1e-10)
