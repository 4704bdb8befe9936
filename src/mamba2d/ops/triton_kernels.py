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


# ---------------------------------------------------------------------------------------------
# Row-streaming kernels (v2). A program holds one grid row of one (batch, channel) for all states
# as an [NB, WP] register block (WP = W rounded up to a power of two) and walks rows in scan
# order. The vertical pass is then an elementwise running update from row to row; only the
# horizontal pass is an in-row scan:
#   default (TRANSPOSE=0): g = hscan(a, x) in the row, run = a * run + g  (run is h);
#   TRANSPOSE=1:           run = a * run + x  (run is g),    h = hscan(a, run).
# ``run`` is the only state carried between rows, so the rows split into segments of K rows
# (scan steps) joined by one [N, W] state each, as in a two-level scan:
#   - ``_row_fwd_sum_kernel`` runs each segment from a zero state and stores its end state; over
#     K rows the map is run_out = P * run_in + Q with P = exp2(A log2(e) * sum of Δ) per column,
#     so only Q and the column sums of Δ are kept;
#   - ``_row_combine_kernel`` chains the segments (a short serial loop per (item, state)), turning
#     Q into the state entering each segment: the checkpoints the backward keeps;
#   - ``_row_fwd_kernel`` runs every segment from its checkpoint and writes y.
# With one segment per forward program instead (many (batch, channel) items), the forward walks
# all rows and writes the checkpoints on its way.
# The backward does the same for the adjoint of ``run`` (``_row_adj_sum_kernel`` and the combine
# in reverse), then ``_row_bwd_kernel`` takes (item, segment) units: it recomputes the segment's
# running states from its checkpoint into a per-program stash, walks back through the segment
# with both adjoints, writes du, ddelta, dz and per-unit sums of dA, dD, ddelta_bias, and adds dB
# and dC over channels with float32 atomics.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_cells(i, W, WP: tl.constexpr):
    """Columns, column mask and flat cell index of grid row i."""
    cols = tl.arange(0, WP)
    jj = tl.max_contiguous(tl.multiple_of(cols, 4), 4)  # runs of 4 contiguous cells (see _tile_cells)
    mcol = jj < W
    return jj, mcol, i * W + jj


@triton.jit
def _row_inputs(d_row, u_row, B_row, jj, mcol, n, nmask, a2, bias, s_dl, s_ul, s_Bn, s_Bl,
                SOFTPLUS: tl.constexpr):
    """One row's Δ (after bias/softplus), raw Δ, u, decays a [NB, WP] and B [NB, WP].

    Outside the grid a = 1 and B = 0, so padded columns and absent states hold zeros.
    """
    dt, raw = _delta(d_row, jj * s_dl, mcol, bias, SOFTPLUS)
    uu = tl.load(u_row + jj * s_ul, mask=mcol, other=0.0).to(tl.float32)
    m2 = nmask[:, None] & mcol[None, :]
    Bm = tl.load(B_row + n[:, None] * s_Bn + jj[None, :] * s_Bl, mask=m2, other=0.0).to(tl.float32)
    a = tl.where(m2, tl.exp2(dt[None, :] * a2[:, None]), 1.0)
    return dt, raw, uu, a, Bm, m2


@triton.jit
def _row_scan(a, x, REV: tl.constexpr):
    _, s = tl.associative_scan((a, x), 1, _combine, reverse=REV)
    return s


@triton.jit
def _row_item(ig, dim, per_group, N, G: tl.constexpr, NB: tl.constexpr):
    """Split ig = item * G + group: (item = batch * dim + channel, group, batch, channel, B/C group,
    the group's state indices [NB] and their mask)."""
    bc = ig // G
    sg = ig % G
    c = bc % dim
    n = sg * NB + tl.arange(0, NB)
    return bc, sg, bc // dim, c, c // per_group, n, n < N


@triton.jit
def _advance(run, a, x, TRANSPOSE: tl.constexpr, REV_H: tl.constexpr):
    """The running (vertical-pass) state after one more row: a * run + x (TRANSPOSE, the vertical
    pass first) or a * run + hscan(a, x) (the horizontal pass first)."""
    if TRANSPOSE:
        return a * run + x
    return a * run + _row_scan(a, x, REV_H)


