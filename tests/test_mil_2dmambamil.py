"""2DMambaMIL on one slide, and the grid it builds from patch coordinates."""

from __future__ import annotations

import pytest
import torch

from mamba2d.mil import TwoDMambaMIL, patch_grid

PS = 256  # level-0 patch size of the synthetic coordinates


def _slide(n_rows, n_cols, holes=(), seed=0, in_dim=24):
    """Features and (x, y) coords of a n_rows x n_cols patch grid, minus the ``holes`` cells."""
    g = torch.Generator().manual_seed(seed)
    cells = [(r, c) for r in range(n_rows) for c in range(n_cols) if (r, c) not in set(holes)]
    coords = torch.tensor([[1024 + c * PS, 2048 + r * PS] for r, c in cells], dtype=torch.float32)
    return torch.randn(len(cells), in_dim, generator=g), coords


def _model(task="classification", seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("backend", "torch")
    return TwoDMambaMIL(24, 3 if task == "classification" else 4, task=task, d_model=32, **kw).eval()


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (5, 6)], ids=lambda s: "{}x{}".format(*s))
def test_classification_outputs(shape):
    feats, coords = _slide(*shape)
    out = _model()(feats, coords, PS, return_embedding=True)
    assert out.logits.shape == (3,) and out.embedding.shape == (32,)
    assert torch.allclose(out.probs.sum(), torch.tensor(1.0))
    assert out.attention.shape == (feats.shape[0],)
    assert torch.allclose(out.attention.sum(), torch.tensor(1.0))  # no mass on pads
    assert out.hazards is None and out.risk is None


def test_survival_outputs():
    feats, coords = _slide(4, 5, holes=[(1, 1), (2, 3)])
    out = _model("survival")(feats, coords, PS)
    assert out.hazards.shape == (4,) and ((out.hazards > 0) & (out.hazards < 1)).all()
    assert torch.allclose(out.survival, torch.cumprod(1 - out.hazards, 0))
    assert (out.survival[1:] <= out.survival[:-1]).all()
    assert torch.allclose(out.risk, -out.survival.sum())
    assert out.probs is None


def test_pads_get_no_attention_unless_asked():
    feats, coords = _slide(4, 5, holes=[(0, 0), (1, 2), (3, 4)])
    assert torch.allclose(_model()(feats, coords, PS).attention.sum(), torch.tensor(1.0))
    pooled_with_pads = _model(pool_pads=True)(feats, coords, PS).attention.sum()
    assert 0 < pooled_with_pads < 1 - 1e-4


def test_patch_order_does_not_matter():
    feats, coords = _slide(5, 6, holes=[(2, 2), (0, 5)], seed=1)
    m = _model(seed=1)
    perm = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(2))
    a, b = m(feats, coords, PS), m(feats[perm], coords[perm], PS)
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert torch.allclose(a.attention[perm], b.attention, atol=1e-7)


def test_translation_of_the_whole_slide_does_not_matter():
    feats, coords = _slide(4, 4, holes=[(3, 0)], seed=3)
    m = _model(seed=3)
    shifted = coords + torch.tensor([7 * PS, 3 * PS])
    assert torch.allclose(m(feats, coords, PS).logits, m(feats, shifted, PS).logits, atol=1e-6)


def test_gradients_reach_the_pad_token():
    feats, coords = _slide(4, 5, holes=[(1, 1), (2, 2)], seed=4)
    m = _model(seed=4)
    m(feats, coords, PS).logits.sum().backward()
    assert m.pad_token.grad is not None and m.pad_token.grad.abs().sum() > 0


def test_zero_pads_and_positional_embedding_options():
    feats, coords = _slide(3, 4, holes=[(1, 1)], seed=5)
    m = _model(seed=5, pad="zeros", pos_embed=True)
    assert m.pad_token is None and m.pos_embed is not None
    assert torch.isfinite(m(feats, coords, PS).logits).all()


def test_bad_inputs_name_what_is_wrong():
    feats, coords = _slide(2, 2)
    m = _model()
    with pytest.raises(ValueError, match="in_dim"):
        m(feats[:, :5], coords, PS)
    with pytest.raises(ValueError, match="coords has"):
        m(feats, coords[:3], PS)
    bad = feats.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(bad, coords, PS)


def test_grid_is_tight_and_row_major():
    coords = torch.tensor([[512.0, 256.0], [768.0, 256.0], [512.0, 768.0]])
    g = patch_grid(coords, 256)
    assert (g.height, g.width) == (3, 2)
    assert g.rows.tolist() == [0, 0, 2] and g.cols.tolist() == [0, 1, 0]
    assert g.flat.tolist() == [0, 1, 4]


def test_grid_errors_and_snapping():
    with pytest.raises(ValueError, match="repeat the coordinate"):
        patch_grid(torch.tensor([[0.0, 0.0], [256.0, 0.0], [0.0, 0.0]]), 256)
    off = torch.tensor([[0.0, 0.0], [300.0, 0.0]])
    with pytest.raises(ValueError, match="lattice"):
        patch_grid(off, 256, snap="error", name="slide_7.h5")
    assert patch_grid(off, 256, snap="round").cols.tolist() == [0, 1]
    with pytest.raises(ValueError, match="non-finite"):
        patch_grid(torch.tensor([[0.0, float("nan")]]), 256)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        patch_grid(torch.zeros(4, 3), 256)
    with pytest.raises(ValueError, match="empty"):
        patch_grid(torch.zeros(0, 2), 256)
    with pytest.raises(ValueError, match="patch size"):
        patch_grid(torch.zeros(1, 2), 0)
