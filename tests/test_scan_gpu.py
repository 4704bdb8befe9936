"""The Triton backend on CUDA at realistic sizes, against the float64 reference computed on the GPU.

Skipped without CUDA. ``pytest tests/test_scan_gpu.py -s`` prints one line per case.
"""

from __future__ import annotations

import itertools

import pytest
import scan_cases as sc
import torch

from mamba2d.ops import scan_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (batch, dim, dstate, H, W, groups); dstate 64 > MAX_STATES_PER_LAUNCH takes the split path.
SHAPES = [
    (2, 4, 16, 256, 256, None),
    (1, 4, 16, 200, 300, None),
    (2, 8, 16, 64, 64, None),
    (4, 8, 1, 56, 56, None),
    (2, 8, 16, 28, 28, 2),
    (2, 8, 16, 14, 14, None),
    (1, 4, 16, 1, 4096, None),
    (2, 4, 64, 33, 47, None),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLIP_COMBOS = list(itertools.product([False, True], repeat=3))  # (flip_h, flip_v, transpose)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(scan_triton, "POISON_OUTPUTS", True)


def _case(shape, dtype, seed, backend="triton-kernel", tile_elems=None, **flips):
    batch, dim, dstate, H, W, groups = shape
    t = sc.make_inputs(batch, dim, dstate, H, W, groups=groups, dtype=dtype, device="cuda", seed=seed)
    w = sc.make_weight(t, seed)
    got = sc.run(backend, t, True, H, W, w, tile_elems=tile_elems, **flips)
    ref = sc.reference(t, True, H, W, w, **flips)
    dname = str(dtype).removeprefix("torch.")
    label = f"{shape} {dname} tile_elems={tile_elems} flips={tuple(flips.values())}"
    errs = sc.errors(got, ref)
    worst = max(errs, key=errs.get)
    print(f"\n{label}: max rel err {errs[worst]:.2e} ({worst})", end="")
    assert got[0].dtype == dtype
    sc.check(got, ref, sc.BOUNDS[dtype], label)
    del got, ref, t
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-n{}-{}x{}-g{}".format(*s))
def test_shapes(shape, dtype):
    seed = 3000 + 10 * SHAPES.index(shape) + DTYPES.index(dtype)
    _case(shape, dtype, seed, backend="triton")


@pytest.mark.parametrize("flips", FLIP_COMBOS, ids=lambda f: "fh{:d}-fv{:d}-tr{:d}".format(*f))
def test_directions(flips):
    flip_h, flip_v, transpose = flips
    seed = 3100 + sum(b << i for i, b in enumerate(flips))
    _case((1, 4, 16, 96, 80, None), torch.float32, seed, flip_h=flip_h, flip_v=flip_v, transpose=transpose)


@pytest.mark.parametrize("tile_elems", [1024, 2048, 4096])
def test_tile_elems(tile_elems):
    _case((1, 4, 16, 128, 128, None), torch.float32, 3200 + tile_elems // 1024, tile_elems=tile_elems)
