"""backend="torch" (vectorised scan, hand-written backward) against the float64 reference."""

from __future__ import annotations

import itertools

import pytest
import scan_cases as sc
import torch

from mamba2d import selective_scan_2d

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


def _compare(t, softplus, H, W, seed, label, **flips):
    w = sc.make_weight(t, seed)
    got = sc.run("torch", t, softplus, H, W, w, **flips)
    ref = sc.reference(t, softplus, H, W, w, **flips)
    return sc.check(got, ref, sc.BOUNDS[t["u"].dtype], label)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-n{}-{}x{}-g{}".format(*s))
def test_shapes(shape, dtype):
    batch, dim, dstate, H, W, groups = shape
    seed = 1000 + 10 * SHAPES.index(shape) + DTYPES.index(dtype)
    t = sc.make_inputs(batch, dim, dstate, H, W, groups=groups, dtype=dtype, seed=seed)
    _compare(t, True, H, W, seed, f"{shape} {dtype}")


@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=4)),
                         ids=lambda o: "D{:d}-z{:d}-bias{:d}-sp{:d}".format(*o))
def test_options(opts):
    with_D, with_z, with_bias, softplus = opts
    seed = 1100 + sum(b << i for i, b in enumerate(opts))
    t = sc.make_inputs(2, 3, 4, 5, 6, seed=seed, with_D=with_D, with_z=with_z, with_bias=with_bias,
                       softplus=softplus)
    _compare(t, softplus, 5, 6, seed, f"opts={opts}")


@pytest.mark.parametrize("flips", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "fh{:d}-fv{:d}-tr{:d}".format(*f))
def test_directions(flips):
    flip_h, flip_v, transpose = flips
    seed = 1200 + sum(b << i for i, b in enumerate(flips))
    t = sc.make_inputs(2, 3, 4, 5, 6, seed=seed)
    _compare(t, True, 5, 6, seed, f"flips={flips}", flip_h=flip_h, flip_v=flip_v, transpose=transpose)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_dtype(dtype):
    t = sc.make_inputs(1, 2, 3, 4, 5, dtype=dtype, seed=1300)
    out = selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                            True, height=4, width=5, backend="torch")
    assert out.dtype == dtype
    assert out.shape == t["u"].shape


def test_auto_is_torch_on_cpu_without_numba(monkeypatch):
    # With numba, "auto" picks the "cpu" backend on CPU tensors (tests/test_scan_cpu.py).
    from mamba2d.ops import api, scan_torch

    monkeypatch.setattr(api, "_numba_import_error", lambda: "numba does not import (test)")
    t = sc.make_inputs(1, 2, 3, 4, 5, dtype=torch.float64, seed=1301)
    w = sc.make_weight(t, 1301)
    out = sc.forward("auto", t, True, 4, 5, (False, False, False), None)
    assert out.grad_fn._forward_cls is scan_torch._ScanFn
    got = sc.run("auto", t, True, 4, 5, w)
    sc.check(got, sc.reference(t, True, 4, 5, w), sc.BOUND_F64, "auto")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype):
    # State and accumulation stay float32; only the inputs, output and gradients are rounded.
    t = sc.make_inputs(2, 4, 16, 7, 9, dtype=dtype, seed=1400 + (dtype == torch.bfloat16))
    _compare(t, True, 7, 9, 1400, f"{dtype}")
