"""The 1D selective scan: the chunked Triton kernel against the float64 reference, the CPU route,
and the routing of one-line grids from selective_scan_2d.

Without CUDA the kernel runs in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1),
so every case is tiny, with chunks of a few tokens so that several chunks (and several blocks of
chunks in the scan across chunks) carry state and adjoint across their borders. Every output and
partial buffer starts as NaN (POISON_OUTPUTS): an element a kernel forgets to write fails
``scan_cases.check``. The reference is ``selective_scan_2d(backend="reference")`` on the one-row
grid, in float64.
"""

from __future__ import annotations

import itertools

import pytest
import scan_cases as sc
import torch

from mamba2d import selective_scan_1d, selective_scan_2d
from mamba2d.ops import api, scan1d_triton
from mamba2d.ops.layout import ScanLayout

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(scan1d_triton, "POISON_OUTPUTS", True)


def _scan(t, softplus, reverse, backend="triton"):
    return selective_scan_1d(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"),
                             t.get("delta_bias"), softplus, reverse=reverse, backend=backend)


def _compare(t, softplus, reverse, seed, label, backend="triton"):
    """Output and all gradients of selective_scan_1d against the float64 reference."""
    L = t["u"].shape[2]
    w = sc.make_weight(t, seed)
    out = _scan(t, softplus, reverse, backend)
    assert out.dtype == t["u"].dtype and out.shape == t["u"].shape
    names = [n for n in sc.GRAD_NAMES if n in t]
    grads = torch.autograd.grad((out * w.to(out.dtype)).sum(), [t[n] for n in names])
    ref = sc.reference(t, softplus, 1, L, w, flip_h=reverse)
    return sc.check((out.detach(), dict(zip(names, grads, strict=True))), ref, sc.BOUNDS[t["u"].dtype], label)


def _chunk(monkeypatch, T):
    monkeypatch.setattr(scan1d_triton, "CHUNK_OVERRIDE", T)


def test_poison_fills_with_nan():
    assert torch.isnan(scan1d_triton._alloc((2, 3), F32, DEVICE)).all()


# L: one token, shorter than a chunk, exactly two chunks, and ragged last chunks.
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("L", [1, 5, 16, 19, 29])
def test_lengths(monkeypatch, L, reverse):
    _chunk(monkeypatch, 8)
    seed = 3000 + 2 * L + reverse
    t = sc.make_inputs(2, 3, 3, 1, L, dtype=F32, device=DEVICE, seed=seed)
    p = scan1d_triton.plan_1d(2, 3, 1, 3, L)
    assert p.K == -(-L // 8)
    _compare(t, True, reverse, seed, f"L={L} reverse={reverse} plan={p}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_many_blocks_of_chunks(monkeypatch, reverse):
    # 10 chunks of 4 tokens, scanned across 2 chunks at a time: the carry between blocks of chunks.
    _chunk(monkeypatch, 4)
    monkeypatch.setattr(scan1d_triton, "CHUNKS_PER_BLOCK", 2)
    seed = 3100 + reverse
    t = sc.make_inputs(1, 2, 2, 1, 37, dtype=F32, device=DEVICE, seed=seed)
    assert scan1d_triton.plan_1d(1, 2, 1, 2, 37).K == 10
    _compare(t, True, reverse, seed, f"blocks of chunks reverse={reverse}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("target", [1, 4096], ids=["one-part", "parts"])
def test_groups_and_channel_parts(monkeypatch, target, reverse):
    # target=1: one program walks all 4 channels of a group (P = 1, dB/dC written in place);
    # target=4096: one channel per program (P = 4 parts per group, summed afterwards).
    _chunk(monkeypatch, 4)
    monkeypatch.setattr(scan1d_triton, "TARGET_PROGRAMS", target)
    seed = 3200 + 2 * (target > 1) + reverse
    t = sc.make_inputs(2, 8, 3, 1, 11, groups=2, dtype=F32, device=DEVICE, seed=seed)
    p = scan1d_triton.plan_1d(2, 8, 2, 3, 11)
    assert (p.CB, p.P) == ((4, 1) if target == 1 else (1, 4))
    _compare(t, True, reverse, seed, f"groups=2 plan={p}")


@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=4)),
                         ids=lambda o: "D{:d}-z{:d}-bias{:d}-sp{:d}".format(*o))
def test_options(monkeypatch, opts):
    _chunk(monkeypatch, 4)
    with_D, with_z, with_bias, softplus = opts
    seed = 3300 + sum(b << i for i, b in enumerate(opts))
    t = sc.make_inputs(1, 2, 2, 1, 10, dtype=F32, device=DEVICE, seed=seed, with_D=with_D, with_z=with_z,
                       with_bias=with_bias, softplus=softplus)
    _compare(t, softplus, bool(seed % 2), seed, f"opts={opts}")


@pytest.mark.parametrize("dstate", [1, 5])
def test_dstate(monkeypatch, dstate):
    _chunk(monkeypatch, 4)
    seed = 3400 + dstate
    t = sc.make_inputs(1, 2, dstate, 1, 13, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, False, seed, f"dstate={dstate}")


def test_state_split(monkeypatch):
    # dstate 5 in launches of at most 2 states; their outputs add up, D and z applied once.
    _chunk(monkeypatch, 4)
    monkeypatch.setattr(scan1d_triton, "MAX_STATES_PER_LAUNCH", 2)
    seed = 3500
    t = sc.make_inputs(1, 2, 5, 1, 11, dtype=F32, device=DEVICE, seed=seed)
    _compare(t, True, True, seed, "state split")


