"""The Triton backend against the float64 reference.

Without CUDA the kernels run in Triton's CPU interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), which is slow: every case here is tiny. Small ``tile_elems`` force many tiles
so that the carries across tile borders, in both directions, are exercised.

Every output and partial buffer starts as NaN (POISON_OUTPUTS), so an element a kernel forgets
to write shows up as a non-finite value, which ``scan_cases.check`` rejects.
"""

from __future__ import annotations

import itertools

import pytest
import scan_cases as sc
import torch

from mamba2d import selective_scan_2d
from mamba2d.ops import scan_triton
from mamba2d.ops.scan_triton import plan_tiles

pytest.importorskip("triton")
# Triton 3.6's interpreter converts 1-element arrays to ints, which numpy deprecates: noise only.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32
FLIP_COMBOS = list(itertools.product([False, True], repeat=3))  # (flip_h, flip_v, transpose)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(scan_triton, "POISON_OUTPUTS", True)


def _compare(t, softplus, H, W, seed, label, tile_elems=None, backend="triton-kernel", **flips):
    w = sc.make_weight(t, seed)
    got = sc.run(backend, t, softplus, H, W, w, tile_elems=tile_elems, **flips)
    ref = sc.reference(t, softplus, H, W, w, **flips)
    assert got[0].dtype == t["u"].dtype
    return sc.check(got, ref, sc.BOUNDS[t["u"].dtype], label)


def _tiles(dstate, H, W, tile_elems):
    p = plan_tiles(dstate, H, W, tile_elems)
    return p.NBH, p.NBW


def test_poison_fills_with_nan():
    buf = scan_triton._alloc((3, 4), F32, DEVICE)
    assert torch.isnan(buf).all()


def _tiling_both_axes(dstate, H, W):
    """The largest tile_elems whose plan cuts the grid into several tiles along both axes."""
    for tile_elems in (2**k for k in range(12, -1, -1)):
        nbh, nbw = _tiles(dstate, H, W, tile_elems)
        if nbh > 1 and nbw > 1:
            return tile_elems
    raise AssertionError(f"no tile_elems tiles a {H} x {W} grid along both axes")


# (batch, dim, dstate, H, W) with the default plan: one tile, or a few along H.
DEFAULT_PLAN = [(2, 3, 3, 1, 1), (2, 3, 3, 1, 9), (2, 3, 3, 9, 1), (2, 3, 3, 5, 7)]


@pytest.mark.parametrize("shape", DEFAULT_PLAN, ids=lambda s: "{}x{}".format(*s[3:]))
def test_default_plan(shape):
    batch, dim, dstate, H, W = shape
    seed = 2000 + DEFAULT_PLAN.index(shape)
    t = sc.make_inputs(batch, dim, dstate, H, W, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, H, W, seed, f"{shape} plan={_tiles(dstate, H, W, None)}")


def test_small_grids_are_one_tile():
    assert _tiles(3, 1, 1, None) == (1, 1)
    assert _tiles(3, 1, 9, None) == (1, 1)
    assert _tiles(2, 2, 4, None) == (1, 1)


@pytest.mark.parametrize("flips", FLIP_COMBOS, ids=lambda f: "fh{:d}-fv{:d}-tr{:d}".format(*f))
@pytest.mark.parametrize("grid", [(5, 7), (6, 5)], ids=lambda g: "{}x{}".format(*g))
def test_tiled_directions(grid, flips):
    H, W = grid
    tile_elems = _tiling_both_axes(2, H, W)
    assert tile_elems >= 4  # not degenerate 1 x 1 tiles
    flip_h, flip_v, transpose = flips
    seed = 2100 + 8 * H + sum(b << i for i, b in enumerate(flips))
    t = sc.make_inputs(1, 2, 2, H, W, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, H, W, seed, f"{grid} {flips} tile_elems={tile_elems}", tile_elems=tile_elems,
             flip_h=flip_h, flip_v=flip_v, transpose=transpose)


# (TH, TW, flip_h, flip_v, transpose): tile shapes chosen directly, whatever plan_tiles prefers.
TILE_SHAPES = [(2, 4, False, False, False), (4, 2, False, False, True), (2, 2, True, True, False),
               (1, 8, False, True, True), (8, 8, True, False, True)]


