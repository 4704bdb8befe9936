"""Triton kernels of the 2D selective scan (forward and backward), fused and tiled.

Notation. The grid is cut into tiles of TH x TW cells; a program holds a tile for NB states at
once as a [NB, TH, TW] register block. Axis 2 of that block is the horizontal grid axis (W),
axis 1 the vertical one (H). ``AX1`` / ``AX2`` are the axes of the first and second pass
(2 then 1 by default; 1 then 2 with ``transpose``). ``REV1`` / ``REV2`` say that a pass runs
toward lower indices (``flip_h`` / ``flip_v``).

Per state and pass, a recurrence s[t] = a[t] s[t-1] + x[t] crosses tile borders only through
one number per line: the state entering the tile ("carry"). Carries are
(batch, dim, dstate, H, n_tile_cols) and (batch, dim, dstate, n_tile_rows, W) float32 arrays
(1/TW and 1/TH of the state's size):
- ``CH`` holds carries of the horizontal pass, ``CV`` of the vertical pass (forward states);
- ``LH`` / ``LV`` hold the same for the adjoint recurrences of the backward.
The tile interiors, (batch, dim, dstate, H, W) in size, never leave registers.

Kernels:
- ``_carry_kernel``: sweeps tiles along one axis and writes the carries entering every tile:
  the forward's first-pass carries, and the backward's second-pass adjoint carries.
- ``_fwd_kernel``: sweeps tiles along the second pass's axis, running both passes with the
  first-pass carries read from ``_carry_kernel``, and writes y (and the second-pass carries
  when the backward will need them).
- ``_bwd_kernel``: one program per line of tiles along the first pass (or per tile when one
  tile spans that axis) and chunk of channels. Recomputes the states from the saved carries,
  runs both adjoint passes (handing the first pass's adjoint carry from tile to tile), writes
  du, ddelta, dz and partial sums of dA, dD, ddelta_bias, and of dB, dC over its channels.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) comes first in scan order: the composition of s -> a1 s + x1, then a2 s + x2.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    # Accurate at both ends: exp(x) for x << 0, x for x >> 0.
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _scan(a, x, AXIS: tl.constexpr, REV: tl.constexpr):
    """Inclusive scan of s = a s_prev + x along AXIS; returns (prod of a so far, s)."""
    return tl.associative_scan((a, x), AXIS, _combine, reverse=REV)


@triton.jit
def _scan_with_carry(dec, x, AXIS: tl.constexpr, REV: tl.constexpr, h_ptr, v_ptr, h_off, v_off, kh, kv,
                     HAS_H: tl.constexpr, HAS_V: tl.constexpr):
    """``_scan`` along AXIS plus the carry entering the tile: from ``h_ptr`` for the horizontal
    axis, from ``v_ptr`` for the vertical one (when that axis has more than one tile)."""
    prod, s = _scan(dec, x, AXIS, REV)
    if AXIS == 2:
        if HAS_H:
            s = s + prod * tl.load(h_ptr + h_off, mask=kh, other=0.0)
    else:
        if HAS_V:
            s = s + prod * tl.load(v_ptr + v_off, mask=kv, other=0.0)
    return s


@triton.jit
def _last(t, AXIS: tl.constexpr, SIZE: tl.constexpr, REV: tl.constexpr):
    """The element of [NB, TH, TW] block ``t`` that a scan along AXIS visits last; AXIS dropped."""
    idx = tl.arange(0, SIZE)
    if AXIS == 1:
        sel = idx[None, :, None]
    else:
        sel = idx[None, None, :]
    if REV:
        t = tl.where(sel == 0, t, 0.0)
    else:
        t = tl.where(sel == SIZE - 1, t, 0.0)
    return tl.sum(t, axis=AXIS)


@triton.jit
def _carry_offsets(n, ii, jj, r, s, N, H, W, NBH, NBW, AXIS: tl.constexpr):
    """Offsets and mask of the carries entering tile (r, s) for a pass along AXIS.

    AXIS 2 (horizontal): array (N, H, NBW), block [NB, TH, 1].
    AXIS 1 (vertical): array (N, NBH, W), block [NB, 1, TW].
    """
    if AXIS == 2:
        off = (n[:, None, None] * H + ii[None, :, None]) * NBW + s
        mask = (n[:, None, None] < N) & (ii[None, :, None] < H)
    else:
        off = (n[:, None, None] * NBH + r) * W + jj[None, None, :]
        mask = (n[:, None, None] < N) & (jj[None, None, :] < W)
    return off, mask


@triton.jit
def _channel_params(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS: tl.constexpr):
    """Channel c's A row times log2(e) (decays are exp2(Δ · that)) and its Δ bias (0 if none)."""
    a2 = tl.load(A_ptr + c * s_Ad + n * s_An, mask=nmask, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c).to(tl.float32)
    return a2, bias


