"""Shared helpers for the selective_scan_2d tests: random inputs, one run with gradients, errors.

Imported as a plain module (``import scan_cases``): pytest puts tests/ on sys.path.
"""

from __future__ import annotations

import torch

from mamba2d import ScanLayout, selective_scan_2d

# Error bounds: relative error ||got - ref|| / ||ref|| against the float64 reference evaluated on the
# same inputs (already rounded to their dtype) upcast to float64.
BOUND_F64 = 1e-10  # float64 inputs: only float64 round-off
BOUND_F32 = 5e-5  # float32 inputs: the bound the issue states
BOUND_F16 = 2e-3  # float16 inputs (GPU only): 10-bit mantissa of the outputs and gradients
BOUND_BF16 = 1e-2  # bfloat16 inputs (GPU only): 7-bit mantissa of the outputs and gradients

BOUNDS = {
    torch.float64: BOUND_F64,
    torch.float32: BOUND_F32,
    torch.float16: BOUND_F16,
    torch.bfloat16: BOUND_BF16,
}

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, dstate, H, W, groups=None, dtype=torch.float64, device="cpu", seed=0,
                with_D=True, with_z=True, with_bias=True, softplus=True):
    """Random leaf tensors (requires_grad) for one scan, keyed by argument name.

    Values are drawn in float64 on the CPU from a seeded generator, then cast, so one seed gives
    the same numbers on every device. With ``softplus`` False, delta is shifted so that
    Δ = delta + delta_bias stays positive. u, delta, z, B, C take ``dtype``; A, D and delta_bias
    take float32 when ``dtype`` is a half type (as Mamba keeps its parameters), else ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    L = H * W
    bc_shape = (batch, dstate, L) if groups is None else (batch, groups, dstate, L)
    t = {
        "u": torch.randn(batch, dim, L, generator=g, dtype=f64),
        "A": -(torch.rand(dim, dstate, generator=g, dtype=f64) * 2 + 0.1),
        "B": torch.randn(*bc_shape, generator=g, dtype=f64),
        "C": torch.randn(*bc_shape, generator=g, dtype=f64),
    }
    bias = 0.3 * torch.randn(dim, generator=g, dtype=f64)
    if softplus:
        t["delta"] = 0.5 * torch.randn(batch, dim, L, generator=g, dtype=f64)
    else:
        t["delta"] = torch.rand(batch, dim, L, generator=g, dtype=f64) * 0.5 + 0.05
        if with_bias:
            t["delta"] = t["delta"] + bias.abs()[None, :, None]  # Δ = delta + bias >= 0.05
    if with_D:
        t["D"] = torch.randn(dim, generator=g, dtype=f64)
    if with_z:
        t["z"] = torch.randn(batch, dim, L, generator=g, dtype=f64)
    if with_bias:
        t["delta_bias"] = bias
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out = {}
    for name, v in t.items():
        dt = param_dtype if name in ("A", "D", "delta_bias") else dtype
        out[name] = v.to(device=device, dtype=dt).requires_grad_()
    return out


def make_weight(inputs, seed):
    """Random upstream gradient w (rounded to u's dtype) for the loss (out * w).sum()."""
    u = inputs["u"]
    g = torch.Generator().manual_seed(seed + 7919)
    w = torch.randn(*u.shape, generator=g, dtype=torch.float64)
    return w.to(device=u.device, dtype=u.dtype)


def forward(backend, t, softplus, H, W, flips, tile_elems):
    if backend == "triton-kernel":
        # The Triton entry point itself, with the tile-size knob; B and C in their 4D form.
        from mamba2d.ops.scan_triton import selective_scan_2d_triton

        B4 = t["B"] if t["B"].dim() == 4 else t["B"].unsqueeze(1)
        C4 = t["C"] if t["C"].dim() == 4 else t["C"].unsqueeze(1)
        layout = ScanLayout(H, W, *flips)
        return selective_scan_2d_triton(t["u"], t["delta"], t["A"], B4, C4, t.get("D"), t.get("z"),
                                        t.get("delta_bias"), softplus, layout, tile_elems=tile_elems)
    assert tile_elems is None, "tile_elems needs backend='triton-kernel'"
    return selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"),
                             t.get("delta_bias"), softplus, height=H, width=W, flip_h=flips[0],
                             flip_v=flips[1], transpose=flips[2], backend=backend)


def run(backend, inputs, softplus, H, W, w, flip_h=False, flip_v=False, transpose=False, tile_elems=None):
    """Forward and backward of one scan: returns (out, {name: gradient}) for loss (out * w).sum().

    ``backend``: one of the public backends, or ``"triton-kernel"`` for
    ``selective_scan_2d_triton`` (needed for ``tile_elems``). Gradients are taken with respect to
    the tensors in ``inputs`` (leaves or views), without touching any ``.grad``.
    """
    out = forward(backend, inputs, softplus, H, W, (flip_h, flip_v, transpose), tile_elems)
    names = [n for n in GRAD_NAMES if n in inputs]
    loss = (out * w.to(out.dtype)).sum()
    grads = torch.autograd.grad(loss, [inputs[n] for n in names])
    return out.detach(), dict(zip(names, grads, strict=True))


def reference(inputs, softplus, H, W, w, flip_h=False, flip_v=False, transpose=False):
    """The float64 ground truth: backend='reference' on float64 copies of the same inputs."""
    ref = {k: v.detach().to(torch.float64).requires_grad_() for k, v in inputs.items()}
    return run("reference", ref, softplus, H, W, w.to(torch.float64), flip_h, flip_v, transpose)


def rel_err(a, b):
    """||a - b|| / ||b||, in float64 (b is the reference)."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64).to(a.device)
    den = b.norm()
    num = (a - b).norm()
    return (num / den).item() if den > 0 else num.item()


def errors(got, ref):
    """Relative errors of the output and of every gradient: {"out": e, "u": e, ...}."""
    out, grads = got
    ref_out, ref_grads = ref
    errs = {"out": rel_err(out, ref_out)}
    for name, gr in ref_grads.items():
        errs[name] = rel_err(grads[name], gr)
    return errs


def check(got, ref, bound, label=""):
    """Assert the output and all gradients are finite, have the right shape, and are within bound.

    Returns the dict of relative errors.
    """
    out, grads = got
    ref_out, ref_grads = ref
    assert set(grads) == set(ref_grads)
    assert out.shape == ref_out.shape
    bad = [n for n, t in [("out", out), *grads.items()] if not torch.isfinite(t).all()]
    assert not bad, f"{label}: non-finite values in {bad}"
    for name, gr in grads.items():
        assert gr.shape == ref_grads[name].shape, f"{label}: grad {name} has shape {tuple(gr.shape)}"
    errs = errors(got, ref)
    over = {n: e for n, e in errs.items() if not e <= bound}
    assert not over, f"{label}: relative errors over {bound:g}: {over} (all: {errs})"
    return errs
