"""Triton backend of the 1D selective scan: chunked, linear in L, parallel over L and channels.

The sequence is cut into chunks of ``T`` tokens. A program owns one chunk of one batch element for
a part of ``CB`` channels of one B/C group, and loops over those channels; B and C of the chunk
are loaded once and shared. Per channel it holds the chunk as an [NB, T] register block (NB
states), so the scans run along T inside a warp.

Forward, three launches:

1. ``_summary_kernel``: per chunk and channel, the state the chunk leaves behind when it starts
   from zero, ``S = sum_t exp(A R_t) dt_t u_t B_t`` with ``R_t`` the Δ summed over the rest of
   the chunk (a reduction, not a scan), and the chunk's total Δ (its decay is ``exp(A ΣΔ)``).
2. ``_chunk_scan_kernel``: per channel, the recurrence over the chunk summaries, which gives the
   state entering every chunk (``hin``, saved for the backward).
3. ``_fwd_kernel``: per chunk and channel, the scan inside the chunk from its entering state,
   the C contraction, the D skip and the z gate.

Backward, the same for the adjoint recurrence (run against the scan direction with the
successor's decay): ``_summary_kernel`` (ADJOINT) and ``_chunk_scan_kernel`` give the adjoint
entering every chunk (``lin``), then ``_bwd_kernel`` recomputes the states of its chunk, runs the
adjoint scan, and writes du, ddelta, dz and partial sums: dA, dD, ddelta_bias per chunk, and dB,
dC per part of channels.

Memory, all float32: ``hin`` and ``lin`` hold batch * dim * dstate numbers per chunk (``hin`` is
saved between forward and backward); the dA partials as many again; the dB/dC partials
``P * batch * dstate * L`` each, where P = parts per group. P is chosen so that the launch has
about ``TARGET_PROGRAMS`` programs: P ~ TARGET_PROGRAMS / (n_chunks * batch * groups), so the
partials stay near ``2 * 4 * TARGET_PROGRAMS * T * dstate`` bytes whatever L is (about 17 MiB for
T = 128, dstate 16), and vanish (P = 1, written in place) once there are enough chunks. Nothing of
size batch * dim * dstate * L is ever written. The dB/dC reduction over channels is deterministic:
a fixed loop inside a program, then a sum over the P parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_STATES_PER_LAUNCH = 16
CHUNK = 128  # tokens per chunk (T)
NUM_WARPS = 4
TARGET_PROGRAMS = 1024  # programs per launch to aim for (several per SM on an H100/H200)
POISON_OUTPUTS = False  # tests set this to fill every output and partial buffer with NaN first
CHUNK_OVERRIDE: int | None = None  # for tests and sweeps
NUM_WARPS_OVERRIDE: int | None = None  # for sweeps
CHUNKS_PER_BLOCK = 128  # chunk summaries one step of _chunk_scan_kernel scans at once (tests lower it)
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) comes first in scan order: s -> a1 s + x1, then s -> a2 s + x2.
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    # log(1 + e^x) with log1p's accuracy for e^x << 1 (Kahan: log(w) * e / (w - 1), w = 1 + e).
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    small = tl.where(w == 1.0, e, tl.log(w) * e / (w - 1.0))
    return tl.where(x > 20.0, x, small)


@triton.jit
def _tokens(k, L, T: tl.constexpr):
    """Token indices of chunk k and their mask. Written as runs of 4 so that fp16/bf16 loads get the
    fp32 register layout (as in the 2D kernels)."""
    r = tl.arange(0, T)
    t = k * T + (r // 4) * 4 + r % 4
    return t, t < L


@triton.jit
def _delta(d_ptr, off, mask, bias, SOFTPLUS: tl.constexpr):
    """Δ of a [T] run: (Δ after bias and softplus, 0 outside ``mask``; Δ before softplus)."""
    raw = tl.load(d_ptr + off, mask=mask, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _states(ptr, b, grp, n, t, mask, s_b, s_g, s_n, s_l):
    """A [NB, T] block of B or C in float32, 0 outside ``mask``."""
    return tl.load(ptr + b * s_b + grp * s_g + n[:, None] * s_n + t[None, :] * s_l, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _channel(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS: tl.constexpr):
    """Channel c's A row, that row times log2(e) (decays are exp2(Δ * it)), and its Δ bias."""
    a_row = tl.load(A_ptr + c * s_Ad + n * s_An, mask=nmask, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c).to(tl.float32)
    return a_row, a_row * 1.4426950408889634, bias