def test_float16_inputs(monkeypatch):
    _chunk(monkeypatch, 4)
    seed = 3600
    t = sc.make_inputs(1, 2, 3, 1, 14, dtype=torch.float16, device=DEVICE, seed=seed)
    _compare(t, True, False, seed, "fp16")


def test_model_layouts(monkeypatch):
    # As the Mamba layers pass them: u, delta, z as (batch, dim, L) views of (batch, L, dim)
    # tensors, B and C as views of (batch, L, dstate); A as the transpose of a (dstate, dim) tensor.
    _chunk(monkeypatch, 4)
    seed = 3700
    base = sc.make_inputs(2, 3, 2, 1, 10, dtype=F32, device=DEVICE, seed=seed)
    t = {}
    for k, v in base.items():
        v = v.detach()
        if k in ("u", "delta", "z", "B", "C"):
            t[k] = v.transpose(1, 2).contiguous().requires_grad_().transpose(1, 2)
        elif k == "A":
            t[k] = v.t().contiguous().requires_grad_().t()
        else:
            t[k] = v.clone().requires_grad_()
    assert not any(t[k].is_contiguous() for k in ("u", "delta", "z", "B", "C", "A"))
    _compare(t, True, True, seed, "strided inputs")


def test_forward_without_grad(monkeypatch):
    _chunk(monkeypatch, 4)
    t = sc.make_inputs(1, 2, 2, 1, 9, dtype=F32, device=DEVICE, seed=3800)
    with torch.no_grad():
        out = _scan(t, True, False)
        ref = _scan({k: v.double().cpu() for k, v in t.items()}, True, False, backend="reference")
    assert torch.isfinite(out).all()
    assert sc.rel_err(out, ref) < sc.BOUND_F32


# --------------------------------------------------------------------------------------------------
# The CPU route and the routing of one-line grids


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_cpu_route_matches_reference(reverse):
    # Off CUDA, "auto" is the 2D operator's own CPU backend on the one-row grid.
    seed = 3900 + reverse
    t = sc.make_inputs(2, 4, 3, 1, 23, groups=2, dtype=torch.float64, seed=seed)
    _compare(t, True, reverse, seed, f"cpu auto reverse={reverse}", backend="auto")


def test_cpu_route_float32():
    seed = 3910
    t = sc.make_inputs(1, 3, 2, 1, 17, dtype=F32, seed=seed)
    _compare(t, True, True, seed, "cpu auto fp32", backend="auto")


def test_one_line_reverse():
    assert api.one_line_reverse(ScanLayout(1, 7, flip_h=True, flip_v=False)) is True
    assert api.one_line_reverse(ScanLayout(1, 7, flip_h=False, flip_v=True, transpose=True)) is False
    assert api.one_line_reverse(ScanLayout(7, 1, flip_h=True, flip_v=True)) is True
    assert api.one_line_reverse(ScanLayout(7, 1, flip_h=True, flip_v=False)) is False
    assert api.one_line_reverse(ScanLayout(2, 3)) is None


GRIDS = [(1, 12, True, False, True), (12, 1, False, True, False), (3, 4, True, True, False)]


@pytest.mark.parametrize("grid", GRIDS, ids=["row", "column", "2d"])
def test_one_line_grids_take_the_1d_kernel(monkeypatch, grid):
    """selective_scan_2d(backend="auto") sends a one-row or one-column grid to the 1D kernel (the
    rule applies to CUDA tensors; here it is switched on for CPU tensors under the interpreter)."""
    H, W, flip_h, flip_v, transpose = grid
    _chunk(monkeypatch, 4)
    monkeypatch.setattr(api, "_route_1d", lambda u: True)
    calls = []
    real = scan1d_triton.selective_scan_1d_triton

    def spy(*args):
        calls.append(args[-1])  # reverse
        return real(*args)

    monkeypatch.setattr(scan1d_triton, "selective_scan_1d_triton", spy)
    seed = 4000 + H
    t = sc.make_inputs(1, 2, 2, H, W, dtype=F32, seed=seed)
    w = sc.make_weight(t, seed)
    flips = dict(flip_h=flip_h, flip_v=flip_v, transpose=transpose)
    got = sc.run("auto", t, True, H, W, w, **flips)
    if H == 1 or W == 1:
        assert calls == [flip_h if H == 1 else flip_v]
    else:
        assert calls == []
    sc.check(got, sc.reference(t, True, H, W, w, **flips), sc.BOUND_F32, f"grid {grid}")


def test_cpu_auto_does_not_route():
    assert api._route_1d(torch.zeros(1, 1, 1)) is False


@pytest.mark.parametrize("case", [
    ("u", torch.zeros(2, 3), r"^u must have 3 dimensions"),
    ("B", torch.zeros(1, 2, 5), r"^B has dstate 2 but A has dstate 3"),
    ("backend", "cuda", r"^backend must be one of"),
], ids=lambda c: c[0])
def test_bad_arguments(case):
    name, value, message = case
    t = {k: v.detach() for k, v in sc.make_inputs(1, 2, 3, 1, 5, seed=4100).items()}
    args = dict(u=t["u"], delta=t["delta"], A=t["A"], B=t["B"], C=t["C"], backend="auto")
    args[name] = value
    with pytest.raises(ValueError, match=message):
        selective_scan_1d(**args)


def test_matches_selective_scan_2d_on_one_row():
    t = {k: v.detach() for k, v in sc.make_inputs(2, 3, 2, 1, 9, seed=4200).items()}
    for reverse in (False, True):
        a = _scan(t, True, reverse, backend="torch")
        b = selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                              True, height=1, width=9, flip_h=reverse, backend="torch")
        assert torch.equal(a, b)