@triton.jit
def _row_of(step, H, REV_V: tl.constexpr):
    return H - 1 - step if REV_V else step


@triton.jit
def _row_dy(dout_ptr, z_ptr, b, c, cell, mcol, s_ob, s_od, s_ol, s_zb, s_zd, s_zl, HAS_Z: tl.constexpr):
    """Upstream gradient of y on one row (through the gate): (dy, dout, z)."""
    dout = tl.load(dout_ptr + b * s_ob + c * s_od + cell * s_ol, mask=mcol, other=0.0).to(tl.float32)
    zz = dout
    dy = dout
    if HAS_Z:
        zz = tl.load(z_ptr + b * s_zb + c * s_zd + cell * s_zl, mask=mcol, other=0.0).to(tl.float32)
        dy = dout * zz / (1.0 + tl.exp(-zz))
    return dy, dout, zz


@triton.jit
def _succ_decay(d_row, jj, W, s_dl, bias, a2, nmask, REV_H: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Decay of each cell's successor along the row in the horizontal pass (0 past the edge)."""
    if REV_H:
        js = jj - 1
    else:
        js = jj + 1
    ms = (js >= 0) & (js < W)
    dts, raws = _delta(d_row, js * s_dl, ms, bias, SOFTPLUS)
    return tl.where(nmask[:, None] & ms[None, :], tl.exp2(dts[None, :] * a2[:, None]), 0.0)


@triton.jit
def _row_fwd_sum_kernel(
    u_ptr, d_ptr, A_ptr, Bm_ptr, bias_ptr, q_ptr, sdt_ptr,
    dim, N, H, W, per_group, n_seg,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Bb, s_Bg, s_Bn, s_Bl, s_Ad, s_An,
    NB: tl.constexpr, WP: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
    TRANSPOSE: tl.constexpr, REV_H: tl.constexpr, REV_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """End state of segment ``seg`` run from zero (into q slot seg) and its column sums of Δ.

    q: (items, n_seg - 1, N, W); sdt: (items, n_seg, WP). Grid: (items * G, n_seg - 1): G groups
    of NB states per item.
    """
    bc, sg, b, c, grp, n, nmask = _row_item(tl.program_id(0), dim, per_group, N, G, NB)
    seg = tl.program_id(1)
    a2, bias = _channel_params(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
    d_base = d_ptr + b * s_db + c * s_dd
    u_base = u_ptr + b * s_ub + c * s_ud
    B_base = Bm_ptr + b * s_Bb + grp * s_Bg
    run = tl.zeros([NB, WP], dtype=tl.float32)
    sdt = tl.zeros([WP], dtype=tl.float32)
    jj = tl.arange(0, WP)
    for step in range(seg * K, tl.minimum(seg * K + K, H)):
        i = _row_of(step, H, REV_V)
        jj, mcol, cell = _row_cells(i, W, WP)
        dt, raw, uu, a, Bm, m2 = _row_inputs(d_base + i * W * s_dl, u_base + i * W * s_ul,
                                             B_base + i * W * s_Bl, jj, mcol, n, nmask, a2, bias,
                                             s_dl, s_ul, s_Bn, s_Bl, SOFTPLUS)
        run = _advance(run, a, Bm * (dt * uu)[None, :], TRANSPOSE, REV_H)
        sdt += dt
    mk = nmask[:, None] & (jj < W)[None, :]
    tl.store(q_ptr + ((bc * (n_seg - 1) + seg) * N + n[:, None]) * W + jj[None, :], run, mask=mk)
    tl.store(sdt_ptr + (bc * n_seg + seg) * WP + jj, sdt)


@triton.jit
def _row_adj_sum_kernel(
    d_ptr, z_ptr, dout_ptr, A_ptr, Cm_ptr, bias_ptr, q_ptr, sdt_ptr,
    dim, N, H, W, per_group, n_seg,
    s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, WP: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
    TRANSPOSE: tl.constexpr, REV_H: tl.constexpr, REV_V: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Adjoint of ``run`` leaving segment ``seg`` upwards (a of its first row times the adjoint
    there), run from zero below it, into q slot seg - 1; and the segment's column sums of Δ.

    q: (items, n_seg - 1, N, W); sdt: (items, n_seg, WP). Grid: (items * G, n_seg - 1),
    seg = 1 + pid.
    """
    bc, sg, b, c, grp, n, nmask = _row_item(tl.program_id(0), dim, per_group, N, G, NB)
    seg = tl.program_id(1) + 1
    a2, bias = _channel_params(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
    d_base = d_ptr + b * s_db + c * s_dd
    C_base = Cm_ptr + b * s_Cb + grp * s_Cg
    lam = tl.zeros([NB, WP], dtype=tl.float32)
    a = tl.zeros([NB, WP], dtype=tl.float32)
    sdt = tl.zeros([WP], dtype=tl.float32)
    s0 = seg * K
    s1 = tl.minimum(s0 + K, H)
    jj = tl.arange(0, WP)
    for sb in range(s1 - s0):
        i = _row_of(s1 - 1 - sb, H, REV_V)
        jj, mcol, cell = _row_cells(i, W, WP)
        m2 = nmask[:, None] & mcol[None, :]
        dt, raw = _delta(d_base + i * W * s_dl, jj * s_dl, mcol, bias, SOFTPLUS)
        dy, dout, zz = _row_dy(dout_ptr, z_ptr, b, c, cell, mcol, s_ob, s_od, s_ol, s_zb, s_zd, s_zl, HAS_Z)
        Cm = tl.load(C_base + n[:, None] * s_Cn + cell[None, :] * s_Cl, mask=m2, other=0.0).to(tl.float32)
        src = Cm * dy[None, :]
        if TRANSPOSE:
            a_h = _succ_decay(d_base + i * W * s_dl, jj, W, s_dl, bias, a2, nmask, REV_H, SOFTPLUS)
            src = _row_scan(a_h, src, not REV_H)
        lam = src + a * lam  # a: decay of the row below (visited before this one)
        a = tl.where(m2, tl.exp2(dt[None, :] * a2[:, None]), 1.0)
        sdt += dt
    mk = nmask[:, None] & (jj < W)[None, :]
    tl.store(q_ptr + ((bc * (n_seg - 1) + seg - 1) * N + n[:, None]) * W + jj[None, :], a * lam, mask=mk)
    tl.store(sdt_ptr + (bc * n_seg + seg) * WP + jj, sdt)


@triton.jit
def _row_combine_kernel(q_ptr, sdt_ptr, A_ptr, dim, N, W, n_seg, s_Ad, s_An,
                        WP: tl.constexpr, ADJOINT: tl.constexpr):
    """Chain the segments of one (item, state): q slot t becomes the state entering segment t + 1
    (forward: e = P_t e + Q_t in segment order) or the adjoint entering segment t from below
    (ADJOINT: e = P_(t+1) e + Q_(t+1) from the bottom), with P_s = exp2(A log2(e) * column sums
    of Δ over segment s). Grid: (items, N).
    """
    bc = tl.program_id(0)
    nn = tl.program_id(1)
    c = bc % dim
    a2 = tl.load(A_ptr + c * s_Ad + nn * s_An).to(tl.float32) * 1.4426950408889634
    jj = tl.arange(0, WP)
    m = jj < W
    e = tl.zeros([WP], dtype=tl.float32)
    for k in range(n_seg - 1):
        t = n_seg - 2 - k if ADJOINT else k
        P = tl.exp2(a2 * tl.load(sdt_ptr + (bc * n_seg + t + ADJOINT) * WP + jj))
        off = ((bc * (n_seg - 1) + t) * N + nn) * W + jj
        e = P * e + tl.load(q_ptr + off, mask=m, other=0.0)
        tl.store(q_ptr + off, e, mask=m)


@triton.jit
def _row_fwd_kernel(
    u_ptr, d_ptr, z_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, ck_ptr, y_ptr,
    dim, N, H, W, per_group, n_ckpt,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, WP: tl.constexpr, K: tl.constexpr, KF: tl.constexpr, G: tl.constexpr,
    TRANSPOSE: tl.constexpr, REV_H: tl.constexpr, REV_V: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    LOAD_START: tl.constexpr, SAVE: tl.constexpr,
):
    """y for scan steps [seg * KF, seg * KF + KF) of one (batch, channel).

    LOAD_START: the state entering the segment is checkpoint seg - 1 (from _row_combine_kernel).
    SAVE: write checkpoint s, the state after step (s + 1) * K - 1, on the way (one segment).
    Checkpoints are (batch * dim, n_ckpt, N, W) float32; y is (batch, dim, L) contiguous. With
    G > 1 groups of NB states each program adds its group's share into a zeroed float32 y
    (the D skip in group 0); the gate is linear in y, so each share is gated.
    Grid: (batch * dim * G, number of segments).
    """
    bc, sg, b, c, grp, n, nmask = _row_item(tl.program_id(0), dim, per_group, N, G, NB)
    seg = tl.program_id(1)
    a2, bias = _channel_params(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
    dskip = 0.0
    if HAS_D:
        dskip = tl.where(sg == 0, tl.load(D_ptr + c).to(tl.float32), 0.0)
    d_base = d_ptr + b * s_db + c * s_dd
    u_base = u_ptr + b * s_ub + c * s_ud
    B_base = Bm_ptr + b * s_Bb + grp * s_Bg
    C_base = Cm_ptr + b * s_Cb + grp * s_Cg
    jj0, mcol0, cell0 = _row_cells(0, W, WP)
    mk = nmask[:, None] & mcol0[None, :]
    run = tl.zeros([NB, WP], dtype=tl.float32)
    if LOAD_START:
        if seg > 0:
            run = tl.load(ck_ptr + ((bc * n_ckpt + seg - 1) * N + n[:, None]) * W + jj0[None, :], mask=mk,
                          other=0.0)
    for step in range(seg * KF, tl.minimum(seg * KF + KF, H)):
        i = _row_of(step, H, REV_V)
        jj, mcol, cell = _row_cells(i, W, WP)
        dt, raw, uu, a, Bm, m2 = _row_inputs(d_base + i * W * s_dl, u_base + i * W * s_ul,
                                             B_base + i * W * s_Bl, jj, mcol, n, nmask, a2, bias,
                                             s_dl, s_ul, s_Bn, s_Bl, SOFTPLUS)
        x = Bm * (dt * uu)[None, :]
        if TRANSPOSE:
            run = a * run + x
            h = _row_scan(a, run, REV_H)
        else:
            run = a * run + _row_scan(a, x, REV_H)
            h = run
        if SAVE:
            if step % K == K - 1:
                if step // K < n_ckpt:
                    off = ((bc * n_ckpt + step // K) * N + n[:, None]) * W + jj[None, :]
                    tl.store(ck_ptr + off, run, mask=m2)
        Cm = tl.load(C_base + n[:, None] * s_Cn + cell[None, :] * s_Cl, mask=m2, other=0.0).to(tl.float32)
        y = tl.sum(Cm * h, axis=0)
        if HAS_D:
            y = y + dskip * uu
        if HAS_Z:
            zz = tl.load(z_ptr + b * s_zb + c * s_zd + cell * s_zl, mask=mcol, other=0.0).to(tl.float32)
            y = y * zz / (1.0 + tl.exp(-zz))
        if G > 1:
            tl.atomic_add(y_ptr + bc * H * W + cell, y, mask=mcol, sem="relaxed")
        else:
            tl.store(y_ptr + bc * H * W + cell, y, mask=mcol)


@triton.jit
def _row_bwd_kernel(
    u_ptr, d_ptr, z_ptr, dout_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, ck_ptr, lk_ptr, stash_ptr,
    du_ptr, dd_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, N, H, W, per_group, n_seg, n_units,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, WP: tl.constexpr, K: tl.constexpr,
    TRANSPOSE: tl.constexpr, REV_H: tl.constexpr, REV_V: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SEQ: tl.constexpr, G: tl.constexpr,
):
    """Backward of units taken by a persistent grid of P programs (units pid, pid + P, ...).

    SEQ: a unit is one (batch, channel) item, whose segments the program walks from the last to
    the first, carrying the adjoint in registers. Otherwise a unit is (item, segment),
    unit = item * n_seg + seg, and the adjoint entering from below comes from lk. With G > 1
    groups of NB states, "item" is (batch, channel, group) and du, ddelta, dz are float32 sums
    over the groups (atomic adds into zeroed buffers; the D terms in group 0).

    ck: forward states entering segments 1.. (items, n_seg - 1, N, W); lk: adjoints entering
    segments 0..n_seg-2 from below, already multiplied by the decay of the row below them.
    stash: (P, K, NB, WP) float32, each program's running states of its current segment.
    Writes du, ddelta, dz ((batch, dim, L) contiguous); dA (n_units, N), dD and dbias (n_units,);
    adds into dB, dC ((batch, groups, N, L) float32, zeroed).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    L = H * W
    stash = stash_ptr + pid * K * NB * WP + tl.arange(0, NB)[:, None] * WP + tl.arange(0, WP)[None, :]
    jj0, mcol0, cell0 = _row_cells(0, W, WP)
    n_segs = 1 if SEQ else n_seg  # partial sums per item and group
    for unit in range(pid, n_units, nprog):
        if SEQ:
            ig = unit
            seg_hi = n_seg
            seg_lo = 0
        else:
            ig = unit // n_seg
            seg_lo = unit % n_seg
            seg_hi = seg_lo + 1
        bc, sg, b, c, grp, n, nmask = _row_item(ig, dim, per_group, N, G, NB)
        mk = nmask[:, None] & mcol0[None, :]
        a_row = tl.load(A_ptr + c * s_Ad + n * s_An, mask=nmask, other=0.0).to(tl.float32)
        a2 = a_row * 1.4426950408889634
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c).to(tl.float32)
        dskip = 0.0
        if HAS_D:
            dskip = tl.where(sg == 0, tl.load(D_ptr + c).to(tl.float32), 0.0)
        d_base = d_ptr + b * s_db + c * s_dd
        u_base = u_ptr + b * s_ub + c * s_ud
        B_base = Bm_ptr + b * s_Bb + grp * s_Bg
        C_base = Cm_ptr + b * s_Cb + grp * s_Cg
        dBC_base = (b * (dim // per_group) + grp) * N * L
        # The adjoint of the running state entering from below, already times the decay there.
        lam = tl.zeros([NB, WP], dtype=tl.float32)
        if seg_hi < n_seg:
            lam = tl.load(lk_ptr + ((bc * (n_seg - 1) + seg_hi - 1) * N + n[:, None]) * W + jj0[None, :],
                          mask=mk, other=0.0)
        a_next = tl.full([NB, WP], 1.0, dtype=tl.float32)
        dA_acc = tl.zeros([NB, WP], dtype=tl.float32)
        dD_acc = tl.zeros([WP], dtype=tl.float32)
        dbias_acc = tl.zeros([WP], dtype=tl.float32)
        for sr in range(seg_hi - seg_lo):
            seg = seg_hi - 1 - sr
            s0 = seg * K
            s1 = tl.minimum(s0 + K, H)
            start = tl.zeros([NB, WP], dtype=tl.float32)
            if seg > 0:
                start = tl.load(ck_ptr + ((bc * (n_seg - 1) + seg - 1) * N + n[:, None]) * W + jj0[None, :],
                                mask=mk, other=0.0)
            # Recompute the segment's running states into the stash.
            run = start
            for step in range(s0, s1):
                i = _row_of(step, H, REV_V)
                jj, mcol, cell = _row_cells(i, W, WP)
                dt, raw, uu, a, Bm, m2 = _row_inputs(d_base + i * W * s_dl, u_base + i * W * s_ul,
                                                     B_base + i * W * s_Bl, jj, mcol, n, nmask, a2, bias,
                                                     s_dl, s_ul, s_Bn, s_Bl, SOFTPLUS)
                run = _advance(run, a, Bm * (dt * uu)[None, :], TRANSPOSE, REV_H)
                tl.store(stash + (step - s0) * NB * WP, run)
            tl.debug_barrier()  # the stash rows are visible to every thread
            for sb in range(s1 - s0):
                step = s1 - 1 - sb
                i = _row_of(step, H, REV_V)
                jj, mcol, cell = _row_cells(i, W, WP)
                d_row = d_base + i * W * s_dl
                dt, raw, uu, a, Bm, m2 = _row_inputs(d_row, u_base + i * W * s_ul, B_base + i * W * s_Bl, jj,
                                                     mcol, n, nmask, a2, bias, s_dl, s_ul, s_Bn, s_Bl,
                                                     SOFTPLUS)
                run_t = tl.load(stash + (step - s0) * NB * WP)
                if step > s0:
                    run_p = tl.load(stash + (step - s0 - 1) * NB * WP)
                else:
                    run_p = start
                Cm = tl.load(C_base + n[:, None] * s_Cn + cell[None, :] * s_Cl, mask=m2,
                             other=0.0).to(tl.float32)
                dy, dout, zz = _row_dy(dout_ptr, z_ptr, b, c, cell, mcol, s_ob, s_od, s_ol, s_zb, s_zd, s_zl,
                                       HAS_Z)
                if TRANSPOSE:
                    g = run_t
                    ag = a * run_p  # a * g of the previous row: g - x
                    h = _row_scan(a, g, REV_H)
                    ah = h - g
                else:
                    h = run_t
                    ah = a * run_p  # a * h of the previous row: h - g
                    g = h - ah
                    ag = g - Bm * (dt * uu)[None, :]
                out_off = (b * dim + c) * L + cell
                if HAS_Z:
                    sig = 1.0 / (1.0 + tl.exp(-zz))
                    y = tl.sum(Cm * h, axis=0) + dskip * uu
                    dzv = dout * y * sig * (1.0 + zz * (1.0 - sig))
                    if G > 1:
                        tl.atomic_add(dz_ptr + out_off, dzv, mask=mcol, sem="relaxed")
                    else:
                        tl.store(dz_ptr + out_off, dzv, mask=mcol)
                a_h = _succ_decay(d_row, jj, W, s_dl, bias, a2, nmask, REV_H, SOFTPLUS)
                if TRANSPOSE:
                    lam2 = _row_scan(a_h, Cm * dy[None, :], not REV_H)
                    lam = lam2 + a_next * lam
                    lam1 = lam
                else:
                    lam = Cm * dy[None, :] + a_next * lam
                    lam2 = lam
                    lam1 = _row_scan(a_h, lam2, not REV_H)
                a_next = a
                dlog = tl.where(m2, ah * lam2 + ag * lam1, 0.0)
                dA_acc += dlog * dt[None, :]
                lam_b = tl.sum(lam1 * Bm, axis=0)
                ddt = tl.sum(dlog * a_row[:, None], axis=0) + lam_b * uu
                du = lam_b * dt + dskip * dy
                if SOFTPLUS:
                    ddt = ddt / (1.0 + tl.exp(-raw))
                ddt = tl.where(mcol, ddt, 0.0)
                dD_acc += tl.where(mcol, dy * uu, 0.0)
                dbias_acc += ddt
                if G > 1:
                    tl.atomic_add(du_ptr + out_off, du, mask=mcol, sem="relaxed")
                    tl.atomic_add(dd_ptr + out_off, ddt, mask=mcol, sem="relaxed")
                else:
                    tl.store(du_ptr + out_off, du, mask=mcol)
                    tl.store(dd_ptr + out_off, ddt, mask=mcol)
                bc_off = dBC_base + n[:, None] * L + cell[None, :]
                tl.atomic_add(dB_ptr + bc_off, lam1 * (dt * uu)[None, :], mask=m2, sem="relaxed")
                tl.atomic_add(dC_ptr + bc_off, h * dy[None, :], mask=m2, sem="relaxed")
            tl.debug_barrier()  # every stash row has been read before the next segment overwrites it
        part = bc * n_segs + seg_lo  # this unit's slot among the item's partial sums
        tl.store(dA_ptr + part * N + n, tl.sum(dA_acc, axis=1), mask=nmask)
        if HAS_D:
            if sg == 0:
                tl.store(dD_ptr + part, tl.sum(dD_acc, axis=0))
        if HAS_BIAS:
            tl.store(dbias_ptr + part * G + sg, tl.sum(dbias_acc, axis=0))
