"""The float64 reference backend against independent statements of the definition."""

from __future__ import annotations

import itertools

import pytest
import scan_cases as sc
import torch
import torch.nn.functional as F

from mamba2d import selective_scan_2d

F64 = torch.float64
OPTION_COMBOS = list(itertools.product([False, True], repeat=4))  # (D, z, bias, softplus)
FLIP_COMBOS = list(itertools.product([False, True], repeat=3))  # (flip_h, flip_v, transpose)


def _delta(t, softplus):
    dt = t["delta"]
    if "delta_bias" in t:
        dt = dt + t["delta_bias"][None, :, None]
    return F.softplus(dt) if softplus else dt


def _per_channel(bc, dim):
    """B or C, (batch, dstate, L) or (batch, groups, dstate, L), as (batch, dim, dstate, L)."""
    if bc.dim() == 3:
        bc = bc.unsqueeze(1)
    return bc.repeat_interleave(dim // bc.shape[1], dim=1)


def _gate(t, y):
    if "D" in t:
        y = y + t["D"][None, :, None] * t["u"]
    if "z" in t:
        y = y * F.silu(t["z"])
    return y


def mamba_1d(t, softplus, reverse=False):
    """Mamba's 1D selective scan, written out: h = exp(Δ A) h + Δ B u; y = C·h + D u; y * silu(z)."""
    u, A = t["u"], t["A"]
    batch, dim, L = u.shape
    dt = _delta(t, softplus)
    B = _per_channel(t["B"], dim)
    C = _per_channel(t["C"], dim)
    h = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype)
    ys = [None] * L
    for k in (range(L - 1, -1, -1) if reverse else range(L)):
        d = dt[:, :, k, None]
        h = torch.exp(d * A) * h + d * B[..., k] * u[:, :, k, None]
        ys[k] = (C[..., k] * h).sum(-1)
    return _gate(t, torch.stack(ys, dim=-1))


def ref_run(t, softplus, H, W, w, **flips):
    return sc.run("reference", t, softplus, H, W, w, **flips)


def grads_of(out, t, w):
    names = [n for n in sc.GRAD_NAMES if n in t]
    grads = torch.autograd.grad((out * w).sum(), [t[n] for n in names])
    return out.detach(), dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("opts", OPTION_COMBOS, ids=lambda o: "D{:d}-z{:d}-bias{:d}-sp{:d}".format(*o))
def test_height_one_is_mamba_1d(opts):
    with_D, with_z, with_bias, softplus = opts
    seed = 100 + sum(b << i for i, b in enumerate(opts))
    t = sc.make_inputs(2, 3, 4, 1, 9, seed=seed, with_D=with_D, with_z=with_z, with_bias=with_bias,
                       softplus=softplus)
    w = sc.make_weight(t, seed)
    got = ref_run(t, softplus, 1, 9, w)
    want = grads_of(mamba_1d(t, softplus), t, w)
    sc.check(got, want, sc.BOUND_F64, f"opts={opts}")


@pytest.mark.parametrize("flips", FLIP_COMBOS, ids=lambda f: "fh{:d}-fv{:d}-tr{:d}".format(*f))
@pytest.mark.parametrize("groups", [None, 3])
def test_height_one_is_mamba_1d_any_direction(flips, groups):
    # On a single row the vertical pass is the identity: only flip_h (a reversed scan) matters.
    flip_h, flip_v, transpose = flips
    seed = 200 + 8 * (groups or 0) + sum(b << i for i, b in enumerate(flips))
    t = sc.make_inputs(2, 6, 3, 1, 11, groups=groups, seed=seed)
    w = sc.make_weight(t, seed)
    got = ref_run(t, True, 1, 11, w, flip_h=flip_h, flip_v=flip_v, transpose=transpose)
    want = grads_of(mamba_1d(t, True, reverse=flip_h), t, w)
    sc.check(got, want, sc.BOUND_F64, f"flips={flips} groups={groups}")


# --- spatial symmetries ------------------------------------------------------------------------


def _grid(x, H, W):
    return x.reshape(*x.shape[:-1], H, W)


def _flat(x):
    return x.reshape(*x.shape[:-2], -1)


def _map_spatial(t, fn, H, W):
    """Apply ``fn`` to the H x W grid of u, delta, z, B, C (as differentiable views of the leaves)."""
    out = dict(t)
    for k in ("u", "delta", "z", "B", "C"):
        if k in t:
            out[k] = _flat(fn(_grid(t[k], H, W)))
    return out


def _sym_case(seed, groups=None):
    t = sc.make_inputs(2, 4, 3, 5, 7, groups=groups, seed=seed)
    return t, sc.make_weight(t, seed), 5, 7


