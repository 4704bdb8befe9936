"""backend="cpu" (numba kernels, ops/scan_cpu.py) against the float64 reference.

Every output and gradient buffer the kernels fill starts as NaN (scan_cpu.POISON_OUTPUTS), so an
element a kernel forgets to write shows up as a non-finite value, which ``scan_cases.check`` rejects.
Compiling the kernels (float32 and float64) takes most of this file's time on a cold numba cache.
"""

from __future__ import annotations

import itertools

import pytest
import scan_cases as sc
import torch

from mamba2d import selective_scan_2d
from mamba2d.ops import api, scan_cpu, scan_torch

pytest.importorskip("numba")

# float32 inputs compute in float32 here; the bound is tighter than the shared 5e-5.
BOUND_F32_CPU = 1e-5
BOUNDS = {**sc.BOUNDS, torch.float32: BOUND_F32_CPU}

# (batch, dim, dstate, H, W, groups)
SHAPES = [
    (2, 3, 1, 1, 1, None),
    (1, 2, 4, 1, 17, None),
    (1, 2, 4, 17, 1, None),
    (2, 4, 16, 7, 13, None),
    (1, 4, 16, 33, 47, None),
    (2, 4, 3, 7, 13, 2),
    (1, 6, 2, 5, 6, 3),
]
DTYPES = [torch.float64, torch.float32]
FLIPS = list(itertools.product([False, True], repeat=3))  # (flip_h, flip_v, transpose)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(scan_cpu, "POISON_OUTPUTS", True)


def _compare(t, softplus, H, W, seed, label, **flips):
    w = sc.make_weight(t, seed)
    got = sc.run("cpu", t, softplus, H, W, w, **flips)
    ref = sc.reference(t, softplus, H, W, w, **flips)
    assert got[0].dtype == t["u"].dtype
    for name, grad in got[1].items():
        assert grad.dtype == t[name].dtype, f"{label}: grad {name} is {grad.dtype}, input {t[name].dtype}"
    return sc.check(got, ref, BOUNDS[t["u"].dtype], label)


def test_poison_fills_with_nan():
    assert torch.isnan(scan_cpu._alloc((3, 4), torch.float32)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-n{}-{}x{}-g{}".format(*s))
def test_shapes(shape, dtype):
    batch, dim, dstate, H, W, groups = shape
    seed = 3000 + 10 * SHAPES.index(shape) + DTYPES.index(dtype)
    t = sc.make_inputs(batch, dim, dstate, H, W, groups=groups, dtype=dtype, seed=seed)
    _compare(t, True, H, W, seed, f"{shape} {dtype}")


@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=4)),
                         ids=lambda o: "D{:d}-z{:d}-bias{:d}-sp{:d}".format(*o))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options(opts, dtype):
    with_D, with_z, with_bias, softplus = opts
    seed = 3100 + sum(b << i for i, b in enumerate(opts)) + 20 * DTYPES.index(dtype)
    t = sc.make_inputs(2, 3, 4, 5, 6, dtype=dtype, seed=seed, with_D=with_D, with_z=with_z,
                       with_bias=with_bias, softplus=softplus)
    _compare(t, softplus, 5, 6, seed, f"opts={opts}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flips", FLIPS, ids=lambda f: "fh{:d}-fv{:d}-tr{:d}".format(*f))
def test_directions(flips, dtype):
    # Non-square, grouped B/C: a transposed or flipped index that is off shows in every gradient.
    flip_h, flip_v, transpose = flips
    seed = 3200 + sum(b << i for i, b in enumerate(flips)) + 10 * DTYPES.index(dtype)
    t = sc.make_inputs(2, 4, 5, 6, 9, groups=2, dtype=dtype, seed=seed)
    _compare(t, True, 6, 9, seed, f"flips={flips}", flip_h=flip_h, flip_v=flip_v, transpose=transpose)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype):
    # Computed in float32; only the inputs, the output and the gradients are rounded to the half type.
    seed = 3300 + (dtype == torch.bfloat16)
    t = sc.make_inputs(2, 4, 16, 7, 9, dtype=dtype, seed=seed)
    _compare(t, True, 7, 9, seed, f"{dtype}", transpose=True)


def test_float32_inputs_with_float64_parameters():
    # The working dtype follows u; A, D and delta_bias get gradients in their own dtype.
    t = sc.make_inputs(1, 3, 4, 4, 5, dtype=torch.float32, seed=3310)
    for name in ("A", "D", "delta_bias"):
        t[name] = t[name].detach().double().requires_grad_()
    _compare(t, True, 4, 5, 3310, "mixed")


def test_strided_inputs():
    # Views with gaps (every other channel of a bigger tensor, B and C as a transposed view).
    t = sc.make_inputs(2, 6, 4, 5, 7, dtype=torch.float32, seed=3320)
    for name in ("u", "delta", "z"):
        t[name] = t[name].detach().repeat(1, 2, 1)[:, ::2].requires_grad_()
        assert not t[name].is_contiguous()
    for name in ("B", "C"):
        t[name] = t[name].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        assert not t[name].is_contiguous()
    _compare(t, True, 5, 7, 3320, "strided")


