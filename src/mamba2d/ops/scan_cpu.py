"""CPU backend: numba-compiled forward and backward kernels, parallel over channels.

The grid is always walked row by row in memory order (rows in the vertical direction, cells in the
horizontal one), whatever the layout, so no input is ever transposed or flipped:

- default order (horizontal pass first): the horizontal state g is a running vector of dstate
  numbers along the row; the vertical state h lives in a W x dstate row buffer that each row
  updates elementwise;
- ``transpose`` (vertical pass first): the row buffer holds g and the running vector is h.

The forward therefore keeps O(W * dstate) state per channel and writes only ``out``. The backward
recomputes one channel's vertical states for the whole grid into per-thread scratch
((H + 1) * W * dstate numbers), then walks the rows in reverse, recomputing each row's decays and
running states, and runs both adjoint recurrences (the vertical adjoint again as a row buffer, the
horizontal one as a running vector). Softplus, the D skip and the z gate are fused: they cost one
pass over each row, not a pass of torch over (batch, dim, L) tensors.

Work split: the forward runs one (batch, channel) per item. The backward runs one (batch, group,
chunk of channels) per item; every channel of a group shares B and C, so each item accumulates its
own copy of dB and dC (batch, groups, chunks, L, dstate), added afterwards in a fixed order: the
result is deterministic for a given thread count (the chunk count follows it). The items are
split into ``torch.get_num_threads()`` equal ranges run by Python threads; the kernels release
the GIL (numba's own threading layer is not used).

Precision: float64 inputs compute in float64; every other dtype is converted to float32 by torch
around the call (numba has no bfloat16). Sums over the grid (dA, dD, ddelta_bias) add float32 row
sums into float64. The float32 exp and log are polynomials that vectorise (libm's do not without
Intel's SVML), within a few float32 ulps; float64 uses libm.

Options (flips, transpose, softplus, z) are runtime arguments, so each kernel compiles once per
working dtype. Compiled code is cached next to this file (or in numba's user-wide cache) when one
of those is writable; otherwise every process compiles it again.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from mamba2d.ops.layout import ScanLayout

POISON_OUTPUTS = False  # tests set this to fill every output buffer with NaN before a kernel runs

# The kernels' flags. No nnan/ninf: a NaN or inf in the inputs still reaches the outputs.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# The float32 elementary functions below are inlined into the kernels and so compiled with these
# flags too: they are written to stay accurate under reassociation (no exact-cancellation tricks).


def _jit(**options):
    """``numba.njit`` with ``cache=True``, falling back to no cache when no cache directory is writable."""

    def wrap(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(cache=False, **options)(fn)

    return wrap


# --- float32 exp, log1p on (0, 1], softplus, sigmoid; float64 through libm ----------------------

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 in two parts (Cody-Waite): k * hi is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.33)  # exp(x) stays a normal float32 above this
_EXP_HI = np.float32(88.37)
_E0, _E1, _E2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_E3, _E4, _E5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
# log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3: the atanh series to s**13 (relative error < 2e-8).
_ATANH = tuple(np.float32(1.0 / (2 * k + 1)) for k in range(7))
_ZERO32, _HALF32, _ONE32, _TWO32 = np.float32(0.0), np.float32(0.5), np.float32(1.0), np.float32(2.0)
_BIAS32, _SHIFT32 = np.int32(127), np.int32(23)
_SOFTPLUS_LINEAR = 20.0  # above this softplus(x) = x in float64 too (torch's threshold)


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret an int32 as a float32 (a bitcast, which LLVM vectorises)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(inline="always", cache=False)
def _exp_f32(x):
    x = min(max(x, _EXP_LO), _EXP_HI)
    k = np.floor(x * _LOG2E + _HALF32)  # float32 (math.floor would give an int64)
    # If reassociation folds the two parts of ln 2 into one float32, r gains |k| * 2e-9: still within
    # 2.5e-7 of exp(x) at the most negative k (and 3e-8 for the decays of a scan, |k| <= 15).
    r = x - k * _LN2_HI
    r = r - k * _LN2_LO
    p = ((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5
    p = p * r * r + r + _ONE32
    return p * _bits_to_f32(np.int32((np.int32(k) + _BIAS32) << _SHIFT32))  # p * 2**k


@njit(inline="always", cache=False)
def _log1p_f32(e):
    """log(1 + e) for 0 <= e <= 1, without forming 1 + e."""
    s = e / (_TWO32 + e)
    s2 = s * s
    c0, c1, c2, c3, c4, c5, c6 = _ATANH
    return _TWO32 * s * ((((((c6 * s2 + c5) * s2 + c4) * s2 + c3) * s2 + c2) * s2 + c1) * s2 + c0)


def _exp(x):  # placeholders, resolved by the overloads below inside compiled code
    return math.exp(x)


def _softplus(x):
    return x if x > _SOFTPLUS_LINEAR else math.log1p(math.exp(x))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@overload(_exp, inline="always")
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


@overload(_softplus, inline="always")
def _softplus_impl(x):
    if x == types.float32:
        return lambda x: max(x, _ZERO32) + _log1p_f32(_exp_f32(-abs(x)))
    return lambda x: x if x > _SOFTPLUS_LINEAR else math.log1p(math.exp(x))


@overload(_sigmoid, inline="always")
def _sigmoid_impl(x):
    if x == types.float32:
        return lambda x: _ONE32 / (_ONE32 + _exp_f32(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


# --- kernels ---------------------------------------------------------------------------------
# ins = (u, delta, z, A, B, C, D, delta_bias): u, delta, z (batch, dim, L), z a (1, 1, 1) placeholder
# without a gate; A (dim, N); B, C (batch, groups, L, N); D, delta_bias (dim,), zeros when absent.
# opt = (has_z, softplus, flip_h, flip_v, transpose, H, W). Row quantities are indexed by column j;
# loops over the N states of one cell, or over the W cells of one row, run on 1D views so that
# they vectorise.


@_jit(fastmath=_FASTMATH, inline="always")
def _decays(a, dt, A_c):
    """a[n] = exp(Δ A[c, n]) for the N states of one cell."""
    for n in range(A_c.shape[0]):
        a[n] = _exp(dt * A_c[n])


@_jit(fastmath=_FASTMATH, inline="always")
def _row_forward(i, slot, prev, W, flip_h, transpose, u_c, dt_c, Bg, Cg, A_c, V, R, a, y_row):
    """The two passes over row i: sets the vertical states V[slot * W + j] from V[prev * W + j]
    (slot != prev) and y_row[j] = Σ_n C h of every cell (i, j).

    V: (slots * W, N) vertical states; R: (N,) scratch for the running horizontal state; a: (N,) scratch.
    The branch on ``transpose`` sits outside the loop over cells: inside it, a micro-benchmark of this
    loop ran at half speed.
    """
    N = A_c.shape[0]
    zero = A_c.dtype.type(0)  # typed constants: an int literal would promote float32 to float64
    j0, dj = (W - 1, -1) if flip_h else (0, 1)  # the t-th cell of the horizontal scan is column j0 + t dj
    R[:] = 0
    if transpose:  # vertical pass first: V holds g, R holds h
        for t in range(W):
            j = j0 + t * dj
            cell = i * W + j
            dt = dt_c[cell]
            dtu = dt * u_c[cell]
            b_n, c_n, v_old, v_new = Bg[cell], Cg[cell], V[prev * W + j], V[slot * W + j]
            _decays(a, dt, A_c)
            acc = zero
            for n in range(N):
                v = a[n] * v_old[n] + dtu * b_n[n]
                v_new[n] = v
                r = a[n] * R[n] + v
                R[n] = r
                acc += c_n[n] * r
            y_row[j] = acc
    else:  # horizontal pass first: R holds g, V holds h
        for t in range(W):
            j = j0 + t * dj
            cell = i * W + j
            dt = dt_c[cell]
            dtu = dt * u_c[cell]
            b_n, c_n, v_old, v_new = Bg[cell], Cg[cell], V[prev * W + j], V[slot * W + j]
            _decays(a, dt, A_c)
            acc = zero
            for n in range(N):
                r = a[n] * R[n] + dtu * b_n[n]
                R[n] = r
                v = a[n] * v_old[n] + r
                v_new[n] = v
                acc += c_n[n] * v
            y_row[j] = acc


@_jit(fastmath=_FASTMATH, inline="always")
def _row_dt(dlt_r, bias_c, softplus, dt_r, dsp_r, want_dsp):
    """dt_r = Δ of one row: delta + bias, through softplus when asked; with ``want_dsp`` also
    dsp_r = dΔ/d(delta + bias)."""
    if softplus:
        for j in range(dlt_r.shape[0]):
            dt_r[j] = _softplus(dlt_r[j] + bias_c)
        if want_dsp:
            for j in range(dlt_r.shape[0]):
                dsp_r[j] = _sigmoid(dlt_r[j] + bias_c)
    else:
        for j in range(dlt_r.shape[0]):
            dt_r[j] = dlt_r[j] + bias_c
        if want_dsp:
            dsp_r[:] = 1


@_jit(nogil=True, fastmath=_FASTMATH)
def _scan_fwd(start, stop, ins, opt, out):
    """out[b, c] = (Σ_n C h + D u) · silu(z) for the items start <= b * dim + c < stop. Releases the GIL."""
    u, dlt, z, A, Bt, Ct, D, bias = ins
    has_z, softplus, flip_h, flip_v, transpose, H, W = opt
    dim, L = u.shape[1], u.shape[2]
    N = A.shape[1]
    per = dim // Bt.shape[1]
    # Two rows of vertical states, used in turn: updating one row in place would make the old and the
    # new states the same memory, which fails LLVM's overlap check and runs the state loop unvectorised.
    V = np.empty((2 * W, N), dtype=u.dtype)
    R = np.empty(N, dtype=u.dtype)
    a = np.empty(N, dtype=u.dtype)
    dt_c = np.empty(L, dtype=u.dtype)
    y_row = np.empty(W, dtype=u.dtype)
    for item in range(start, stop):
        b, c = item // dim, item % dim
        g = c // per
        u_c, D_c = u[b, c], D[c]
        z_c = z[b, c] if has_z else z[0, 0]
        V[:] = 0
        for s in range(H):
            i = H - 1 - s if flip_v else s
            row = slice(i * W, (i + 1) * W)
            _row_dt(dlt[b, c, row], bias[c], softplus, dt_c[row], y_row, False)
            _row_forward(i, (s + 1) % 2, s % 2, W, flip_h, transpose, u_c, dt_c, Bt[b, g], Ct[b, g], A[c], V,
                         R, a, y_row)
            u_r, o_r = u_c[row], out[b, c, row]
            if has_z:
                z_r = z_c[row]
                for j in range(W):
                    o_r[j] = (y_row[j] + D_c * u_r[j]) * z_r[j] * _sigmoid(z_r[j])
            else:
                for j in range(W):
                    o_r[j] = y_row[j] + D_c * u_r[j]


@_jit(fastmath=_FASTMATH, inline="always")
def _cell_adjoint(a_n, b_n, c_n, dy, dt, dtu, A_c, lam1, lam2, pre1, pre2, h_n, db_n, dc_n, rowA):
    """Both adjoint recurrences at one cell, for all N states; returns (Σ_n A dlog a, Σ_n B λ_first).

    lam1 / lam2: the carried adjoints of the second / first pass (times their decay), updated here;
    pre1 / pre2: the second / first pass's states at this cell's predecessor along that pass;
    h_n: the second pass's states here (what C reads). Adds dt * dlog a into rowA and this cell's
    share of dB, dC into db_n, dc_n. Every argument but the scalars is an (N,) view.
    """
    N = A_c.shape[0]
    s1 = A_c.dtype.type(0)
    s2 = A_c.dtype.type(0)
    for n in range(N):
        an = a_n[n]
        p = c_n[n] * dy + lam1[n]  # adjoint of the second pass
        q = p + lam2[n]  # adjoint of the first pass = d loss / d x
        lam1[n] = an * p
        lam2[n] = an * q
        dla = an * (p * pre1[n] + q * pre2[n])  # d loss / d log a
        rowA[n] += dt * dla
        s1 += A_c[n] * dla
        s2 += b_n[n] * q
        db_n[n] += dtu * q
        dc_n[n] += h_n[n] * dy
    return s1, s2


@_jit(fastmath=_FASTMATH, inline="always")
def _cell_grads(b, c, cell, s1, s2, dy, dt, u_c, D_c, dsp_c, du, ddelta):
    """du and ddelta of one cell from the sums of ``_cell_adjoint``; returns ddelta (for ddelta_bias)."""
    gd = (s1 + u_c[cell] * s2) * dsp_c[cell]
    ddelta[b, c, cell] = gd
    du[b, c, cell] = dt * s2 + D_c * dy
    return gd


@_jit(fastmath=_FASTMATH, inline="always")
def _channel_backward(b, c, g, ins, dout, opt, grads, dBk, dCk, scratch):
    """Every gradient of channel c in batch b (see ``_scan_bwd``); dB and dC added into dBk, dCk (L, N)."""
    u, dlt, z, A, Bt, Ct, D, bias = ins
    has_z, softplus, flip_h, flip_v, transpose, H, W = opt
    du, ddelta, dz, dA_p, dD_p, dbias_p = grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]
    V, Rrow, arow, lam, rowA, dA, dt_c, dsp_c, dy_c, y_row = scratch
    N = A.shape[1]
    zero, one = u.dtype.type(0), u.dtype.type(1)
    u_c, A_c, D_c = u[b, c], A[c], D[c]
    z_c = z[b, c] if has_z else z[0, 0]
    Bg, Cg = Bt[b, g], Ct[b, g]
    j0, dj = (W - 1, -1) if flip_h else (0, 1)  # the t-th cell of the horizontal scan is column j0 + t dj

    # The forward again, keeping every row's vertical states (row s in V[(s + 1) * W + j], V[:W] = 0),
    # Δ and its derivative (dt_c, dsp_c), and the gradient dy_c of y = Σ_n C h.
    dD = 0.0
    for s in range(H):
        i = H - 1 - s if flip_v else s
        row = slice(i * W, (i + 1) * W)
        _row_dt(dlt[b, c, row], bias[c], softplus, dt_c[row], dsp_c[row], True)
        _row_forward(i, s + 1, s, W, flip_h, transpose, u_c, dt_c, Bg, Cg, A_c, V, Rrow[0], arow[0], y_row)
        u_r, g_r, dy_r = u_c[row], dout[b, c, row], dy_c[row]
        if has_z:
            z_r, dz_r = z_c[row], dz[b, c, row]
            for j in range(W):
                zv = z_r[j]
                sig = _sigmoid(zv)
                dz_r[j] = g_r[j] * (y_row[j] + D_c * u_r[j]) * sig * (one + zv * (one - sig))
                dy_r[j] = g_r[j] * zv * sig
        else:
            dy_r[:] = g_r
        dD_row = zero
        for j in range(W):
            dD_row += dy_r[j] * u_r[j]
        dD += dD_row  # float64: the sum over rows of float32 row sums

    # The adjoints, rows in reverse. lam[j]: the vertical pass's adjoint carried up column j;
    # lam[W]: the horizontal pass's adjoint carried along the row.
    lam[:] = 0
    Rrow[0] = 0
    dA[:] = 0
    dbias = 0.0
    for s in range(H - 1, -1, -1):
        i = H - 1 - s if flip_v else s
        # This row's decays and horizontal states, in horizontal scan order: arow[t], Rrow[t + 1].
        if transpose:
            for t in range(W):
                j = j0 + t * dj
                cell = i * W + j
                a_n, r_old, r_new, v_n = arow[t], Rrow[t], Rrow[t + 1], V[(s + 1) * W + j]
                _decays(a_n, dt_c[cell], A_c)
                for n in range(N):
                    r_new[n] = a_n[n] * r_old[n] + v_n[n]
        else:
            for t in range(W):
                j = j0 + t * dj
                cell = i * W + j
                dtu = dt_c[cell] * u_c[cell]
                a_n, r_old, r_new, b_n = arow[t], Rrow[t], Rrow[t + 1], Bg[cell]
                _decays(a_n, dt_c[cell], A_c)
                for n in range(N):
                    r_new[n] = a_n[n] * r_old[n] + dtu * b_n[n]
        rowA[:] = 0
        lam[W] = 0  # the horizontal adjoint starts afresh at the end of every row
        dbias_row = zero
        if transpose:  # second pass horizontal (Rrow, lam[W]), first vertical (V, lam[j])
            for t in range(W - 1, -1, -1):
                j = j0 + t * dj
                cell = i * W + j
                dyv, dtv = dy_c[cell], dt_c[cell]
                s1, s2 = _cell_adjoint(arow[t], Bg[cell], Cg[cell], dyv, dtv, dtv * u_c[cell], A_c, lam[W],
                                       lam[j], Rrow[t], V[s * W + j], Rrow[t + 1], dBk[cell], dCk[cell], rowA)
                dbias_row += _cell_grads(b, c, cell, s1, s2, dyv, dtv, u_c, D_c, dsp_c, du, ddelta)
        else:  # second pass vertical (V, lam[j]), first horizontal (Rrow, lam[W])
            for t in range(W - 1, -1, -1):
                j = j0 + t * dj
                cell = i * W + j
                dyv, dtv = dy_c[cell], dt_c[cell]
                s1, s2 = _cell_adjoint(arow[t], Bg[cell], Cg[cell], dyv, dtv, dtv * u_c[cell], A_c, lam[j],
                                       lam[W], V[s * W + j], Rrow[t], V[(s + 1) * W + j], dBk[cell],
                                       dCk[cell], rowA)
                dbias_row += _cell_grads(b, c, cell, s1, s2, dyv, dtv, u_c, D_c, dsp_c, du, ddelta)
        for n in range(N):
            dA[n] += rowA[n]  # float64: the sum over rows of float32 row sums
        dbias += dbias_row
    # These two stores stay before the final loop: placed after it, numba 0.68 under CPython 3.11
    # left them out of the compiled function (the poisoned-output tests catch that).
    dD_p[b, c] = dD
    dbias_p[b, c] = dbias
    for n in range(N):
        dA_p[b, c, n] = dA[n]


@_jit(nogil=True, fastmath=_FASTMATH)
def _scan_bwd(start, stop, ins, dout, opt, K, grads):
    """All gradients of the items start <= (b * groups + g) * K + k < stop: chunk k of K of group g's
    channels in batch b. Releases the GIL.

    dout: (batch, dim, L). grads = (du, ddelta, dz, dA_p, dD_p, dbias_p, dB_p, dC_p): du, ddelta, dz
    (batch, dim, L), dz a placeholder without a gate; per-(batch, channel) sums dA_p (batch, dim, N),
    dD_p, dbias_p (batch, dim); per-chunk sums dB_p, dC_p (batch, groups, K, L, N).
    """
    u, A, Bt = ins[0], ins[3], ins[4]
    H, W = opt[5], opt[6]
    dBp, dCp = grads[6], grads[7]
    L = u.shape[2]
    N = A.shape[1]
    groups = Bt.shape[1]
    per = u.shape[1] // groups
    dtype = u.dtype
    V = np.empty(((H + 1) * W, N), dtype=dtype)
    V[:W] = 0  # the row before the first
    scratch = (V, np.empty((W + 1, N), dtype=dtype), np.empty((W, N), dtype=dtype),
               np.empty((W + 1, N), dtype=dtype), np.empty(N, dtype=dtype), np.empty(N, dtype=np.float64),
               np.empty(L, dtype=dtype), np.empty(L, dtype=dtype), np.empty(L, dtype=dtype),
               np.empty(W, dtype=dtype))
    for item in range(start, stop):
        b, g, k = item // (groups * K), (item // K) % groups, item % K
        dBk, dCk = dBp[b, g, k], dCp[b, g, k]
        dBk[:] = 0
        dCk[:] = 0
        for c in range(g * per + (k * per) // K, g * per + ((k + 1) * per) // K):
            _channel_backward(b, c, g, ins, dout, opt, grads, dBk, dCk, scratch)


# --- torch side ------------------------------------------------------------------------------


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:  # a forked child has the pool object but none of its threads
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, made again when the count changes."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mamba2d-scan")
        return _POOL


def run_items(kernel, n_items: int, *args) -> None:
    """``kernel(start, stop, *args)`` over items 0 .. n_items - 1, split into equal contiguous ranges,
    one per thread of ``torch.get_num_threads()`` (the calling thread takes the first range; the
    kernels release the GIL, so the ranges run in parallel)."""
    threads = max(1, min(torch.get_num_threads(), n_items))
    bounds = [n_items * t // threads for t in range(threads + 1)]
    jobs = []
    if threads > 1:
        pool = _pool(threads - 1)
        jobs = [pool.submit(kernel, bounds[t], bounds[t + 1], *args) for t in range(1, threads)]
    kernel(bounds[0], bounds[1], *args)
    for job in jobs:
        job.result()


def channel_chunks(batch_groups: int, per_group: int, threads: int) -> int:
    """How many chunks each group's channels are split into in the backward (each has a dB/dC copy).

    One chunk when there are enough (batch, group) items to keep every thread busy; otherwise the
    fewest chunks that balance the items over the threads to within 10 %, at most ``threads``.
    """
    best, best_eff = 1, 0.0
    for k in range(1, min(per_group, threads) + 1):
        items = batch_groups * k
        eff = items / (-(-items // threads) * threads)
        if eff > best_eff + 1e-9:
            best, best_eff = k, eff
        if eff >= 0.9:
            break
    return best


def _sum_chunks(parts: torch.Tensor) -> torch.Tensor:
    """(batch, groups, K, L, N) -> (batch, groups, L, N), adding the chunks in order (deterministic;
    also far faster than ``sum(dim=2)``, which took ~20 ms for K = 2 at L = 1024 on 2 threads)."""
    total = parts[:, :, 0]
    for k in range(1, parts.shape[2]):
        total = total + parts[:, :, k]
    return total


def _alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.empty(shape, dtype=dtype)


class _Inputs:
    """The inputs as contiguous numpy arrays of the working dtype (float64 for float64 u, else float32).

    ``ins`` = (u, delta, z, A, B, C, D, delta_bias) in the kernels' layout: B and C transposed to
    (batch, groups, L, N) so that the states of one cell are contiguous; D and delta_bias zeros when
    absent (adding zero changes nothing); z a (1, 1, 1) placeholder when absent.
    """

    def __init__(self, u, delta, A, B, C, D, z, delta_bias):
        wd = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.wd = wd
        batch, dim, _ = u.shape

        def arr(t):
            return t.detach().to(wd).contiguous().numpy()

        self.has_z = z is not None
        self.ins = (arr(u), arr(delta), arr(z) if z is not None else np.zeros((1, 1, 1), dtype=arr(A).dtype),
                    arr(A), arr(B.transpose(2, 3)), arr(C.transpose(2, 3)),
                    arr(D) if D is not None else np.zeros(dim, dtype=arr(A).dtype),
                    arr(delta_bias) if delta_bias is not None else np.zeros(dim, dtype=arr(A).dtype))

    def opt(self, softplus: bool, layout: ScanLayout) -> tuple:
        """The kernels' runtime options: (has_z, softplus, flip_h, flip_v, transpose, H, W)."""
        return (self.has_z, bool(softplus), bool(layout.flip_h), bool(layout.flip_v), bool(layout.transpose),
                int(layout.height), int(layout.width))


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout):
        x = _Inputs(u, delta, A, B, C, D, z, delta_bias)
        out = _alloc(tuple(u.shape), x.wd)
        run_items(_scan_fwd, u.shape[0] * u.shape[1], x.ins, x.opt(delta_softplus, layout), out.numpy())
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.layout = layout
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        x = _Inputs(u, delta, A, B, C, D, z, delta_bias)
        wd = x.wd
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        K = channel_chunks(batch * groups, dim // groups, max(1, torch.get_num_threads()))
        chan, parts = (batch, dim, length), (batch, groups, K, length, dstate)
        grads = (_alloc(chan, wd), _alloc(chan, wd), _alloc(chan if z is not None else (1, 1, 1), wd),
                 _alloc((batch, dim, dstate), wd), _alloc((batch, dim), wd), _alloc((batch, dim), wd),
                 _alloc(parts, wd), _alloc(parts, wd))
        run_items(_scan_bwd, batch * groups * K, x.ins, dout.detach().to(wd).contiguous().numpy(),
                  x.opt(ctx.delta_softplus, ctx.layout), K, tuple(t.numpy() for t in grads))
        du, ddelta, dz, dA_p, dD_p, dbias_p, dBp, dCp = grads

        def cast(grad, like, needed):
            return grad.to(like.dtype).contiguous() if needed and like is not None else None

        need = ctx.needs_input_grad
        return (cast(du, u, need[0]), cast(ddelta, delta, need[1]), cast(dA_p.sum(dim=0), A, need[2]),
                cast(_sum_chunks(dBp).transpose(2, 3), B, need[3]),
                cast(_sum_chunks(dCp).transpose(2, 3), C, need[4]), cast(dD_p.sum(dim=0), D, need[5]),
                cast(dz, z, need[6]), cast(dbias_p.sum(dim=0), delta_bias, need[7]), None, None)


def selective_scan_2d_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout: ScanLayout):
    """CPU backend; B and C arrive as (batch, groups, dstate, L). See ``selective_scan_2d``.

    Tensors must be on the CPU. Returns (batch, dim, L) in ``u``'s dtype.
    """
    return _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), layout)
