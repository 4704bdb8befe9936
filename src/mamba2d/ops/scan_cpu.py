"""CPU backend: numba-compiled forward and backward kernels, parallel over channels.

The grid is always walked row by row in memory order (rows in the vertical direction, cells in the
horizontal one), whatever the layout, so no input is ever transposed or flipped:

- default order (horizontal pass first): the horizontal state g is a running vector of dstate
  numbers along the row; the vertical state h lives in a W x dstate row buffer that each row
  updates elementwise;
- ``transpose`` (vertical pass first): the row buffer holds g and the running vector is h.

So the forward keeps O(W * dstate) state per channel and writes only ``out``. The backward
recomputes one channel's vertical states for the whole grid into per-thread scratch
((H + 1) * W * dstate numbers), then walks the rows in reverse, recomputing each row's decays and
running states, and runs both adjoint recurrences (the vertical adjoint again as a row buffer, the
horizontal one as a running vector).

Work split: the forward runs one (batch, channel) per parallel item. The backward runs one
(batch, group, chunk of channels) per item; every channel of a group shares B and C, so each
item accumulates its own copy of dB and dC (batch, groups, chunks, L, dstate), summed afterwards
in a fixed order: the result is deterministic for a given thread count (the chunk count follows it).

Precision: float64 inputs compute in float64; every other dtype is converted to float32 by torch
around the call (numba has no bfloat16). Sums over the grid (dA, dD, ddelta_bias) add float32 row
sums into float64. The float32 exponential is a polynomial that vectorises (libm's ``expf`` does not
without Intel's SVML); its relative error is a few float32 ulps.

Options (flips, transpose, softplus, z) are runtime arguments, so each kernel compiles once per
working dtype. Compiled code is cached next to this file (or numba's user-wide cache) when one of
those is writable; otherwise every process compiles it again.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from mamba2d.ops.layout import ScanLayout

POISON_OUTPUTS = False  # tests set this to fill every output buffer with NaN before a kernel runs

# No nnan/ninf: a NaN or inf in the inputs still propagates to the outputs.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def _jit(**options):
    """``numba.njit`` with ``cache=True``, falling back to no cache when no cache directory is writable."""

    def wrap(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(cache=False, **options)(fn)

    return wrap


# --- exp: a vectorisable float32 version; math.exp for float64 ---------------------------------

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two (Cody-Waite): k * hi is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.33)  # exp(x) >= the smallest normal float32 above this
_EXP_HI = np.float32(88.37)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_ONE32 = np.float32(1.0)
_HALF32 = np.float32(0.5)
_BIAS32 = np.int32(127)
_SHIFT32 = np.int32(23)


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret an int32 as a float32 (a bitcast, which LLVM vectorises)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(fastmath={"contract"}, inline="always")
def _exp_f32(x):
    # Without reassoc: the two-part ln 2 reduction must not be folded back into one product.
    x = min(max(x, _EXP_LO), _EXP_HI)
    k = math.floor(x * _LOG2E + _HALF32)
    r = x - k * _LN2_HI
    r = r - k * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = p * r * r + r + _ONE32
    scale = _bits_to_f32(np.int32((np.int32(k) + _BIAS32) << _SHIFT32))  # 2**k
    return p * scale


def _exp(x):  # placeholder resolved by the overload below inside compiled code
    return math.exp(x)


@overload(_exp, inline="always")
def _exp_impl(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


# --- kernels ---------------------------------------------------------------------------------
# ins = (u, dt, A, B, C): u, dt (batch, dim, L), dt = Δ already through delta_bias and softplus;
# A (dim, N); B, C (batch, groups, L, N). opt = (flip_h, flip_v, transpose, H, W).
# Inner loops run over the N states of one cell on 1D views, so that they vectorise.


@_jit(fastmath=_FASTMATH, inline="always")
def _row_forward(i, slot, prev, W, flip_h, transpose, u_c, dt_c, Bg, Cg, A_c, V, R, a, y_c):
    """One row of the forward: sets the vertical states V[slot * W + j] from V[prev * W + j] and
    y_c[cell] = Σ_n C h for the cells of row i.

    V: (slots * W, N) vertical states; R: (N,) scratch for the running horizontal state; a: (N,) scratch.
    """
    N = A_c.shape[0]
    R[:] = 0
    for t in range(W):
        j = W - 1 - t if flip_h else t
        cell = i * W + j
        dt = dt_c[cell]
        dtu = dt * u_c[cell]
        b_n, c_n = Bg[cell], Cg[cell]
        v_old, v_new = V[prev * W + j], V[slot * W + j]
        for n in range(N):
            a[n] = _exp(dt * A_c[n])
        acc = dt * 0
        if transpose:  # vertical pass first: V holds g, R holds h
            for n in range(N):
                v = a[n] * v_old[n] + dtu * b_n[n]
                v_new[n] = v
                r = a[n] * R[n] + v
                R[n] = r
                acc += c_n[n] * r
        else:  # horizontal pass first: R holds g, V holds h
            for n in range(N):
                r = a[n] * R[n] + dtu * b_n[n]
                R[n] = r
                v = a[n] * v_old[n] + r
                v_new[n] = v
                acc += c_n[n] * v
        y_c[cell] = acc


@_jit(nogil=True, fastmath=_FASTMATH)
def _scan_fwd(start, stop, ins, opt, y):
    """y[b, c] = Σ_n C h (no D, no gate) for the items start <= b * dim + c < stop. Releases the GIL."""
    u, dt, A, Bt, Ct = ins
    flip_h, flip_v, transpose, H, W = opt
    dim = u.shape[1]
    N = A.shape[1]
    per = dim // Bt.shape[1]
    V = np.empty((W, N), dtype=u.dtype)  # one row of vertical states, updated in place row after row
    R = np.empty(N, dtype=u.dtype)
    a = np.empty(N, dtype=u.dtype)
    for item in range(start, stop):
        b, c = item // dim, item % dim
        g = c // per
        V[:] = 0
        for s in range(H):
            i = H - 1 - s if flip_v else s
            _row_forward(i, 0, 0, W, flip_h, transpose, u[b, c], dt[b, c], Bt[b, g], Ct[b, g], A[c], V, R, a,
                         y[b, c])


@_jit(fastmath=_FASTMATH, inline="always")
def _cell_adjoint(a_n, b_n, c_n, dy, dt, dtu, A_c, lam1, lam2, pre1, pre2, h_n, db_n, dc_n, rowA):
    """Both adjoint recurrences at one cell, for all N states; returns (Σ_n A dlog a, Σ_n B λ_first).

    lam1 / lam2: the carried adjoints of the second / first pass (times their decay), updated here;
    pre1 / pre2: the second / first pass's states at this cell's predecessor along that pass;
    h_n: the second pass's states here (what C reads). Adds dt * dlog a into rowA and this cell's
    share of dB, dC into db_n, dc_n. Every argument but the scalars is an (N,) view.
    """
    N = A_c.shape[0]
    s1 = dt * 0
    s2 = dt * 0
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
def _channel_backward(b, c, g, ins, dy, opt, grads, dBk, dCk, scratch):
    """Channel c of batch b: y, du, ddt, dA_p (see ``_scan_bwd``); dB and dC added into dBk, dCk (L, N)."""
    u, dt, A, Bt, Ct = ins
    flip_h, flip_v, transpose, H, W = opt
    y, du, ddt, dA_p = grads[0], grads[1], grads[2], grads[3]
    V, Rrow, arow, lam, rowA, dA = scratch
    N = A.shape[1]
    u_c, dt_c, dy_c = u[b, c], dt[b, c], dy[b, c]
    A_c = A[c]
    Bg, Cg = Bt[b, g], Ct[b, g]

    # The forward again, keeping every row's vertical states: row s in V[(s + 1) * W + j], V[:W] = 0.
    for s in range(H):
        i = H - 1 - s if flip_v else s
        _row_forward(i, s + 1, s, W, flip_h, transpose, u_c, dt_c, Bg, Cg, A_c, V, Rrow[0], arow[0], y[b, c])

    # The adjoints, rows in reverse. lam[j]: the vertical pass's adjoint carried up column j;
    # lam[W]: the horizontal pass's adjoint carried along the row.
    lam[:] = 0
    Rrow[0] = 0
    dA[:] = 0
    for s in range(H - 1, -1, -1):
        i = H - 1 - s if flip_v else s
        # This row's decays and horizontal states, in horizontal scan order: arow[t], Rrow[t + 1].
        for t in range(W):
            j = W - 1 - t if flip_h else t
            cell = i * W + j
            dtv = dt_c[cell]
            dtu = dtv * u_c[cell]
            a_n, r_old, r_new = arow[t], Rrow[t], Rrow[t + 1]
            for n in range(N):
                a_n[n] = _exp(dtv * A_c[n])
            if transpose:
                v_n = V[(s + 1) * W + j]
                for n in range(N):
                    r_new[n] = a_n[n] * r_old[n] + v_n[n]
            else:
                b_n = Bg[cell]
                for n in range(N):
                    r_new[n] = a_n[n] * r_old[n] + dtu * b_n[n]
        rowA[:] = 0
        lam[W] = 0  # the horizontal adjoint starts afresh at the end of every row
        for t in range(W - 1, -1, -1):
            j = W - 1 - t if flip_h else t
            cell = i * W + j
            dyv, dtv, uv = dy_c[cell], dt_c[cell], u_c[cell]
            dtu = dtv * uv
            b_n, c_n, db_n, dc_n = Bg[cell], Cg[cell], dBk[cell], dCk[cell]
            if transpose:  # second pass horizontal (Rrow, lam[W]), first vertical (V, lam[j])
                s1, s2 = _cell_adjoint(arow[t], b_n, c_n, dyv, dtv, dtu, A_c, lam[W], lam[j], Rrow[t],
                                       V[s * W + j], Rrow[t + 1], db_n, dc_n, rowA)
            else:  # second pass vertical (V, lam[j]), first horizontal (Rrow, lam[W])
                s1, s2 = _cell_adjoint(arow[t], b_n, c_n, dyv, dtv, dtu, A_c, lam[j], lam[W], V[s * W + j],
                                       Rrow[t], V[(s + 1) * W + j], db_n, dc_n, rowA)
            ddt[b, c, cell] = s1 + uv * s2
            du[b, c, cell] = dtv * s2
        for n in range(N):
            dA[n] += rowA[n]  # float64: the sum over rows of float32 row sums
    for n in range(N):
        dA_p[b, c, n] = dA[n]


@_jit(nogil=True, fastmath=_FASTMATH)
def _scan_bwd(start, stop, ins, dy, opt, K, grads):
    """Gradients through the state recurrences of the items start <= (b * groups + g) * K + k < stop:
    chunk k of K of group g's channels in batch b. Releases the GIL.

    dy: (batch, dim, L), the gradient of y = Σ_n C h. grads = (y, du, ddt, dA_p, dB_p, dC_p): y again
    (for the z gate's gradient), du and ddt (batch, dim, L) through the scan only, dA_p (batch, dim, N),
    and per-chunk sums dB_p, dC_p (batch, groups, K, L, N).
    """
    u, A, Bt = ins[0], ins[2], ins[3]
    H, W = opt[3], opt[4]
    dBp, dCp = grads[4], grads[5]
    N = A.shape[1]
    groups = Bt.shape[1]
    per = u.shape[1] // groups
    V = np.empty(((H + 1) * W, N), dtype=u.dtype)
    V[:W] = 0  # the row before the first
    scratch = (V, np.empty((W + 1, N), dtype=u.dtype), np.empty((W, N), dtype=u.dtype),
               np.empty((W + 1, N), dtype=u.dtype), np.empty(N, dtype=u.dtype), np.empty(N, dtype=np.float64))
    for item in range(start, stop):
        b, g, k = item // (groups * K), (item // K) % groups, item % K
        dBk, dCk = dBp[b, g, k], dCp[b, g, k]
        dBk[:] = 0
        dCk[:] = 0
        for c in range(g * per + (k * per) // K, g * per + ((k + 1) * per) // K):
            _channel_backward(b, c, g, ins, dy, opt, grads, dBk, dCk, scratch)


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


def _alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.empty(shape, dtype=dtype)


class _Inputs:
    """The inputs in the working dtype (float64 for float64 u, else float32), for the kernels.

    ``ins`` = (u, dt, A, B, C) as contiguous numpy arrays: u, dt (batch, dim, L) with
    dt = softplus?(delta + delta_bias); A (dim, N); B, C transposed to (batch, groups, L, N) so that the
    states of one cell are contiguous. ``dt_raw`` keeps delta + delta_bias for softplus's derivative.
    """

    def __init__(self, u, delta, A, B, C, delta_bias, softplus: bool):
        wd = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.wd = wd
        self.u = u.detach().to(wd).contiguous()
        dt = delta.detach().to(wd)
        if delta_bias is not None:
            dt = dt + delta_bias.detach().to(wd)[None, :, None]
        self.dt_raw = dt
        self.dt = (F.softplus(dt) if softplus else dt).contiguous()
        bt = B.detach().to(wd).transpose(2, 3).contiguous()
        ct = C.detach().to(wd).transpose(2, 3).contiguous()
        a = A.detach().to(wd).contiguous()
        self.ins = (self.u.numpy(), self.dt.numpy(), a.numpy(), bt.numpy(), ct.numpy())


def _opt(layout: ScanLayout) -> tuple:
    """The kernels' runtime options: (flip_h, flip_v, transpose, H, W)."""
    return (bool(layout.flip_h), bool(layout.flip_v), bool(layout.transpose), int(layout.height),
            int(layout.width))


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout):
        x = _Inputs(u, delta, A, B, C, delta_bias, delta_softplus)
        y = _alloc(tuple(u.shape), x.wd)
        run_items(_scan_fwd, u.shape[0] * u.shape[1], x.ins, _opt(layout), y.numpy())
        if D is not None:
            y = y.addcmul_(D.detach().to(x.wd)[None, :, None], x.u)
        out = y.mul_(F.silu(z.detach().to(x.wd))) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.layout = layout
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        x = _Inputs(u, delta, A, B, C, delta_bias, ctx.delta_softplus)
        wd = x.wd
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        K = channel_chunks(batch * groups, dim // groups, max(1, torch.get_num_threads()))
        dout = dout.detach().to(wd)
        if z is not None:
            zf = z.detach().to(wd)
            sig = torch.sigmoid(zf)
            dy = (dout * zf * sig).contiguous()
        else:
            dy = dout.contiguous()
        chan, parts = (batch, dim, length), (batch, groups, K, length, dstate)
        grads = (_alloc(chan, wd), _alloc(chan, wd), _alloc(chan, wd), _alloc((batch, dim, dstate), wd),
                 _alloc(parts, wd), _alloc(parts, wd))
        run_items(_scan_bwd, batch * groups * K, x.ins, dy.numpy(), _opt(ctx.layout), K,
                  tuple(t.numpy() for t in grads))
        y, du, ddt, dA_p, dBp, dCp = grads
        need = ctx.needs_input_grad
        dz = dD = None
        if D is not None:
            Dw = D.detach().to(wd)[None, :, None]
            du.addcmul_(Dw, dy)
            if need[5]:
                dD = (dy * x.u).sum(dim=(0, 2))
        if z is not None and need[6]:
            if D is not None:
                y.addcmul_(Dw, x.u)
            dz = dout * y * sig * (1 + zf * (1 - sig))
        if ctx.delta_softplus:
            ddt.mul_(torch.sigmoid(x.dt_raw))  # softplus' = sigmoid
        dbias = ddt.sum(dim=(0, 2)) if delta_bias is not None and need[7] else None
        dB = (dBp[:, :, 0] if K == 1 else dBp.sum(dim=2)).transpose(2, 3)
        dC = (dCp[:, :, 0] if K == 1 else dCp.sum(dim=2)).transpose(2, 3)

        def cast(grad, like, needed):
            return grad.to(like.dtype).contiguous() if needed and grad is not None else None

        return (cast(du, u, need[0]), cast(ddt, delta, need[1]), cast(dA_p.sum(dim=0), A, need[2]),
                cast(dB, B, need[3]), cast(dC, C, need[4]), cast(dD, D, need[5]), cast(dz, z, need[6]),
                cast(dbias, delta_bias, need[7]), None, None)


def selective_scan_2d_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout: ScanLayout):
    """CPU backend; B and C arrive as (batch, groups, dstate, L). See ``selective_scan_2d``.

    Tensors must be on the CPU. Returns (batch, dim, L) in ``u``'s dtype.
    """
    return _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), layout)