@triton.jit
def _sweep_tile(line, step, n_steps, AXIS: tl.constexpr, REV: tl.constexpr):
    """(tile row, tile column) visited at ``step`` by a program walking line ``line`` along AXIS."""
    k = n_steps - 1 - step if REV else step
    if AXIS == 2:
        return line, k
    return k, line


@triton.jit
def _tile_cells(r, s, H, W, nmask, TH: tl.constexpr, TW: tl.constexpr):
    """Rows, columns, [TH, TW] mask, flat cell index and [NB, TH, TW] mask of tile (r, s)."""
    ii = r * TH + tl.arange(0, TH)
    cols = tl.arange(0, TW)
    # The same numbers, written so that the compiler sees runs of at most 4 contiguous cells:
    # 16-byte fp32 loads either way, and fp16/bf16 tiles get the fp32 register layout instead of
    # 8-wide runs (measured slower for the scans).
    jj = s * TW + (cols // 4) * 4 + cols % 4
    m2 = (ii[:, None] < H) & (jj[None, :] < W)
    cell = ii[:, None] * W + jj[None, :]
    return ii, jj, m2, cell, nmask[:, None, None] & m2[None, :, :]


@triton.jit
def _load_states(ptr, b, grp, n, cell, mask, s_b, s_g, s_n, s_l):
    """A [NB, TH, TW] block of B or C (batch b, group grp) in float32; 0 outside ``mask``."""
    offs = b * s_b + grp * s_g + n[:, None, None] * s_n + cell[None, :, :] * s_l
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _delta(d_ptr, off, mask, bias, SOFTPLUS: tl.constexpr):
    """Δ on a [TH, TW] tile: returns (Δ after bias and softplus, Δ before softplus)."""
    raw = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        return _softplus(raw), raw
    return raw, raw


@triton.jit
def _neighbour_decay(d_ptr, ii, jj, H, W, s_l, bias, a2, AXIS: tl.constexpr, REV: tl.constexpr,
                     SOFTPLUS: tl.constexpr):
    """Decay of each cell's successor along AXIS in forward scan order ([NB, TH, TW]).

    The adjoint of s[t] = a[t] s[t-1] + x[t] runs backwards with the successor's decay.
    Outside the grid it is 0, so nothing enters from beyond the edge.
    """
    step = -1 if REV else 1
    if AXIS == 2:
        i2 = ii[:, None]
        j2 = jj[None, :] + step
    else:
        i2 = ii[:, None] + step
        j2 = jj[None, :]
    m = (i2 >= 0) & (i2 < H) & (j2 >= 0) & (j2 < W)
    dt, _ = _delta(d_ptr, (i2 * W + j2) * s_l, m, bias, SOFTPLUS)
    return tl.where(m[None, :, :], tl.exp2(dt[None, :, :] * a2[:, None, None]), 0.0)


@triton.jit
def _carry_kernel(
    u_ptr, d_ptr, dout_ptr, z_ptr, A_ptr, Bm_ptr, Cm_ptr, bias_ptr,
    out_ptr,
    dim, N, H, W, NBH, NBW, per_group, n_steps,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    AXIS: tl.constexpr, REV: tl.constexpr, FWD_REV: tl.constexpr, ADJOINT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Write the carries entering every tile of one line of tiles along AXIS.

    Forward (ADJOINT=0): the first pass's recurrence of x = Δ B u with decays a.
    Adjoint (ADJOINT=1): the backward recurrence of x = C dy with the successor's decays,
    run against the forward direction (REV is then the adjoint's own direction, FWD_REV the
    forward's).
    Grid: (batch * dim, number of tile lines across AXIS).
    """
    bc = tl.program_id(0)
    line = tl.program_id(1)
    b = bc // dim
    c = bc % dim
    grp = c // per_group
    n = tl.arange(0, NB)
    nmask = n < N
    a2, bias = _channel_params(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
    if AXIS == 2:
        carry = tl.zeros([NB, TH], dtype=tl.float32)
    else:
        carry = tl.zeros([NB, TW], dtype=tl.float32)
    if AXIS == 2:
        carries = out_ptr + bc * N * H * NBW
    else:
        carries = out_ptr + bc * N * NBH * W
    for step in range(n_steps):
        r, s = _sweep_tile(line, step, n_steps, AXIS, REV)
        ii, jj, m2, cell, m3 = _tile_cells(r, s, H, W, nmask, TH, TW)
        if ADJOINT:
            dy = tl.load(dout_ptr + b * s_ob + c * s_od + cell * s_ol, mask=m2, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + c * s_zd + cell * s_zl, mask=m2, other=0.0).to(tl.float32)
                dy = dy * zz / (1.0 + tl.exp(-zz))
            Cm = _load_states(Cm_ptr, b, grp, n, cell, m3, s_Cb, s_Cg, s_Cn, s_Cl)
            x = Cm * dy[None, :, :]
            dec = _neighbour_decay(d_ptr + b * s_db + c * s_dd, ii, jj, H, W, s_dl, bias, a2,
                                   AXIS, FWD_REV, SOFTPLUS)
        else:
            dt, _ = _delta(d_ptr + b * s_db + c * s_dd, cell * s_dl, m2, bias, SOFTPLUS)
            uu = tl.load(u_ptr + b * s_ub + c * s_ud + cell * s_ul, mask=m2, other=0.0).to(tl.float32)
            Bm = _load_states(Bm_ptr, b, grp, n, cell, m3, s_Bb, s_Bg, s_Bn, s_Bl)
            x = Bm * (dt * uu)[None, :, :]
            dec = tl.where(m3, tl.exp2(dt[None, :, :] * a2[:, None, None]), 1.0)
        co, cm = _carry_offsets(n, ii, jj, r, s, N, H, W, NBH, NBW, AXIS)
        if AXIS == 2:
            tl.store(carries + co, carry[:, :, None], mask=cm)
        else:
            tl.store(carries + co, carry[:, None, :], mask=cm)
        prod, x = _scan(dec, x, AXIS, REV)
        if AXIS == 2:
            carry = _last(x, AXIS, TW, REV) + _last(prod, AXIS, TW, REV) * carry
        else:
            carry = _last(x, AXIS, TH, REV) + _last(prod, AXIS, TH, REV) * carry


@triton.jit
def _fwd_kernel(
    u_ptr, d_ptr, z_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, c1_ptr, c2_ptr, y_ptr,
    dim, N, H, W, NBH, NBW, per_group, n_steps,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    AX1: tl.constexpr, REV1: tl.constexpr, REV2: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_C1: tl.constexpr, SAVE_C2: tl.constexpr,
):
    """Both passes, the C contraction, the D skip and the z gate for one line of tiles.

    The program walks its line of tiles in the second pass's direction, keeping that pass's
    carry in registers (and writing it to ``c2_ptr`` when SAVE_C2). First-pass carries come from
    ``c1_ptr`` (HAS_C1; absent when one tile spans the whole first axis). y is written
    contiguous (batch, dim, L) in float32 or the pointer's dtype.
    Grid: (batch * dim, number of tile lines across the second pass's axis).
    """
    AX2: tl.constexpr = 3 - AX1
    bc = tl.program_id(0)
    line = tl.program_id(1)
    b = bc // dim
    c = bc % dim
    grp = c // per_group
    n = tl.arange(0, NB)
    nmask = n < N
    a2, bias = _channel_params(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
    dskip = 0.0
    if HAS_D:
        dskip = tl.load(D_ptr + c).to(tl.float32)
    if AX2 == 2:
        carry = tl.zeros([NB, TH], dtype=tl.float32)
        c1 = c1_ptr + bc * N * NBH * W
        c2 = c2_ptr + bc * N * H * NBW
    else:
        carry = tl.zeros([NB, TW], dtype=tl.float32)
        c1 = c1_ptr + bc * N * H * NBW
        c2 = c2_ptr + bc * N * NBH * W
    for step in range(n_steps):
        r, s = _sweep_tile(line, step, n_steps, AX2, REV2)
        ii, jj, m2, cell, m3 = _tile_cells(r, s, H, W, nmask, TH, TW)
        dt, _ = _delta(d_ptr + b * s_db + c * s_dd, cell * s_dl, m2, bias, SOFTPLUS)
        uu = tl.load(u_ptr + b * s_ub + c * s_ud + cell * s_ul, mask=m2, other=0.0).to(tl.float32)
        Bm = _load_states(Bm_ptr, b, grp, n, cell, m3, s_Bb, s_Bg, s_Bn, s_Bl)
        dec = tl.where(m3, tl.exp2(dt[None, :, :] * a2[:, None, None]), 1.0)
        prod, g = _scan(dec, Bm * (dt * uu)[None, :, :], AX1, REV1)
        if HAS_C1:
            o1, k1 = _carry_offsets(n, ii, jj, r, s, N, H, W, NBH, NBW, AX1)
            g = g + prod * tl.load(c1 + o1, mask=k1, other=0.0)
        prod, h = _scan(dec, g, AX2, REV2)
        if AX2 == 2:
            h = h + prod * carry[:, :, None]
        else:
            h = h + prod * carry[:, None, :]
        if SAVE_C2:
            o2, k2 = _carry_offsets(n, ii, jj, r, s, N, H, W, NBH, NBW, AX2)
            if AX2 == 2:
                tl.store(c2 + o2, carry[:, :, None], mask=k2)
            else:
                tl.store(c2 + o2, carry[:, None, :], mask=k2)
        if AX2 == 2:
            carry = _last(h, AX2, TW, REV2)
        else:
            carry = _last(h, AX2, TH, REV2)
        Cm = _load_states(Cm_ptr, b, grp, n, cell, m3, s_Cb, s_Cg, s_Cn, s_Cl)
        y = tl.sum(Cm * h, axis=0)
        if HAS_D:
            y = y + dskip * uu
        if HAS_Z:
            zz = tl.load(z_ptr + b * s_zb + c * s_zd + cell * s_zl, mask=m2, other=0.0).to(tl.float32)
            y = y * zz / (1.0 + tl.exp(-zz))
        tl.store(y_ptr + bc * H * W + cell, y, mask=m2)


@triton.jit
def _bwd_kernel(
    u_ptr, d_ptr, z_ptr, dout_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr,
    ch_ptr, cv_ptr, lh_ptr, lv_ptr,
    du_ptr, dd_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, N, H, W, NBH, NBW, per_group, CB, n_tiles, n_steps,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    AX1: tl.constexpr, REV1: tl.constexpr, REV2: tl.constexpr,
    ADJ_REV1: tl.constexpr, ADJ_REV2: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H_CARRY: tl.constexpr, HAS_V_CARRY: tl.constexpr, RELOAD_BC: tl.constexpr, SWEEP: tl.constexpr,
):
    """Gradients of one tile for a chunk of CB channels that share one B/C group.

    ``ch``/``cv``: forward carries of the horizontal / vertical pass; ``lh``/``lv``: adjoint
    carries. Forward carries and the second pass's adjoint carries are read from memory. The first
    pass's adjoint carries too, unless SWEEP: then the program walks its line of tiles along the
    first pass's axis in the adjoint direction and hands that carry from tile to tile through a
    small zero-initialised scratch (``lh`` or ``lv``: (batch * dim, N, H, 1) or
    (batch * dim, N, 1, W)), so no separate carry kernel is needed for it. Outputs: du, ddelta, dz
    (contiguous (batch, dim, L)); dA (batch, n_tiles, dim, N), dD and dbias (batch, n_tiles, dim)
    as per-tile partial sums; dB and dC (n_chunks_per_group, batch, groups, N, L) as per-chunk
    partial sums, all float32.
    Grid: (n_tiles, dim // CB, batch), or with SWEEP (lines of tiles across AX1, dim // CB, batch).
    """
    AX2: tl.constexpr = 3 - AX1
    line = tl.program_id(0)
    chunk = tl.program_id(1)
    b = tl.program_id(2)
    batch = tl.num_programs(2)
    c0 = chunk * CB
    grp = c0 // per_group
    part = (c0 % per_group) // CB
    groups = dim // per_group
    L = H * W

    n = tl.arange(0, NB)
    nmask = n < N
    for step in range(n_steps):
        if SWEEP:
            r, s = _sweep_tile(line, step, n_steps, AX1, ADJ_REV1)
        else:
            r = line // NBW
            s = line % NBW
        tile = r * NBW + s
        ii, jj, m2, cell, m3 = _tile_cells(r, s, H, W, nmask, TH, TW)
        Bm = _load_states(Bm_ptr, b, grp, n, cell, m3, s_Bb, s_Bg, s_Bn, s_Bl)
        Cm = _load_states(Cm_ptr, b, grp, n, cell, m3, s_Cb, s_Cg, s_Cn, s_Cl)
        oh, kh = _carry_offsets(n, ii, jj, r, s, N, H, W, NBH, NBW, 2)
        ov, kv = _carry_offsets(n, ii, jj, r, s, N, H, W, NBH, NBW, 1)
        dB_acc = tl.zeros([NB, TH, TW], dtype=tl.float32)
        dC_acc = tl.zeros([NB, TH, TW], dtype=tl.float32)

        for c in range(c0, c0 + CB):
            if RELOAD_BC:
                # Re-read (from L1/L2) rather than hold: frees registers for the scans.
                Bm = _load_states(Bm_ptr, b, grp, n, cell, m3, s_Bb, s_Bg, s_Bn, s_Bl)
                Cm = _load_states(Cm_ptr, b, grp, n, cell, m3, s_Cb, s_Cg, s_Cn, s_Cl)
            bc = b * dim + c
            a_row = tl.load(A_ptr + c * s_Ad + n * s_An, mask=nmask, other=0.0).to(tl.float32)
            a2 = a_row * 1.4426950408889634
            bias = 0.0
            if HAS_BIAS:
                bias = tl.load(bias_ptr + c).to(tl.float32)
            d_base = d_ptr + b * s_db + c * s_dd
            dt, raw = _delta(d_base, cell * s_dl, m2, bias, SOFTPLUS)
            uu = tl.load(u_ptr + b * s_ub + c * s_ud + cell * s_ul, mask=m2, other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + b * s_ob + c * s_od + cell * s_ol, mask=m2, other=0.0).to(tl.float32)
            dec = tl.where(m3, tl.exp2(dt[None, :, :] * a2[:, None, None]), 1.0)
            x = Bm * (dt * uu)[None, :, :]
            h_off = bc * N * H * NBW + oh
            v_off = bc * N * NBH * W + ov

            # Forward states, from the carries saved by the forward.
            g = _scan_with_carry(dec, x, AX1, REV1, ch_ptr, cv_ptr, h_off, v_off, kh, kv,
                                 HAS_H_CARRY, HAS_V_CARRY)
            h = _scan_with_carry(dec, g, AX2, REV2, ch_ptr, cv_ptr, h_off, v_off, kh, kv,
                                 HAS_H_CARRY, HAS_V_CARRY)

            # Gradient reaching y through the gate, and the gate's own gradient.
            out_off = (b * dim + c) * L + cell
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + c * s_zd + cell * s_zl, mask=m2, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-zz))
                y = tl.sum(Cm * h, axis=0)
                if HAS_D:
                    y = y + tl.load(D_ptr + c).to(tl.float32) * uu
                tl.store(dz_ptr + out_off, dout * y * sig * (1.0 + zz * (1.0 - sig)), mask=m2)
                dy = dout * zz * sig
            else:
                dy = dout

            # Adjoints: the second pass backwards, then the first pass backwards.
            dec_n = _neighbour_decay(d_base, ii, jj, H, W, s_dl, bias, a2, AX2, REV2, SOFTPLUS)
            lam2 = _scan_with_carry(dec_n, Cm * dy[None, :, :], AX2, ADJ_REV2, lh_ptr, lv_ptr, h_off, v_off,
                                    kh, kv, HAS_H_CARRY, HAS_V_CARRY)
            dec_n = _neighbour_decay(d_base, ii, jj, H, W, s_dl, bias, a2, AX1, REV1, SOFTPLUS)
            if SWEEP:
                prod, lam1 = _scan(dec_n, lam2, AX1, ADJ_REV1)
                # The carry left by this program's previous tile (zeros before the first one).
                if AX1 == 2:
                    sw_ptr = lh_ptr + bc * N * H + n[:, None, None] * H + ii[None, :, None]
                    sw_mask = nmask[:, None, None] & (ii[None, :, None] < H)
                else:
                    sw_ptr = lv_ptr + bc * N * W + n[:, None, None] * W + jj[None, None, :]
                    sw_mask = nmask[:, None, None] & (jj[None, None, :] < W)
                lam1 = lam1 + prod * tl.load(sw_ptr, mask=sw_mask, other=0.0)
                tl.debug_barrier()  # every thread has read the old carry before any overwrites it
                if AX1 == 2:
                    tl.store(sw_ptr, _last(lam1, AX1, TW, ADJ_REV1)[:, :, None], mask=sw_mask)
                else:
                    tl.store(sw_ptr, _last(lam1, AX1, TH, ADJ_REV1)[:, None, :], mask=sw_mask)
                tl.debug_barrier()  # and the new carry is visible to every thread of the next tile
            else:
                lam1 = _scan_with_carry(dec_n, lam2, AX1, ADJ_REV1, lh_ptr, lv_ptr, h_off, v_off, kh, kv,
                                        HAS_H_CARRY, HAS_V_CARRY)

            # d loss / d log(decay) = a h_prev lam2 + a g_prev lam1, where a h_prev = h - g and
            # a g_prev = g - x.
            dlog = tl.where(m3, (h - g) * lam2 + (g - x) * lam1, 0.0)
            tl.store(dA_ptr + ((b * n_tiles + tile) * dim + c) * N + n,
                     tl.sum(tl.sum(dlog * dt[None, :, :], axis=2), axis=1), mask=nmask)
            lam_b = tl.sum(lam1 * Bm, axis=0)
            ddt = tl.sum(dlog * a_row[:, None, None], axis=0) + lam_b * uu
            du = lam_b * dt
            if HAS_D:
                du = du + tl.load(D_ptr + c).to(tl.float32) * dy
                tl.store(dD_ptr + (b * n_tiles + tile) * dim + c,
                         tl.sum(tl.sum(tl.where(m2, dy * uu, 0.0), axis=1), axis=0))
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-raw))
            ddt = tl.where(m2, ddt, 0.0)
            if HAS_BIAS:
                tl.store(dbias_ptr + (b * n_tiles + tile) * dim + c, tl.sum(tl.sum(ddt, axis=1), axis=0))
            tl.store(du_ptr + out_off, du, mask=m2)
            tl.store(dd_ptr + out_off, ddt, mask=m2)
            dB_acc += lam1 * (dt * uu)[None, :, :]
            dC_acc += h * dy[None, :, :]

        out = (((part * batch + b) * groups + grp) * N + n[:, None, None]) * L + cell[None, :, :]
        tl.store(dB_ptr + out, dB_acc, mask=m3)
        tl.store(dC_ptr + out, dC_acc, mask=m3)