@triton.jit
def _gated_grad(dout_ptr, z_ptr, b, c, t, tmask, s_ob, s_od, s_ol, s_zb, s_zd, s_zl, HAS_Z: tl.constexpr):
    """dy = dout * silu(z) (or dout), the gradient reaching the ungated output; also z (or 0)."""
    dout = tl.load(dout_ptr + b * s_ob + c * s_od + t * s_ol, mask=tmask, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + b * s_zb + c * s_zd + t * s_zl, mask=tmask, other=0.0).to(tl.float32)
        dy = dout * zz / (1.0 + tl.exp(-zz))
    else:
        zz = dout * 0.0
        dy = dout
    return dy, dout, zz


@triton.jit
def _summary_kernel(
    u_ptr, d_ptr, z_ptr, dout_ptr, A_ptr, Bm_ptr, Cm_ptr, bias_ptr,
    summ_ptr, logdec_ptr,
    dim, N, L, per_group, CB, K,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, T: tl.constexpr, REV: tl.constexpr, ADJOINT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """What one chunk contributes to the recurrence across chunks, for CB channels.

    Forward (ADJOINT=0): ``summ`` = the state after the chunk's last token (in scan order) when
    the chunk starts from zero, ``logdec`` = the chunk's total Δ.
    Adjoint (ADJOINT=1): ``summ`` = the adjoint at the chunk's first token (in scan order) when
    nothing enters from the next chunk; ``logdec`` = the Δ of every token after the first up to
    and including the next chunk's first token (the decay an adjoint crosses to get here).
    ``summ``: (batch, dim, N, K); ``logdec``: (batch, dim, K). Grid: (K, dim // CB, batch).
    """
    k = tl.program_id(0)
    b = tl.program_id(2)
    c0 = tl.program_id(1) * CB
    grp = c0 // per_group
    n = tl.arange(0, NB)
    nmask = n < N
    t, tmask = _tokens(k, L, T)
    m2 = nmask[:, None] & tmask[None, :]
    if ADJOINT:
        Cm = _states(Cm_ptr, b, grp, n, t, m2, s_Cb, s_Cg, s_Cn, s_Cl)
        # The first token of this chunk in scan order, and the next chunk's first token.
        if REV:
            first = tl.minimum(k * T + T, L) - 1
            nxt = k * T - 1
        else:
            first = k * T
            nxt = k * T + T
        nxt_ok = (nxt >= 0) & (nxt < L)
    else:
        Bm = _states(Bm_ptr, b, grp, n, t, m2, s_Bb, s_Bg, s_Bn, s_Bl)
    for c in range(c0, c0 + CB):
        _, a2, bias = _channel(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
        dt, _ = _delta(d_ptr + b * s_db + c * s_dd, t * s_dl, tmask, bias, SOFTPLUS)
        total = tl.sum(dt, axis=0)
        if ADJOINT:
            dy, _, _ = _gated_grad(dout_ptr, z_ptr, b, c, t, tmask, s_ob, s_od, s_ol, s_zb, s_zd, s_zl, HAS_Z)
            dt_first = tl.sum(tl.where(t == first, dt, 0.0), axis=0)
            # Δ from just after the first token up to token t, in scan order.
            if REV:
                span = tl.cumsum(dt, 0, reverse=True) - dt_first
            else:
                span = tl.cumsum(dt, 0) - dt_first
            w = tl.exp2(a2[:, None] * span[None, :])
            s = tl.sum(w * Cm * dy[None, :], axis=1)
            dn_raw = tl.load(d_ptr + b * s_db + c * s_dd + nxt * s_dl, mask=nxt_ok, other=0.0).to(tl.float32)
            dn_raw = dn_raw + bias
            if SOFTPLUS:
                dn = _softplus(dn_raw)
            else:
                dn = dn_raw
            ld = total - dt_first + tl.where(nxt_ok, dn, 0.0)
        else:
            uu = tl.load(u_ptr + b * s_ub + c * s_ud + t * s_ul, mask=tmask, other=0.0).to(tl.float32)
            # Δ over the tokens after t in scan order: the decay from t to the chunk's end.
            if REV:
                rest = tl.cumsum(dt, 0) - dt
            else:
                rest = tl.cumsum(dt, 0, reverse=True) - dt
            w = tl.exp2(a2[:, None] * rest[None, :])
            s = tl.sum(w * Bm * (dt * uu)[None, :], axis=1)
            ld = total
        bc = b * dim + c
        tl.store(summ_ptr + (bc * N + n) * K + k, s, mask=nmask)
        tl.store(logdec_ptr + bc * K + k, ld)


@triton.jit
def _chunk_scan_kernel(
    summ_ptr, logdec_ptr, A_ptr, out_ptr,
    dim, N, K, s_Ad, s_An,
    NB: tl.constexpr, KB: tl.constexpr, REV: tl.constexpr,
):
    """The recurrence across chunks, acc[k] = exp2(A log2e * logdec[k]) acc[prev] + summ[k], run
    in chunk order (descending when REV); writes the value entering every chunk,
    out[k] = acc[prev] (0 for the first chunk). Arrays as in ``_summary_kernel``.
    Grid: (batch * dim,). Chunks go KB at a time, with the carry between blocks in registers.
    """
    bc = tl.program_id(0)
    c = bc % dim
    n = tl.arange(0, NB)
    nmask = n < N
    a2 = tl.load(A_ptr + c * s_Ad + n * s_An, mask=nmask, other=0.0).to(tl.float32) * 1.4426950408889634
    j = tl.arange(0, KB)
    rows = (bc * N + n) * K
    if REV:
        tl.store(out_ptr + rows + K - 1, tl.zeros([NB], dtype=tl.float32), mask=nmask)
    else:
        tl.store(out_ptr + rows, tl.zeros([NB], dtype=tl.float32), mask=nmask)
    carry = tl.zeros([NB], dtype=tl.float32)
    n_blocks = tl.cdiv(K, KB)
    for i in range(n_blocks):
        if REV:
            kk = (n_blocks - 1 - i) * KB + j
        else:
            kk = i * KB + j
        km = kk < K
        m = nmask[:, None] & km[None, :]
        s = tl.load(summ_ptr + rows[:, None] + kk[None, :], mask=m, other=0.0)
        ld = tl.load(logdec_ptr + bc * K + kk, mask=km, other=0.0)
        dec = tl.where(m, tl.exp2(a2[:, None] * ld[None, :]), 1.0)
        prod, acc = tl.associative_scan((dec, s), 1, _combine, reverse=REV)
        acc = acc + prod * carry[:, None]
        if REV:
            dest = kk - 1
            carry = tl.sum(tl.where(j[None, :] == 0, acc, 0.0), axis=1)
        else:
            dest = kk + 1
            carry = tl.sum(tl.where(j[None, :] == KB - 1, acc, 0.0), axis=1)
        dm = nmask[:, None] & (dest[None, :] >= 0) & (dest[None, :] < K)
        tl.store(out_ptr + rows[:, None] + dest[None, :], acc, mask=dm)


@triton.jit
def _fwd_kernel(
    u_ptr, d_ptr, z_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, hin_ptr, y_ptr,
    dim, N, L, per_group, CB, K,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, T: tl.constexpr, REV: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_CARRY: tl.constexpr,
):
    """The scan inside one chunk for CB channels, from the state entering the chunk (``hin``,
    (batch, dim, N, K); absent when there is one chunk), then y = Σ_n C h (+ D u) (* silu(z)),
    written contiguous (batch, dim, L). Grid: (K, dim // CB, batch)."""
    k = tl.program_id(0)
    b = tl.program_id(2)
    c0 = tl.program_id(1) * CB
    grp = c0 // per_group
    n = tl.arange(0, NB)
    nmask = n < N
    t, tmask = _tokens(k, L, T)
    m2 = nmask[:, None] & tmask[None, :]
    Bm = _states(Bm_ptr, b, grp, n, t, m2, s_Bb, s_Bg, s_Bn, s_Bl)
    Cm = _states(Cm_ptr, b, grp, n, t, m2, s_Cb, s_Cg, s_Cn, s_Cl)
    for c in range(c0, c0 + CB):
        _, a2, bias = _channel(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
        dt, _ = _delta(d_ptr + b * s_db + c * s_dd, t * s_dl, tmask, bias, SOFTPLUS)
        uu = tl.load(u_ptr + b * s_ub + c * s_ud + t * s_ul, mask=tmask, other=0.0).to(tl.float32)
        dec = tl.exp2(a2[:, None] * dt[None, :])
        prod, h = tl.associative_scan((dec, Bm * (dt * uu)[None, :]), 1, _combine, reverse=REV)
        bc = b * dim + c
        if HAS_CARRY:
            h = h + prod * tl.load(hin_ptr + (bc * N + n) * K + k, mask=nmask, other=0.0)[:, None]
        y = tl.sum(Cm * h, axis=0)
        if HAS_D:
            y = y + tl.load(D_ptr + c).to(tl.float32) * uu
        if HAS_Z:
            zz = tl.load(z_ptr + b * s_zb + c * s_zd + t * s_zl, mask=tmask, other=0.0).to(tl.float32)
            y = y * zz / (1.0 + tl.exp(-zz))
        tl.store(y_ptr + bc * L + t, y, mask=tmask)


@triton.jit
def _bwd_kernel(
    u_ptr, d_ptr, z_ptr, dout_ptr, A_ptr, Bm_ptr, Cm_ptr, D_ptr, bias_ptr, hin_ptr, lin_ptr,
    du_ptr, dd_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    dim, N, L, per_group, CB, K,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_Ad, s_An,
    NB: tl.constexpr, T: tl.constexpr, REV: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_CARRY: tl.constexpr,
):
    """Gradients of one chunk for CB channels of one group.

    Recomputes the states from ``hin``, runs the adjoint λ[t] = C dy[t] + a[next] λ[next] against
    the scan direction from ``lin`` (the adjoint at the next chunk's first token), and writes du,
    ddelta, dz (contiguous (batch, dim, L)); per chunk dA (batch, K, dim, N), dD and dbias
    (batch, K, dim); per part of channels dB and dC (P, batch, groups, N, L), all float32.
    With a = exp(Δ A) multiplying h[prev]: d loss / d log a = λ a h[prev] = λ (h - x).
    Grid: (K, dim // CB, batch).
    """
    k = tl.program_id(0)
    b = tl.program_id(2)
    batch = tl.num_programs(2)
    c0 = tl.program_id(1) * CB
    grp = c0 // per_group
    part = (c0 % per_group) // CB
    groups = dim // per_group
    n = tl.arange(0, NB)
    nmask = n < N
    t, tmask = _tokens(k, L, T)
    m2 = nmask[:, None] & tmask[None, :]
    # The token after t in scan order: its decay carries λ back to t.
    if REV:
        tn = t - 1
    else:
        tn = t + 1
    tn_ok = tmask & (tn >= 0) & (tn < L)
    Bm = _states(Bm_ptr, b, grp, n, t, m2, s_Bb, s_Bg, s_Bn, s_Bl)
    Cm = _states(Cm_ptr, b, grp, n, t, m2, s_Cb, s_Cg, s_Cn, s_Cl)
    dB_acc = tl.zeros([NB, T], dtype=tl.float32)
    dC_acc = tl.zeros([NB, T], dtype=tl.float32)
    for c in range(c0, c0 + CB):
        a_row, a2, bias = _channel(A_ptr, bias_ptr, c, n, nmask, s_Ad, s_An, HAS_BIAS)
        d_base = d_ptr + b * s_db + c * s_dd
        dt, raw = _delta(d_base, t * s_dl, tmask, bias, SOFTPLUS)
        dt_next, _ = _delta(d_base, tn * s_dl, tn_ok, bias, SOFTPLUS)
        uu = tl.load(u_ptr + b * s_ub + c * s_ud + t * s_ul, mask=tmask, other=0.0).to(tl.float32)
        dy, dout, zz = _gated_grad(dout_ptr, z_ptr, b, c, t, tmask, s_ob, s_od, s_ol, s_zb, s_zd, s_zl, HAS_Z)
        bc = b * dim + c
        dtu = dt * uu
        x = Bm * dtu[None, :]
        prod, h = tl.associative_scan((tl.exp2(a2[:, None] * dt[None, :]), x), 1, _combine, reverse=REV)
        if HAS_CARRY:
            h = h + prod * tl.load(hin_ptr + (bc * N + n) * K + k, mask=nmask, other=0.0)[:, None]
        out_off = bc * L + t
        dskip = 0.0
        if HAS_D:
            dskip = tl.load(D_ptr + c).to(tl.float32)
        if HAS_Z:
            sig = 1.0 / (1.0 + tl.exp(-zz))
            y = tl.sum(Cm * h, axis=0) + dskip * uu
            tl.store(dz_ptr + out_off, dout * y * sig * (1.0 + zz * (1.0 - sig)), mask=tmask)
        dec_next = tl.where(tn_ok[None, :], tl.exp2(a2[:, None] * dt_next[None, :]), 0.0)
        prod, lam = tl.associative_scan((dec_next, Cm * dy[None, :]), 1, _combine, reverse=not REV)
        if HAS_CARRY:
            lam = lam + prod * tl.load(lin_ptr + (bc * N + n) * K + k, mask=nmask, other=0.0)[:, None]
        dlog = tl.where(m2, lam * (h - x), 0.0)
        tl.store(dA_ptr + ((b * K + k) * dim + c) * N + n, tl.sum(dlog * dt[None, :], axis=1), mask=nmask)
        lam_b = tl.sum(lam * Bm, axis=0)
        ddt = tl.sum(dlog * a_row[:, None], axis=0) + lam_b * uu
        du = lam_b * dt
        if HAS_D:
            du = du + dskip * dy
            tl.store(dD_ptr + (b * K + k) * dim + c, tl.sum(tl.where(tmask, dy * uu, 0.0), axis=0))
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-raw))
        ddt = tl.where(tmask, ddt, 0.0)
        if HAS_BIAS:
            tl.store(dbias_ptr + (b * K + k) * dim + c, tl.sum(ddt, axis=0))
        tl.store(du_ptr + out_off, du, mask=tmask)
        tl.store(dd_ptr + out_off, ddt, mask=tmask)
        dB_acc += lam * dtu[None, :]
        dC_acc += h * dy[None, :]
    out = (((part * batch + b) * groups + grp) * N + n[:, None]) * L + t[None, :]
    tl.store(dB_ptr + out, dB_acc, mask=m2)
    tl.store(dC_ptr + out, dC_acc, mask=m2)


# --------------------------------------------------------------------------------------------------
# Launches


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return max(TARGET_PROGRAMS, 8 * torch.cuda.get_device_properties(device).multi_processor_count)
    return TARGET_PROGRAMS


@dataclass(frozen=True)
class Plan1D:
    """Chunk length T, chunk count K, channels per program CB, parts per group P, warps."""

    NB: int
    T: int
    K: int
    CB: int
    P: int
    num_warps: int


def plan_1d(batch: int, dim: int, groups: int, dstate: int, length: int,
            device: torch.device | str = "cpu") -> Plan1D:
    """Chunk length and channels per program for one launch.

    CB is the largest divisor of the group's channel count that still gives the launch
    ``TARGET_PROGRAMS`` programs (K * batch * dim / CB); with many chunks that is the whole group
    (P = 1: no dB/dC partials to sum), with few chunks the channels are split for parallelism.
    """
    NB = _pow2(dstate)
    T = CHUNK_OVERRIDE or min(CHUNK, max(16, _pow2(length)))
    K = -(-length // T)
    per_group = dim // groups
    target = _target_programs(torch.device(device))
    divisors = [d for d in range(1, per_group + 1) if per_group % d == 0]
    fits = [d for d in divisors if K * batch * (dim // d) >= target]
    CB = max(fits) if fits else 1
    warps = NUM_WARPS_OVERRIDE or (NUM_WARPS if NB * T >= 1024 else max(1, NB * T // 256))
    return Plan1D(NB, T, K, CB, per_group // CB, warps)


class _Args:
    """Kernel-ready views and strides; optional tensors replaced by a dummy."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, reverse: bool):
        # B and C are small (dstate numbers per token): make their tokens contiguous so that the
        # [NB, T] blocks load along T whatever layout the caller's projection left them in.
        self.B = B if B.stride(-1) == 1 else B.contiguous()
        self.C = C if C.stride(-1) == 1 else C.contiguous()
        self.u, self.delta, self.A, self.z = u, delta, A, z
        self.D = D.contiguous() if D is not None else None
        self.bias = delta_bias.contiguous() if delta_bias is not None else None
        self.batch, self.dim, self.L = u.shape
        self.groups, self.N = B.shape[1], B.shape[2]
        self.per_group = self.dim // self.groups
        self.reverse = bool(reverse)
        self.plan = plan_1d(self.batch, self.dim, self.groups, self.N, self.L, u.device)
        self.dummy = torch.empty(1, dtype=torch.float32, device=u.device)

    def opt(self, t):
        return self.dummy if t is None else t

    def z_strides(self):
        return self.z.stride() if self.z is not None else (0, 0, 0)

    def bc_strides(self):
        return (*self.B.stride(), *self.C.stride(), *self.A.stride())

    def grid(self):
        p = self.plan
        return (p.K, self.dim // p.CB, self.batch)

    def common(self):
        p = self.plan
        return (self.dim, self.N, self.L, self.per_group, p.CB, p.K)

    def state_buffer(self):
        return _alloc((self.batch, self.dim, self.N, self.plan.K), torch.float32, self.u.device)


def _across_chunks(x: _Args, softplus: bool, adjoint: bool, dout=None) -> torch.Tensor:
    """Summaries, then the scan over chunks: the state (or adjoint) entering every chunk."""
    p = x.plan
    summ = x.state_buffer()
    logdec = _alloc((x.batch, x.dim, p.K), torch.float32, x.u.device)
    dstr = dout.stride() if dout is not None else (0, 0, 0)
    _summary_kernel[x.grid()](
        x.u, x.delta, x.opt(x.z), x.opt(dout), x.A, x.B, x.C, x.opt(x.bias), summ, logdec,
        *x.common(), *x.u.stride(), *x.delta.stride(), *x.z_strides(), *dstr, *x.bc_strides(),
        NB=p.NB, T=p.T, REV=x.reverse, ADJOINT=adjoint, HAS_BIAS=x.bias is not None,
        HAS_Z=adjoint and x.z is not None, SOFTPLUS=softplus, num_warps=p.num_warps,
    )
    entering = x.state_buffer()
    KB = min(_pow2(p.K), CHUNKS_PER_BLOCK)
    _chunk_scan_kernel[(x.batch * x.dim,)](
        summ, logdec, x.A, entering, x.dim, x.N, p.K, *x.A.stride(),
        NB=p.NB, KB=KB, REV=x.reverse != adjoint, num_warps=4 if p.NB * KB >= 1024 else 1,
    )
    return entering


def _forward(x: _Args, softplus: bool, out_dtype: torch.dtype):
    p = x.plan
    hin = _across_chunks(x, softplus, adjoint=False) if p.K > 1 else None
    y = _alloc((x.batch, x.dim, x.L), out_dtype, x.u.device)
    _fwd_kernel[x.grid()](
        x.u, x.delta, x.opt(x.z), x.A, x.B, x.C, x.opt(x.D), x.opt(x.bias), x.opt(hin), y,
        *x.common(), *x.u.stride(), *x.delta.stride(), *x.z_strides(), *x.bc_strides(),
        NB=p.NB, T=p.T, REV=x.reverse, HAS_D=x.D is not None, HAS_Z=x.z is not None,
        HAS_BIAS=x.bias is not None, SOFTPLUS=softplus, HAS_CARRY=hin is not None, num_warps=p.num_warps,
    )
    return y, hin


def _backward(x: _Args, softplus: bool, dout: torch.Tensor, hin):
    p = x.plan
    dev = x.u.device
    lin = _across_chunks(x, softplus, adjoint=True, dout=dout) if p.K > 1 else None
    f32 = torch.float32
    du = _alloc((x.batch, x.dim, x.L), x.u.dtype, dev)
    dd = _alloc((x.batch, x.dim, x.L), x.delta.dtype, dev)
    dz = _alloc((x.batch, x.dim, x.L), x.z.dtype, dev) if x.z is not None else None
    dA = _alloc((x.batch, p.K, x.dim, x.N), f32, dev)
    dD = _alloc((x.batch, p.K, x.dim), f32, dev) if x.D is not None else None
    dbias = _alloc((x.batch, p.K, x.dim), f32, dev) if x.bias is not None else None
    dB = _alloc((p.P, x.batch, x.groups, x.N, x.L), f32, dev)
    dC = _alloc((p.P, x.batch, x.groups, x.N, x.L), f32, dev)
    _bwd_kernel[x.grid()](
        x.u, x.delta, x.opt(x.z), dout, x.A, x.B, x.C, x.opt(x.D), x.opt(x.bias), x.opt(hin), x.opt(lin),
        du, dd, x.opt(dz), dA, x.opt(dD), x.opt(dbias), dB, dC,
        *x.common(), *x.u.stride(), *x.delta.stride(), *x.z_strides(), *dout.stride(), *x.bc_strides(),
        NB=p.NB, T=p.T, REV=x.reverse, HAS_D=x.D is not None, HAS_Z=x.z is not None,
        HAS_BIAS=x.bias is not None, SOFTPLUS=softplus, HAS_CARRY=lin is not None, num_warps=p.num_warps,
    )
    dA = dA.sum(dim=(0, 1))
    dD = dD.sum(dim=(0, 1)) if dD is not None else None
    dbias = dbias.sum(dim=(0, 1)) if dbias is not None else None
    dB = dB.sum(dim=0) if p.P > 1 else dB[0]
    dC = dC.sum(dim=0) if p.P > 1 else dC[0]
    return du, dd, dA, dB, dC, dD, dz, dbias


class _Scan1DFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out_dtype):
        x = _Args(u, delta, A, B, C, D, z, delta_bias, reverse)
        y, hin = _forward(x, delta_softplus, out_dtype)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hin)
        ctx.delta_softplus, ctx.reverse = delta_softplus, reverse
        return y

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, hin = ctx.saved_tensors
        x = _Args(u, delta, A, B, C, D, z, delta_bias, ctx.reverse)
        du, dd, dA, dB, dC, dD, dz, dbias = _backward(x, ctx.delta_softplus, dout, hin)

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return (du, dd, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, delta_bias),
                None, None, None)


def selective_scan_1d_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool):
    """Triton backend of :func:`mamba2d.ops.scan1d.selective_scan_1d`; B and C arrive as
    (batch, groups, dstate, L), arguments already checked. Returns (batch, dim, L) in u's dtype."""
    dstate = A.shape[1]
    if dstate <= MAX_STATES_PER_LAUNCH:
        return _Scan1DFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse),
                               u.dtype)
    # The scan is a sum over states: run groups of states, add their float32 outputs, then apply
    # the D skip and the gate once.
    y = None
    for n0 in range(0, dstate, MAX_STATES_PER_LAUNCH):
        sl = slice(n0, min(dstate, n0 + MAX_STATES_PER_LAUNCH))
        part = _Scan1DFn.apply(u, delta, A[:, sl], B[:, :, sl], C[:, :, sl], None, None, delta_bias,
                               bool(delta_softplus), bool(reverse), torch.float32)
        y = part if y is None else y + part
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    return y.to(u.dtype)


__all__ = ["Plan1D", "plan_1d", "selective_scan_1d_triton"]
