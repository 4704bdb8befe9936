"""Bad arguments to selective_scan_2d raise ValueError naming the argument at fault."""

from __future__ import annotations

import pytest
import scan_cases as sc
import torch

from mamba2d import selective_scan_2d

BATCH, DIM, DSTATE, H, W = 2, 4, 3, 3, 5
L = H * W


def _args(seed=0):
    t = {k: v.detach() for k, v in sc.make_inputs(BATCH, DIM, DSTATE, H, W, seed=seed).items()}
    kwargs = dict(D=t.pop("D"), z=t.pop("z"), delta_bias=t.pop("delta_bias"), delta_softplus=True,
                  height=H, width=W, backend="torch")
    return t, kwargs


def _randn(*shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(len(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _call(t, kwargs):
    return selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], **kwargs)


# (id, {tensor argument: replacement} or {keyword: replacement}, regex the message must match)
CASES = [
    ("u-ndim", {"u": _randn(BATCH, DIM, H, W)}, r"^u must have 3 dimensions"),
    ("u-int", {"u": torch.ones(BATCH, DIM, L, dtype=torch.int64)}, r"^u must be a floating tensor"),
    ("u-not-tensor", {"u": [[1.0]]}, r"^u must be a torch\.Tensor"),
    ("delta-shape", {"delta": _randn(BATCH, DIM, L - 1)}, r"^delta must have shape"),
    ("delta-ndim", {"delta": _randn(BATCH, DIM)}, r"^delta must have 3 dimensions"),
    ("delta-dtype", {"delta": _randn(BATCH, DIM, L, dtype=torch.float32)}, r"^delta has dtype.*float32"),
    ("A-dim", {"A": -_randn(DIM + 1, DSTATE).abs()}, r"^A must have shape \(dim, dstate\)"),
    ("A-ndim", {"A": -_randn(DIM * DSTATE).abs()}, r"^A must have 2 dimensions"),
    ("A-no-state", {"A": torch.zeros(DIM, 0, dtype=torch.float64)}, r"^A must have at least one state"),
    ("B-dstate", {"B": _randn(BATCH, DSTATE + 1, L)}, r"^B has dstate 4 but A has dstate 3"),
    ("C-dstate", {"C": _randn(BATCH, DSTATE - 1, L)}, r"^C has dstate 2 but A has dstate 3"),
    ("B-batch", {"B": _randn(BATCH + 1, DSTATE, L)}, r"^B has batch 3 but u has batch 2"),
    ("C-batch", {"C": _randn(BATCH + 1, 1, DSTATE, L)}, r"^C has batch 3"),
    ("B-length", {"B": _randn(BATCH, DSTATE, L + 1)}, r"^B has 16 tokens"),
    ("B-ndim", {"B": _randn(DSTATE, L)}, r"^B must have 3 or 4 dimensions"),
    ("B-groups", {"B": _randn(BATCH, 3, DSTATE, L), "C": _randn(BATCH, 3, DSTATE, L)},
     r"^B has 3 groups, which does not divide dim = 4"),
    ("C-groups", {"C": _randn(BATCH, 3, DSTATE, L)}, r"^C has 3 groups, which does not divide dim = 4"),
    ("BC-groups", {"B": _randn(BATCH, 2, DSTATE, L), "C": _randn(BATCH, 4, DSTATE, L)},
     r"^B has 2 groups but C has 4"),
    ("D-shape", {"D": _randn(DIM + 1)}, r"^D must have shape \(dim,\)"),
    ("D-ndim", {"D": _randn(DIM, 1)}, r"^D must have 1 dimensions"),
    ("bias-shape", {"delta_bias": _randn(DIM - 1)}, r"^delta_bias must have shape \(dim,\)"),
    ("bias-int", {"delta_bias": torch.zeros(DIM, dtype=torch.int32)}, r"^delta_bias must be a floating"),
    ("z-shape", {"z": _randn(BATCH, DIM, L + 1)}, r"^z must have shape \(batch, dim, L\)"),
    ("z-dtype", {"z": _randn(BATCH, DIM, L, dtype=torch.float32)}, r"^z has dtype"),
    ("B-device", {"B": torch.empty(BATCH, DSTATE, L, dtype=torch.float64, device="meta")},
     r"^B is on meta but u is on cpu"),
    ("hw-mismatch", {"height": H + 1}, r"height \* width = 4 \* 5 = 20 but u has L = 15"),
    ("hw-mismatch-width", {"width": W - 1}, r"height \* width.*but u has L = 15"),
    ("height-zero", {"height": 0, "width": L}, r"^height must be a positive int, got 0"),
    ("height-float", {"height": 3.0}, r"^height must be a positive int, got 3\.0"),
    ("height-bool", {"height": True, "width": L}, r"^height must be a positive int, got True"),
    ("width-negative", {"width": -W}, r"^width must be a positive int"),
    ("backend", {"backend": "cuda"}, r"^backend must be one of .*'cuda'"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument(change, match):
    t, kwargs = _args()
    for k, v in change.items():
        (t if k in t else kwargs)[k] = v
    with pytest.raises(ValueError, match=match):
        _call(t, kwargs)


def test_good_arguments_pass():
    # The baseline of every case above is valid.
    t, kwargs = _args()
    assert _call(t, kwargs).shape == (BATCH, DIM, L)


@pytest.mark.parametrize("value", [None, "0"])
def test_triton_on_cpu_without_interpreter(monkeypatch, value):
    # triton_available reads TRITON_INTERPRET at call time; only "1" lets CPU tensors through.
    pytest.importorskip("triton")
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    t, kwargs = _args()
    kwargs["backend"] = "triton"
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: .*CUDA"):
        _call(t, kwargs)