@pytest.mark.parametrize("case", TILE_SHAPES, ids=lambda c: "{}x{}-fh{:d}-fv{:d}-tr{:d}".format(*c))
def test_tile_shapes(monkeypatch, case):
    if not hasattr(scan_triton, "TILE_OVERRIDE"):
        pytest.skip("scan_triton.TILE_OVERRIDE is gone")
    TH, TW, flip_h, flip_v, transpose = case
    monkeypatch.setattr(scan_triton, "TILE_OVERRIDE", (TH, TW))
    H, W = 5, 7
    p = plan_tiles(2, H, W)
    assert (p.TH, p.TW) == (TH, TW)
    seed = 2200 + TILE_SHAPES.index(case)
    t = sc.make_inputs(1, 2, 2, H, W, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, H, W, seed, str(case), flip_h=flip_h, flip_v=flip_v, transpose=transpose)


def test_reload_bc(monkeypatch):
    if not hasattr(scan_triton, "RELOAD_BC"):
        pytest.skip("scan_triton.RELOAD_BC is gone")
    monkeypatch.setattr(scan_triton, "RELOAD_BC", True)
    seed = 2250
    t = sc.make_inputs(1, 4, 3, 5, 7, groups=2, dtype=F32, device=DEVICE, seed=seed)
    te = _tiling_both_axes(3, 5, 7)
    _compare(t, True, 5, 7, seed, "RELOAD_BC", tile_elems=te, flip_h=True)


@pytest.mark.parametrize("tiled", [False, True])
def test_groups(tiled):
    seed = 2300 + tiled
    tile_elems = _tiling_both_axes(2, 5, 7) if tiled else None
    t = sc.make_inputs(1, 4, 2, 5, 7, groups=2, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, 5, 7, seed, f"groups=2 tile_elems={tile_elems}", tile_elems=tile_elems)


@pytest.mark.parametrize("dstate", [1, 5])
def test_dstate(dstate):
    tile_elems = _tiling_both_axes(dstate, 5, 7)
    seed = 2400 + dstate
    t = sc.make_inputs(1, 2, dstate, 5, 7, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, 5, 7, seed, f"dstate={dstate}", tile_elems=tile_elems)


@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=4)),
                         ids=lambda o: "D{:d}-z{:d}-bias{:d}-sp{:d}".format(*o))
def test_options(opts):
    with_D, with_z, with_bias, softplus = opts
    seed = 2500 + sum(b << i for i, b in enumerate(opts))
    t = sc.make_inputs(1, 2, 2, 3, 4, dtype=F32, device=DEVICE, seed=seed, with_D=with_D, with_z=with_z,
                       with_bias=with_bias, softplus=softplus)
    _compare(t, softplus, 3, 4, seed, f"opts={opts}")


def _noncontiguous(batch, dim, dstate, H, W, seed):
    """u, delta, z as (batch, L, dim) transposed; B, C as (batch, L, dstate) permuted; A as (dstate, dim).T.

    Returns (leaves, inputs): the leaves carry the gradients, the inputs are strided views of them.
    """
    base = sc.make_inputs(batch, dim, dstate, H, W, dtype=F32, device=DEVICE, seed=seed)
    leaves, views = {}, {}
    for k, v in base.items():
        v = v.detach()
        if k in ("u", "delta", "z", "B", "C"):
            leaf = v.transpose(1, 2).contiguous().requires_grad_()  # (batch, L, dim or dstate)
            views[k] = leaf.permute(0, 2, 1)
        elif k == "A":
            leaf = v.t().contiguous().requires_grad_()
            views[k] = leaf.t()
        else:
            leaf = v.clone().requires_grad_()
            views[k] = leaf
        leaves[k] = leaf
    for k in ("u", "delta", "z", "B", "C", "A"):
        assert not views[k].is_contiguous()
    return views


@pytest.mark.parametrize("tiled", [False, True])
def test_noncontiguous_inputs(tiled):
    seed = 2600 + tiled
    tile_elems = _tiling_both_axes(2, 5, 6) if tiled else None
    t = _noncontiguous(2, 3, 2, 5, 6, seed)
    _compare(t, True, 5, 6, seed, f"non-contiguous tile_elems={tile_elems}", tile_elems=tile_elems)


@pytest.mark.parametrize("name", ["D", "delta_bias"])
def test_strided_vector_parameter(name):
    # D or delta_bias as every other element of a longer vector (stride 2, e.g. a column of a matrix).
    seed = 2610 + len(name)
    t = sc.make_inputs(1, 3, 2, 3, 4, dtype=F32, device=DEVICE, seed=seed)
    g = torch.Generator().manual_seed(seed)
    longer = torch.randn(6, generator=g).to(DEVICE)
    longer[::2] = t[name].detach()
    t[name] = longer.requires_grad_()[::2]
    assert t[name].stride() == (2,)
    _compare(t, True, 3, 4, seed, f"strided {name}")