@pytest.mark.parametrize("flip_h,flip_v", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("groups", [None, 2])
def test_transpose_is_scan_of_transposed_grid(flip_h, flip_v, groups):
    t, w, H, W = _sym_case(300 + 2 * flip_h + flip_v + (4 if groups else 0), groups)
    got = ref_run(t, True, H, W, w, flip_h=flip_h, flip_v=flip_v, transpose=True)
    tt = _map_spatial(t, lambda x: x.transpose(-1, -2), H, W)
    # On the transposed (W x H) grid, rows are the original columns: the flips swap roles too.
    out_t = sc.forward("reference", tt, True, W, H, (flip_v, flip_h, False), None)
    out = _flat(_grid(out_t, W, H).transpose(-1, -2))
    sc.check(got, grads_of(out, t, w), sc.BOUND_F64)


@pytest.mark.parametrize("other_flip,transpose", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("axis", ["h", "v"])
def test_flip_is_scan_of_mirrored_grid(axis, other_flip, transpose):
    # flip_h mirrors the grid's columns (tensor dim -1), flip_v its rows (dim -2).
    horizontal = axis == "h"
    t, w, H, W = _sym_case((310 if horizontal else 320) + 2 * other_flip + transpose)
    flips = (True, other_flip) if horizontal else (other_flip, True)
    got = ref_run(t, True, H, W, w, flip_h=flips[0], flip_v=flips[1], transpose=transpose)
    dim = -1 if horizontal else -2
    tf = _map_spatial(t, lambda x: x.flip(dim), H, W)
    unflipped = (False, other_flip) if horizontal else (other_flip, False)
    out_f = sc.forward("reference", tf, True, H, W, (*unflipped, transpose), None)
    out = _flat(_grid(out_f, H, W).flip(dim))
    sc.check(got, grads_of(out, t, w), sc.BOUND_F64)


# --- closed form ---------------------------------------------------------------------------------


def closed_form_h(t, softplus, H, W, transpose):
    """h[b, c, n, i, j] as the explicit double sum over source cells (i', j') <= (i, j)."""
    u, A = t["u"].detach(), t["A"].detach()
    batch, dim, _ = u.shape
    dstate = A.shape[1]
    dt = _grid(_delta({k: v.detach() for k, v in t.items()}, softplus), H, W)
    B = _grid(_per_channel(t["B"].detach(), dim), H, W)
    a = torch.exp(dt[:, :, None] * A[None, :, :, None, None])  # (batch, dim, dstate, H, W)
    X = dt[:, :, None] * B * _grid(u, H, W)[:, :, None]
    h = torch.zeros(batch, dim, dstate, H, W, dtype=F64)
    one = torch.ones(batch, dim, dstate, dtype=F64)
    for i, j in itertools.product(range(H), range(W)):
        for i2, j2 in itertools.product(range(i + 1), range(j + 1)):
            row, col = (i, j2) if transpose else (i2, j)
            p_h = one.clone()
            for jj in range(j2 + 1, j + 1):  # horizontal decays, along row `row`
                p_h = p_h * a[..., row, jj]
            p_v = one.clone()
            for k in range(i2 + 1, i + 1):  # vertical decays, along column `col`
                p_v = p_v * a[..., k, col]
            h[..., i, j] += p_h * p_v * X[..., i2, j2]
    return h


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_closed_form(transpose, softplus):
    H, W, dim, dstate = 3, 4, 2, 2
    t = sc.make_inputs(2, dim, dstate, H, W, seed=400 + 2 * transpose + softplus, with_D=False,
                       with_z=False, softplus=softplus)
    h = closed_form_h(t, softplus, H, W, transpose)
    # The reference's states, one at a time: with C = 1 on state n and 0 elsewhere, y = h[n].
    for n in range(dstate):
        C = torch.zeros_like(t["C"])
        C[:, n] = 1.0
        y = selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], C, None, None, t["delta_bias"],
                              softplus, height=H, width=W, transpose=transpose, backend="reference")
        err = sc.rel_err(_grid(y, H, W), h[:, :, n])
        assert err < sc.BOUND_F64, f"state {n}: {err:.3e}"
    # And y with a random C: y = Σ_n C[n] h[n].
    y = selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], None, None, t["delta_bias"],
                          softplus, height=H, width=W, transpose=transpose, backend="reference")
    want = (_grid(t["C"].detach(), H, W)[:, None] * h).sum(2)
    assert sc.rel_err(_grid(y, H, W), want) < sc.BOUND_F64


def test_scan_order_matters():
    t = sc.make_inputs(1, 3, 4, 6, 5, seed=500)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    y0 = selective_scan_2d(*args, height=6, width=5, backend="reference")
    y1 = selective_scan_2d(*args, height=6, width=5, transpose=True, backend="reference")
    assert sc.rel_err(y1, y0) > 1e-3
