"""Triton backend: launches the fused kernels of ``triton_kernels`` and wires their autograd.

Two kernel families (see ``triton_kernels``): row streaming (``plan_rows``; the default where a
padded row is at most ROW_MAX_WIDTH cells) and tiles (``plan_tiles``; wider rows, or when tile
settings are given). Memory saved for the backward besides the inputs: row streaming keeps the
running state every K rows (batch * dim * (ceil(H / K) - 1) rows of dstate x W float32); tiles keep
two carry arrays, dstate * batch * dim * (H * n_tile_cols + W * n_tile_rows) floats. No
(batch, dim, dstate, H, W) tensor is ever written to device memory.

States: up to ``MAX_STATES_PER_LAUNCH`` states run in one launch. Larger dstate is split into
groups of states whose outputs add up (the scan is linear in the states); the D skip and the z
gate are then applied once, outside the kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mamba2d.ops.layout import ScanLayout

MAX_STATES_PER_LAUNCH = 16
TILE_ELEMS = 2048  # NB * TH * TW of the register block each program holds
MAX_CHANNELS_PER_PROGRAM = 32
TARGET_PROGRAMS = 2048  # backward programs to aim for (a few per SM on an H100)
PARTIALS_BUDGET_BYTES = 64 * 2**20  # device memory for the per-chunk dB/dC copies
POISON_OUTPUTS = False  # tests set this to fill every output buffer with NaN before launch
TILE_OVERRIDE: tuple[int, int] | None = None  # (TH, TW) for experiments; None = plan_tiles' choice
NUM_WARPS_OVERRIDE: int | None = None  # for experiments
RELOAD_BC = False  # the backward re-reads B and C for each channel instead of holding them in registers
LAUNCH_LOG: list[dict] | None = None  # set to [] to record each launch's registers and spills
ROW_KERNELS = True  # the row-streaming kernels (v2) where the row fits; False: the tiled kernels (v1)
ROW_MAX_WIDTH = 512  # widest (power-of-two padded) row the row-streaming kernels take
ROW_OVERRIDE: tuple[int, int, bool, bool] | None = None  # tests: (K, P, two_level, seq_bwd)
ROW_MAX_ELEMS = 4096  # NB * WP of one program's row; wider rows split the states into groups
ROW_GROUPS: int | None = None  # force the number of state groups (tests)


def _log(name: str, compiled, grid) -> None:
    if LAUNCH_LOG is not None and compiled is not None:
        LAUNCH_LOG.append(dict(kernel=name, grid=tuple(grid), n_regs=getattr(compiled, "n_regs", None),
                               n_spills=getattr(compiled, "n_spills", None)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(u: torch.Tensor) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``u``'s device, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    if _interpreting():
        return True, ""
    if not u.is_cuda:
        return False, f"tensors are on {u.device}; the Triton kernels need CUDA tensors"
    return True, ""


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class _Plan:
    """Tile shape and derived counts for one launch."""

    NB: int
    TH: int
    TW: int
    NBH: int
    NBW: int
    num_warps: int

    @property
    def n_tiles(self) -> int:
        return self.NBH * self.NBW


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_tiles(dstate: int, height: int, width: int, tile_elems: int | None = None) -> _Plan:
    """Pick the tile and warp count; ``tile_elems`` caps NB * TH * TW (tests use it to force tiling).

    From sweeps on an H100 (benchmarks/results/tile_sweep_h100.json): tiles wide along the
    contiguous W axis and a few rows tall beat square ones (scans along W stay inside a warp,
    scans along H cross warps), and the fastest programs hold about 16 elements per thread with
    as few warps as possible. With 8+ states, 4 x 32 tiles on 4 warps (8 x 16 for narrow grids);
    with fewer states, 2 x 64 on 2 warps. Short tiles cost carry memory (one float per column,
    state and tile row), which is why TH does not go below 4 at 8+ states.
    """
    NB = _pow2(dstate)
    cells = max(1, (tile_elems or TILE_ELEMS) // NB)
    if NB >= 8:
        TW = min(_pow2(width), 32, cells)
        TH = min(_pow2(height), 8 if TW <= 16 else 4, max(1, cells // TW))
    else:
        TW = min(_pow2(width), 64, cells)
        TH = min(_pow2(height), 2, max(1, cells // TW))
    if TILE_OVERRIDE is not None:
        TH, TW = TILE_OVERRIDE
    elems = NB * TH * TW
    num_warps = max(1, min(8, elems // 512)) if NB >= 8 else (2 if elems >= 128 else 1)
    if NUM_WARPS_OVERRIDE is not None:
        num_warps = NUM_WARPS_OVERRIDE
    return _Plan(NB, TH, TW, -(-height // TH), -(-width // TW), num_warps)


def _channels_per_program(per_group: int, programs_per_channel: int, partial_bytes: int) -> int:
    """Channels one backward program loops over (CB, a divisor of per_group).

    Each chunk of CB channels writes its own float32 copy of dB and dC (``partial_bytes`` for
    both), summed afterwards. Smaller CB means more programs (more parallelism) but more copies:
    take the largest CB, up to MAX_CHANNELS_PER_PROGRAM, that still gives TARGET_PROGRAMS
    programs, while keeping the copies within PARTIALS_BUDGET_BYTES.
    """
    divisors = [d for d in range(1, per_group + 1) if per_group % d == 0]
    max_parts = max(1, PARTIALS_BUDGET_BYTES // max(1, partial_bytes))
    ok = [d for d in divisors if per_group // d <= max_parts and d <= MAX_CHANNELS_PER_PROGRAM]
    if not ok:  # the cap on CB and the memory budget disagree: memory wins
        ok = [min(d for d in divisors if per_group // d <= max_parts)]
    for d in sorted(ok, reverse=True):
        if programs_per_channel * (per_group // d) >= TARGET_PROGRAMS:
            return d
    return min(ok)


@dataclass(frozen=True)
class _RowPlan:
    """Row-streaming launch: NB states x WP columns per row; segments of K rows (scan steps).

    two_level: the forward runs its segments in parallel (summary, combine, main kernels) instead
    of one program walking all rows of a (batch, channel) item. seq_bwd: a backward unit is a whole
    item (segments walked last to first, the adjoint carried in registers); otherwise a unit is an
    (item, segment) pair and the adjoints entering segments come from a summary and a combine
    kernel. P persistent backward programs, each with a K x NB x WP float32 stash.
    """

    NB: int
    WP: int
    K: int
    n_seg: int
    two_level: bool
    seq_bwd: bool
    P: int
    warps: int
    bwd_warps: int
    G: int = 1  # groups of NB states per (batch, channel), run by separate programs

    @property
    def bwd_segments(self) -> int:
        """Segments per backward unit's partial sums: 1 per item (seq_bwd) or n_seg."""
        return 1 if self.seq_bwd else self.n_seg


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_rows(dstate: int, height: int, width: int, items: int, device: torch.device) -> _RowPlan | None:
    """The row-streaming plan for ``items`` (batch * dim) scans, or None when a row is wider
    than ROW_MAX_WIDTH (the tiled kernels then run).

    From the H200 sweeps (benchmarks/notes_scan_v2.md, benchmarks/results/row_sweep_h200.json):
    - rows of more than ROW_MAX_ELEMS elements (16 states x 512 columns) split the states into
      groups run by separate programs (no register spills);
    - about 16 row elements per thread, one to sixteen warps; the backward takes 8 per thread for
      rows of 513 to 1024 elements (a 16 x 64 row: with 256 items, 2-warp programs left half of the
      SMs idle) and for split states;
    - one forward program walks all rows of an item (writing checkpoints every K rows) and one
      backward program takes a whole item at a time: splitting rows into segments run in parallel
      (two-level forward, (item, segment) backward units) measured slower at every benchmark
      shape, so it is only an option (ROW_OVERRIDE);
    - P backward programs: a few per SM, at most one per item;
    - K minimises the memory held: checkpoints (items * (ceil(H/K) - 1) rows) plus stashes
      (P * K rows).
    """
    NB, WP = _pow2(dstate), _pow2(width)
    if WP > ROW_MAX_WIDTH:
        return None
    G = max(1, min(NB, NB * WP // ROW_MAX_ELEMS)) if ROW_GROUPS is None else ROW_GROUPS
    NB //= G
    items *= G  # (batch, channel, group) scans from here on
    elems = NB * WP
    warps = max(1, min(16, elems // 512))
    bwd_warps = max(1, min(16, elems // 256)) if (G > 1 or 512 < elems <= 1024) else warps
    resident = _sm_count(device) * max(1, 16 // bwd_warps)

    def plan(K: int, P: int | None = None, two: bool = False, seq: bool = True) -> _RowPlan:
        n_seg = -(-height // K)
        units = items if seq or n_seg == 1 else items * n_seg
        P = max(1, min(units, resident if P is None else P))
        return _RowPlan(NB, WP, K, n_seg, two and n_seg > 1, seq or n_seg == 1, P, warps, bwd_warps, G)

    if ROW_OVERRIDE is not None:
        K, P, two, seq = ROW_OVERRIDE
        return plan(max(1, min(K, height)), P, two, seq)

    def memory(p: _RowPlan) -> int:
        return 4 * (items * (p.n_seg - 1) * NB * width + p.P * p.K * NB * WP)

    plans = [plan(k) for k in sorted({k for k in (2, 4, 8, 16, 32, 64) if k < height} | {height})]
    return min(plans, key=lambda p: (memory(p), -p.K))


class _Args:
    """Kernel-ready views: B and C grouped, strides unpacked, optional tensors replaced by dummies."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, layout: ScanLayout, tile_elems=None):
        self.u, self.delta, self.A, self.B, self.C, self.z = u, delta, A, B, C, z
        # The kernels index D and delta_bias with unit stride; both are tiny.
        self.D = D.contiguous() if D is not None else None
        self.bias = delta_bias.contiguous() if delta_bias is not None else None
        self.batch, self.dim, self.L = u.shape
        self.groups, self.N = B.shape[1], B.shape[2]
        self.per_group = self.dim // self.groups
        self.H, self.W = layout.height, layout.width
        self.layout = layout
        self.plan = plan_tiles(self.N, self.H, self.W, tile_elems)
        # Explicit tile settings (tile_elems, TILE_OVERRIDE) ask for the tiled kernels.
        rows = ROW_KERNELS and tile_elems is None and TILE_OVERRIDE is None
        self.rows = plan_rows(self.N, self.H, self.W, self.batch * self.dim, u.device) if rows else None
        self.dummy = torch.empty(1, dtype=torch.float32, device=u.device)
        # Axis 2 of a tile is horizontal, axis 1 vertical.
        self.AX1 = 1 if layout.transpose else 2
        self.REV1 = layout.flip_v if layout.transpose else layout.flip_h
        self.REV2 = layout.flip_h if layout.transpose else layout.flip_v

    def tiles_along(self, axis: int) -> int:
        return self.plan.NBW if axis == 2 else self.plan.NBH

    def lines_across(self, axis: int) -> int:
        return self.plan.NBH if axis == 2 else self.plan.NBW

    def carry_buffer(self, axis: int) -> torch.Tensor:
        p = self.plan
        shape = (self.batch * self.dim, self.N, self.H, p.NBW) if axis == 2 else \
            (self.batch * self.dim, self.N, p.NBH, self.W)
        return _alloc(shape, torch.float32, self.u.device)

    def opt(self, t):
        return self.dummy if t is None else t

    def z_strides(self):
        return self.z.stride() if self.z is not None else (0, 0, 0)

    def bc_strides(self):
        return (*self.B.stride(), *self.C.stride(), *self.A.stride())

    def flags(self, softplus: bool) -> dict:
        p = self.plan
        return dict(NB=p.NB, TH=p.TH, TW=p.TW, HAS_BIAS=self.bias is not None,
                    SOFTPLUS=bool(softplus), num_warps=p.num_warps)


def _carries(k, x: _Args, out_grad, axis, adjoint, softplus, fwd_rev):
    """Launch ``_carry_kernel`` along ``axis``; returns the carry buffer it fills."""
    buf = x.carry_buffer(axis)
    grid = (x.batch * x.dim, x.lines_across(axis))
    dout = out_grad if out_grad is not None else x.dummy
    dstr = out_grad.stride() if out_grad is not None else (0, 0, 0)
    ck = k._carry_kernel[grid](
        x.u, x.delta, dout, x.opt(x.z), x.A, x.B, x.C, x.opt(x.bias),
        buf,
        x.dim, x.N, x.H, x.W, x.plan.NBH, x.plan.NBW, x.per_group, x.tiles_along(axis),
        *x.u.stride(), *x.delta.stride(), *x.z_strides(), *dstr, *x.bc_strides(),
        AXIS=axis, REV=(not fwd_rev) if adjoint else fwd_rev, FWD_REV=fwd_rev, ADJOINT=adjoint,
        HAS_Z=x.z is not None, **x.flags(softplus),
    )
    _log(f"carry(axis={axis},adjoint={adjoint})", ck, grid)
    return buf


def _row_flags(x: _Args, rp: _RowPlan, softplus: bool) -> dict:
    return dict(NB=rp.NB, WP=rp.WP, K=rp.K, G=rp.G, TRANSPOSE=x.layout.transpose, REV_H=x.layout.flip_h,
                REV_V=x.layout.flip_v, HAS_BIAS=x.bias is not None, SOFTPLUS=bool(softplus))


def _row_combine(k, x: _Args, rp: _RowPlan, q, sdt, adjoint: bool) -> None:
    grid = (x.batch * x.dim, x.N)
    ck = k._row_combine_kernel[grid](q, sdt, x.A, x.dim, x.N, x.W, rp.n_seg, *x.A.stride(), WP=rp.WP,
                                     ADJOINT=adjoint, num_warps=max(1, min(4, rp.WP // 128)))
    _log(f"row_combine(adjoint={adjoint})", ck, grid)


def _row_forward(x: _Args, rp: _RowPlan, softplus: bool, save: bool, out_dtype: torch.dtype):
    """y, and the checkpoints (states entering segments 1..n_seg-1) when saved or needed."""
    from mamba2d.ops import triton_kernels as k

    items = x.batch * x.dim
    dev = x.u.device
    n_ckpt = rp.n_seg - 1
    ck = None
    if n_ckpt > 0 and (save or rp.two_level):
        ck = _alloc((items, n_ckpt, x.N, x.W), torch.float32, dev)
    common = (x.dim, x.N, x.H, x.W, x.per_group)
    if rp.two_level:
        sdt = _alloc((items, rp.n_seg, rp.WP), torch.float32, dev)
        grid = (items * rp.G, n_ckpt)
        c1 = k._row_fwd_sum_kernel[grid](
            x.u, x.delta, x.A, x.B, x.bias if x.bias is not None else x.dummy, ck, sdt, *common, rp.n_seg,
            *x.u.stride(), *x.delta.stride(), *x.bc_strides()[:4], *x.A.stride(),
            **_row_flags(x, rp, softplus), num_warps=rp.warps,
        )
        _log(f"row_fwd_sum(K={rp.K})", c1, grid)
        _row_combine(k, x, rp, ck, sdt, adjoint=False)
    if rp.G > 1:  # the groups' shares are added in float32
        y = torch.zeros((x.batch, x.dim, x.L), dtype=torch.float32, device=dev)
    else:
        y = _alloc((x.batch, x.dim, x.L), out_dtype, dev)
    grid = (items * rp.G, rp.n_seg if rp.two_level else 1)
    c3 = k._row_fwd_kernel[grid](
        x.u, x.delta, x.opt(x.z), x.A, x.B, x.C, x.opt(x.D), x.opt(x.bias), x.opt(ck), y,
        *common, n_ckpt,
        *x.u.stride(), *x.delta.stride(), *x.z_strides(), *x.bc_strides(),
        KF=rp.K if rp.two_level else x.H, HAS_D=x.D is not None, HAS_Z=x.z is not None,
        LOAD_START=rp.two_level, SAVE=ck is not None and not rp.two_level,
        **_row_flags(x, rp, softplus), num_warps=rp.warps,
    )
    _log(f"row_fwd(K={rp.K},two_level={rp.two_level})", c3, grid)
    return y.to(out_dtype), ck if save else None


def _sum_partials(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum ``t`` over ``dims``; a view, with no new allocation, when those dims are all of size 1."""
    if all(t.shape[d] == 1 for d in dims):
        return t[tuple(0 if d in dims else slice(None) for d in range(t.dim()))]
    return t.sum(dim=dims)


def _row_backward(x: _Args, rp: _RowPlan, softplus: bool, dout: torch.Tensor, ck):
    from mamba2d.ops import triton_kernels as k

    dev = x.u.device
    f32 = torch.float32
    items = x.batch * x.dim
    units = items * rp.G * rp.bwd_segments
    common = (x.dim, x.N, x.H, x.W, x.per_group)
    lk = None
    if not rp.seq_bwd:
        lk = _alloc((items, rp.n_seg - 1, x.N, x.W), f32, dev)
        sdt = _alloc((items, rp.n_seg, rp.WP), f32, dev)
        grid = (items * rp.G, rp.n_seg - 1)
        c1 = k._row_adj_sum_kernel[grid](
            x.delta, x.opt(x.z), dout, x.A, x.C, x.opt(x.bias), lk, sdt, *common, rp.n_seg,
            *x.delta.stride(), *x.z_strides(), *dout.stride(), *x.bc_strides()[4:],
            HAS_Z=x.z is not None, **_row_flags(x, rp, softplus), num_warps=rp.warps,
        )
        _log(f"row_adj_sum(K={rp.K})", c1, grid)
        _row_combine(k, x, rp, lk, sdt, adjoint=True)
    shape = (x.batch, x.dim, x.L)
    if rp.G > 1:  # the groups' shares are added in float32
        du, dd = torch.zeros(shape, dtype=f32, device=dev), torch.zeros(shape, dtype=f32, device=dev)
        dz = torch.zeros(shape, dtype=f32, device=dev) if x.z is not None else None
    else:
        du, dd = _alloc(shape, x.u.dtype, dev), _alloc(shape, x.delta.dtype, dev)
        dz = _alloc(shape, x.z.dtype, dev) if x.z is not None else None
    dA = _alloc((x.batch, x.dim, rp.bwd_segments, x.N), f32, dev)
    dD = _alloc((x.batch, x.dim, rp.bwd_segments), f32, dev) if x.D is not None else None
    dbias = _alloc((x.batch, x.dim, rp.bwd_segments, rp.G), f32, dev) if x.bias is not None else None
    dB = torch.zeros((x.batch, x.groups, x.N, x.L), dtype=f32, device=dev)  # atomic sums over channels
    dC = torch.zeros((x.batch, x.groups, x.N, x.L), dtype=f32, device=dev)
    stash = torch.empty((rp.P, rp.K, rp.NB, rp.WP), dtype=f32, device=dev)
    grid = (rp.P,)
    c3 = k._row_bwd_kernel[grid](
        x.u, x.delta, x.opt(x.z), dout, x.A, x.B, x.C, x.opt(x.D), x.opt(x.bias), x.opt(ck), x.opt(lk), stash,
        du, dd, x.opt(dz), dA, x.opt(dD), x.opt(dbias), dB, dC,
        *common, rp.n_seg, units,
        *x.u.stride(), *x.delta.stride(), *x.z_strides(), *dout.stride(), *x.bc_strides(),
        HAS_D=x.D is not None, HAS_Z=x.z is not None, SEQ=rp.seq_bwd, **_row_flags(x, rp, softplus),
        num_warps=rp.bwd_warps,
    )
    _log(f"row_bwd(K={rp.K},P={rp.P},seq={rp.seq_bwd})", c3, grid)
    del stash, lk  # back to the allocator (stream-ordered) before the sums below allocate
    dA = _sum_partials(dA, (0, 2))
    dD = _sum_partials(dD, (0, 2)) if dD is not None else None
    dbias = _sum_partials(dbias, (0, 2, 3)) if dbias is not None else None
    if rp.G > 1:
        du, dd = du.to(x.u.dtype), dd.to(x.delta.dtype)
        dz = dz.to(x.z.dtype) if dz is not None else None
    return du, dd, dA, dB, dC, dD, dz, dbias


def _forward(x: _Args, softplus: bool, save: bool, out_dtype: torch.dtype):
    from mamba2d.ops import triton_kernels as k

    AX1, AX2 = x.AX1, 3 - x.AX1
    c1 = None
    if x.tiles_along(AX1) > 1:
        c1 = _carries(k, x, None, AX1, False, softplus, x.REV1)
    c2 = x.carry_buffer(AX2) if save and x.tiles_along(AX2) > 1 else None
    y = _alloc((x.batch, x.dim, x.L), out_dtype, x.u.device)
    grid = (x.batch * x.dim, x.lines_across(AX2))
    ck = k._fwd_kernel[grid](
        x.u, x.delta, x.opt(x.z), x.A, x.B, x.C, x.opt(x.D), x.opt(x.bias), x.opt(c1), x.opt(c2), y,
        x.dim, x.N, x.H, x.W, x.plan.NBH, x.plan.NBW, x.per_group, x.tiles_along(AX2),
        *x.u.stride(), *x.delta.stride(), *x.z_strides(), *x.bc_strides(),
        AX1=AX1, REV1=x.REV1, REV2=x.REV2, HAS_D=x.D is not None, HAS_Z=x.z is not None,
        HAS_C1=c1 is not None, SAVE_C2=c2 is not None, **x.flags(softplus),
    )
    _log("fwd", ck, grid)
    ch, cv = (c1, c2) if AX1 == 2 else (c2, c1)
    return y, ch, cv


def _backward(x: _Args, softplus: bool, dout: torch.Tensor, ch, cv):
    from mamba2d.ops import triton_kernels as k

    AX1, AX2 = x.AX1, 3 - x.AX1
    p = x.plan
    l2 = None
    if x.tiles_along(AX2) > 1:
        l2 = _carries(k, x, dout, AX2, True, softplus, x.REV2)
    # The first pass's adjoint carries are handed along inside the backward kernel itself,
    # which then walks each line of tiles along the first pass's axis (SWEEP).
    sweep = x.tiles_along(AX1) > 1
    l1 = None
    if sweep:
        shape = (x.batch * x.dim, x.N, x.H, 1) if AX1 == 2 else (x.batch * x.dim, x.N, 1, x.W)
        l1 = torch.zeros(shape, dtype=torch.float32, device=x.u.device)
    lh, lv = (l1, l2) if AX1 == 2 else (l2, l1)

    dev = x.u.device
    lines = x.lines_across(AX1) if sweep else p.n_tiles
    CB = _channels_per_program(x.per_group, lines * x.batch, 2 * 4 * x.batch * x.groups * x.N * x.L)
    parts = x.per_group // CB
    du = _alloc((x.batch, x.dim, x.L), x.u.dtype, dev)
    dd = _alloc((x.batch, x.dim, x.L), x.delta.dtype, dev)
    dz = _alloc((x.batch, x.dim, x.L), x.z.dtype, dev) if x.z is not None else None
    f32 = torch.float32
    dA = _alloc((x.batch, p.n_tiles, x.dim, x.N), f32, dev)
    dD = _alloc((x.batch, p.n_tiles, x.dim), f32, dev) if x.D is not None else None
    dbias = _alloc((x.batch, p.n_tiles, x.dim), f32, dev) if x.bias is not None else None
    dB = _alloc((parts, x.batch, x.groups, x.N, x.L), f32, dev)
    dC = _alloc((parts, x.batch, x.groups, x.N, x.L), f32, dev)
    grid = (lines, x.dim // CB, x.batch)
    ck = k._bwd_kernel[grid](
        x.u, x.delta, x.opt(x.z), dout, x.A, x.B, x.C, x.opt(x.D), x.opt(x.bias),
        x.opt(ch), x.opt(cv), x.opt(lh), x.opt(lv),
        du, dd, x.opt(dz), dA, x.opt(dD), x.opt(dbias), dB, dC,
        x.dim, x.N, x.H, x.W, p.NBH, p.NBW, x.per_group, CB, p.n_tiles, x.tiles_along(AX1) if sweep else 1,
        *x.u.stride(), *x.delta.stride(), *x.z_strides(), *dout.stride(), *x.bc_strides(),
        AX1=AX1, REV1=x.REV1, REV2=x.REV2, ADJ_REV1=not x.REV1, ADJ_REV2=not x.REV2,
        HAS_D=x.D is not None, HAS_Z=x.z is not None,
        HAS_H_CARRY=p.NBW > 1, HAS_V_CARRY=p.NBH > 1, RELOAD_BC=RELOAD_BC, SWEEP=sweep,
        **x.flags(softplus),
    )
    _log(f"bwd(CB={CB})", ck, grid)
    dA = dA.sum(dim=(0, 1))
    dD = dD.sum(dim=(0, 1)) if dD is not None else None
    dbias = dbias.sum(dim=(0, 1)) if dbias is not None else None
    dB = dB.sum(dim=0) if parts > 1 else dB[0]
    dC = dC.sum(dim=0) if parts > 1 else dC[0]
    return du, dd, dA, dB, dC, dD, dz, dbias


class _TritonScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout, out_dtype, tile_elems):
        x = _Args(u, delta, A, B, C, D, z, delta_bias, layout, tile_elems)
        save = any(ctx.needs_input_grad[:8])  # only then keep the second-pass carries
        if x.rows is not None:
            y, ck = _row_forward(x, x.rows, delta_softplus, save, out_dtype)
            ch, cv = ck, None
        else:
            y, ch, cv = _forward(x, delta_softplus, save, out_dtype)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ch, cv)
        ctx.delta_softplus = delta_softplus
        ctx.layout = layout
        ctx.tile_elems = tile_elems
        return y

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, ch, cv = ctx.saved_tensors
        x = _Args(u, delta, A, B, C, D, z, delta_bias, ctx.layout, ctx.tile_elems)
        if x.rows is not None:
            du, dd, dA, dB, dC, dD, dz, dbias = _row_backward(x, x.rows, ctx.delta_softplus, dout, ch)
        else:
            du, dd, dA, dB, dC, dD, dz, dbias = _backward(x, ctx.delta_softplus, dout, ch, cv)

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return (du, dd, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, delta_bias),
                None, None, None, None)


def selective_scan_2d_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout: ScanLayout,
                             tile_elems: int | None = None):
    """Triton backend; B and C arrive as (batch, groups, dstate, L). See ``selective_scan_2d``."""
    dstate = A.shape[1]
    if dstate <= MAX_STATES_PER_LAUNCH:
        return _TritonScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), layout,
                                   u.dtype, tile_elems)
    # The scan is a sum over states: run groups of states and add their float32 outputs.
    y = None
    for n0 in range(0, dstate, MAX_STATES_PER_LAUNCH):
        sl = slice(n0, min(dstate, n0 + MAX_STATES_PER_LAUNCH))
        part = _TritonScanFn.apply(u, delta, A[:, sl], B[:, :, sl], C[:, :, sl], None, None, delta_bias,
                                   bool(delta_softplus), layout, torch.float32, tile_elems)
        y = part if y is None else y + part
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    return y.to(u.dtype)


__all__ = ["plan_rows", "plan_tiles", "selective_scan_2d_triton", "triton_available"]