def test_noncontiguous_upstream_gradient():
    # The gradient reaching the scan is a transposed (non-contiguous) view.
    seed = 2620
    H, W = 5, 6
    t = sc.make_inputs(1, 2, 2, H, W, dtype=F32, device=DEVICE, seed=seed)
    w = sc.make_weight(t, seed)
    ref = sc.reference(t, True, H, W, w)
    out = sc.forward("triton-kernel", t, True, H, W, (False, False, False), _tiling_both_axes(2, H, W))
    loss = (out.transpose(1, 2) * w.transpose(1, 2).contiguous()).sum()
    names = list(ref[1])
    grads = torch.autograd.grad(loss, [t[n] for n in names])
    sc.check((out.detach(), dict(zip(names, grads, strict=True))), ref, sc.BOUND_F32, "dout strided")


@pytest.mark.parametrize("tiled", [False, True])
def test_state_split(monkeypatch, tiled):
    # dstate 5 in launches of at most 2 states: 3 launches whose outputs add up.
    monkeypatch.setattr(scan_triton, "MAX_STATES_PER_LAUNCH", 2)
    seed = 2700 + tiled
    tile_elems = _tiling_both_axes(2, 5, 6) if tiled else None
    t = sc.make_inputs(1, 2, 5, 5, 6, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, 5, 6, seed, f"split tile_elems={tile_elems}", tile_elems=tile_elems, flip_v=True)


def test_state_split_without_options(monkeypatch):
    monkeypatch.setattr(scan_triton, "MAX_STATES_PER_LAUNCH", 2)
    seed = 2710
    t = sc.make_inputs(1, 2, 5, 3, 4, dtype=F32, device=DEVICE, seed=seed, with_D=False, with_z=False,
                       with_bias=False, softplus=False)
    _compare(t, False, 3, 4, seed, "split, no options")


@pytest.mark.parametrize("groups", [None, 2])
def test_public_api(groups):
    seed = 2800 + bool(groups)
    t = sc.make_inputs(2, 4, 3, 4, 5, groups=groups, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, 4, 5, seed, f"public api groups={groups}", backend="triton", transpose=True,
             flip_h=True)


def test_forward_without_grad():
    seed = 2900
    t = sc.make_inputs(1, 2, 2, 5, 7, dtype=F32, device=DEVICE, seed=seed)
    with torch.no_grad():
        out = sc.forward("triton-kernel", t, True, 5, 7, (False, True, True), _tiling_both_axes(2, 5, 7))
        ref = sc.forward("reference", {k: v.double() for k, v in t.items()}, True, 5, 7,
                         (False, True, True), None)
    assert torch.isfinite(out).all()
    assert sc.rel_err(out, ref) < sc.BOUND_F32


def test_output_dtype():
    t = sc.make_inputs(1, 2, 2, 3, 4, dtype=F32, device=DEVICE, seed=2910)
    out = selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                            True, height=3, width=4, backend="triton")
    assert out.dtype == F32


def test_float16_inputs_tiled():
    # fp16 loads and stores through every kernel, with carries crossing tiles both ways.
    H, W = 5, 7
    tile_elems = _tiling_both_axes(2, H, W)
    t = sc.make_inputs(1, 2, 2, H, W, dtype=torch.float16, device=DEVICE, seed=2600)
    _compare(t, True, H, W, 2600, f"fp16 tile_elems={tile_elems}", tile_elems=tile_elems)


# Row-streaming (v2) kernels: (K rows per segment, backward programs, two-level forward, whole-item
# backward units, flip_h, flip_v, transpose). Small K gives several segments: checkpoints (written by
# the one-pass forward, or by the two-level forward's summary and combine kernels), adjoint
# checkpoints for (item, segment) backward units, stash reloads. Fewer programs than units makes
# each backward program take several in turn.
ROW_PLANS = [(2, 2, True, False, False, False, False), (2, 1, False, True, True, False, False),
             (3, 2, True, True, False, True, False), (2, 3, False, False, False, False, True),
             (4, 2, True, False, True, True, True), (1, 5, False, True, False, True, True),
             (5, 3, True, False, False, False, False), (2, 40, False, False, True, True, False)]