def test_only_some_gradients():
    t = sc.make_inputs(1, 3, 4, 4, 5, dtype=torch.float64, seed=3330)
    for name in ("delta", "A", "B", "C", "D", "z", "delta_bias"):
        t[name] = t[name].detach()
    w = sc.make_weight(t, 3330)
    out = selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                            True, height=4, width=5, backend="cpu")
    (du,) = torch.autograd.grad((out * w).sum(), [t["u"]])
    ref = sc.reference(t, True, 4, 5, w)
    assert sc.rel_err(du, ref[1]["u"]) <= sc.BOUND_F64


def test_gradcheck():
    # Finite differences, independent of the reference backend.
    t = sc.make_inputs(1, 2, 3, 3, 4, groups=2, dtype=torch.float64, seed=3340)
    names = list(sc.GRAD_NAMES)

    def fn(*args):
        a = dict(zip(names, args, strict=True))
        return selective_scan_2d(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                                 True, height=3, width=4, transpose=True, flip_v=True, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(t[n] for n in names), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_two_threads_and_channel_chunks(monkeypatch):
    # batch 1, one group: the backward splits the channels into chunks with their own dB/dC copies.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert scan_cpu.channel_chunks(1, 8, 2) == 2
        t = sc.make_inputs(1, 8, 4, 6, 5, dtype=torch.float64, seed=3350)
        _compare(t, True, 6, 5, 3350, "2 threads")
    finally:
        torch.set_num_threads(threads)


def test_channel_chunks():
    assert scan_cpu.channel_chunks(8, 256, 2) == 1  # enough (batch, group) items already
    assert scan_cpu.channel_chunks(1, 256, 4) == 4
    assert scan_cpu.channel_chunks(3, 256, 2) == 2  # 3 items on 2 threads: 75 %; 6 items: 100 %
    assert scan_cpu.channel_chunks(1, 1, 8) == 1  # never more chunks than channels


def test_deterministic():
    t = sc.make_inputs(1, 8, 4, 6, 5, dtype=torch.float32, seed=3360)
    w = sc.make_weight(t, 3360)
    first = sc.run("cpu", t, True, 6, 5, w)
    second = sc.run("cpu", t, True, 6, 5, w)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_auto_is_cpu_on_cpu():
    t = sc.make_inputs(1, 2, 3, 4, 5, dtype=torch.float32, seed=3370)
    out = sc.forward("auto", t, True, 4, 5, (False, False, False), None)
    assert out.grad_fn._forward_cls is scan_cpu._ScanFn


def test_auto_without_numba_is_torch(monkeypatch):
    monkeypatch.setattr(api, "_numba_import_error", lambda: "numba does not import (test)")
    t = sc.make_inputs(1, 2, 3, 4, 5, dtype=torch.float32, seed=3371)
    out = sc.forward("auto", t, True, 4, 5, (False, False, False), None)
    assert out.grad_fn._forward_cls is scan_torch._ScanFn
    with pytest.raises(ValueError, match=r"^backend='cpu' cannot run here: numba does not import \(test\)"):
        sc.forward("cpu", t, True, 4, 5, (False, False, False), None)


def test_cpu_backend_needs_cpu_tensors():
    u = torch.empty(1, 2, 6, device="meta")
    A = torch.empty(2, 3, device="meta")
    B = torch.empty(1, 3, 6, device="meta")
    with pytest.raises(ValueError, match=r"^backend='cpu' cannot run here: tensors are on meta"):
        selective_scan_2d(u, u, A, B, B, height=2, width=3, backend="cpu")


def test_no_writable_cache_falls_back(monkeypatch):
    # With no cache location numba refuses cache=True at decoration; the kernels must still compile.
    from numba.core.caching import CacheImpl

    monkeypatch.setattr(CacheImpl, "_locator_classes", [])

    def twice(x):
        return 2 * x

    assert scan_cpu._jit()(twice)(21) == 42


def test_float32_elementary_functions():
    # exp, softplus and sigmoid as the kernels compile them (their fastmath flags), against float64.
    import numba
    import numpy as np

    @numba.njit(fastmath=scan_cpu._FASTMATH)
    def apply(x, out):
        for i in range(x.shape[0]):
            out[0, i] = scan_cpu._exp(x[i])
            out[1, i] = scan_cpu._softplus(x[i])
            out[2, i] = scan_cpu._sigmoid(x[i])

    rng = np.random.default_rng(3380)
    x = np.concatenate([np.linspace(-87, 88, 20001), rng.normal(0, 4, 20000)]).astype(np.float32)
    out = np.empty((3, x.size), dtype=np.float32)
    apply(x, out)
    xd = x.astype(np.float64)
    for name, got, want in (("exp", out[0], np.exp(xd)), ("softplus", out[1], np.logaddexp(0, xd)),
                            ("sigmoid", out[2], 1 / (1 + np.exp(-xd)))):
        normal = want > 1.2e-38  # float32 normals; the kernels' exp stops at the smallest one
        rel = np.abs(got - want) / np.where(normal, want, 1)
        # A few float32 ulps (6e-8 each); a little more where exp's argument reduction has |k| near 126.
        for where, bound in ((normal, 5e-7), (normal & (np.abs(xd) <= 20), 3e-7)):
            worst = rel[where].max()
            assert worst < bound, f"{name}: relative error {worst:.2e} at x = {x[where][rel[where].argmax()]}"