@pytest.mark.parametrize("case", ROW_PLANS,
                         ids=lambda c: "K{}-P{}-2l{:d}-seq{:d}-fh{:d}-fv{:d}-tr{:d}".format(*c))
def test_row_plans(monkeypatch, case):
    K, P, two_level, seq, flip_h, flip_v, transpose = case
    monkeypatch.setattr(scan_triton, "ROW_OVERRIDE", (K, P, two_level, seq))
    H, W = 5, 6
    plan = scan_triton.plan_rows(2, H, W, 2 * 4, torch.device(DEVICE))
    units = 8 if plan.seq_bwd else 8 * plan.n_seg
    assert (plan.K, plan.P, plan.two_level, plan.seq_bwd) == (K, min(P, units), two_level and plan.n_seg > 1,
                                                              seq or plan.n_seg == 1)
    seed = 3000 + ROW_PLANS.index(case)
    t = sc.make_inputs(2, 4, 2, H, W, groups=2, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, H, W, seed, f"rows {case}", flip_h=flip_h, flip_v=flip_v, transpose=transpose)


def test_row_plan_is_the_default():
    dev = torch.device(DEVICE)
    assert scan_triton.plan_rows(16, 64, 64, 256, dev) is not None
    assert scan_triton.plan_rows(16, 8, 600, 4, dev) is None  # too wide: tiled kernels
    plan = scan_triton.plan_rows(16, 256, 256, 256, dev)
    assert 1 < plan.K < 256  # checkpoints every K rows, not every row nor none
    assert (plan.G, plan.two_level, plan.seq_bwd) == (1, False, True)
    wide = scan_triton.plan_rows(16, 20, 300, 8, dev)
    assert (wide.G, wide.NB, wide.WP) == (2, 8, 512)  # 16 x 512 rows: two groups of 8 states


# (state groups, K, P, two-level, whole-item units, flip_h, flip_v, transpose) with dstate 3 or 5:
# groups of 2 or 4 states, the last one partly empty; every output added in float32 by the groups.
GROUP_PLANS = [(2, 2, 3, False, True, False, False, False), (2, 2, 2, True, False, True, True, False),
               (4, 3, 40, False, True, False, True, True), (2, 5, 1, True, True, True, False, True)]


@pytest.mark.parametrize("case", GROUP_PLANS,
                         ids=lambda c: "G{}-K{}-P{}-2l{:d}-seq{:d}-fh{:d}-fv{:d}-tr{:d}".format(*c))
def test_row_state_groups(monkeypatch, case):
    G, K, P, two_level, seq, flip_h, flip_v, transpose = case
    monkeypatch.setattr(scan_triton, "ROW_GROUPS", G)
    monkeypatch.setattr(scan_triton, "ROW_OVERRIDE", (K, P, two_level, seq))
    H, W, dstate = 5, 6, 3 if G == 2 else 5
    plan = scan_triton.plan_rows(dstate, H, W, 2 * 3, torch.device(DEVICE))
    assert plan.G == G and plan.NB * G == scan_triton._pow2(dstate)
    seed = 3050 + GROUP_PLANS.index(case)
    t = sc.make_inputs(2, 3, dstate, H, W, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, H, W, seed, f"groups {case}", flip_h=flip_h, flip_v=flip_v, transpose=transpose)


def test_row_state_groups_without_options(monkeypatch):
    monkeypatch.setattr(scan_triton, "ROW_GROUPS", 2)
    seed = 3060
    t = sc.make_inputs(1, 2, 4, 4, 5, dtype=F32, device=DEVICE, seed=seed, with_D=False, with_z=False,
                       with_bias=False, softplus=False)
    _compare(t, False, 4, 5, seed, "groups, no options")


def test_row_kernels_float16(monkeypatch):
    monkeypatch.setattr(scan_triton, "ROW_OVERRIDE", (2, 1, True, False))
    H, W = 5, 7
    t = sc.make_inputs(1, 2, 2, H, W, dtype=torch.float16, device=DEVICE, seed=3100)
    _compare(t, True, H, W, 3100, "fp16 rows", flip_v=True)


def test_tiled_kernels_still_selectable(monkeypatch):
    monkeypatch.setattr(scan_triton, "ROW_KERNELS", False)
    seed = 3200
    t = sc.make_inputs(1, 2, 3, 5, 7, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, 5, 7, seed, "v1 default plan", transpose=True)
