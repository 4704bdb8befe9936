"""SR-Mamba (MambaMIL's sequence-reordering layer): visiting order, an independent float64
recurrence, the dependency structure the reordering creates, and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba2d.nn import SRMamba, stride_order

F64_BOUND = 1e-10  # float64 end to end: only summation order differs


def test_stride_order_is_the_column_major_walk():
    assert stride_order(7, 3).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert stride_order(6, 3).tolist() == [0, 3, 1, 4, 2, 5]
    assert stride_order(4, 10).tolist() == list(range(10))  # one row: the order is unchanged
    assert sorted(stride_order(23, 5).tolist()) == list(range(25))


def _branch(core, xs, z, mask):
    """One SSM branch over a 1D sequence as an explicit loop. xs, z: (L, d_inner); mask: (L,) bool."""
    L, d = xs.shape
    xs = xs * mask[:, None]
    k = core.conv_layer.weight.shape[-1]
    w = core.conv_layer.weight[:, 0]  # (d, k): causal taps, the last one on the current token
    conv = torch.stack([sum(w[:, k - 1 - j] * (xs[t - j] if t - j >= 0 else 0) for j in range(k))
                        for t in range(L)]) + core.conv_layer.bias
    u = F.silu(conv * mask[:, None])
    dt, B, C = core.x_proj(u).split([core.dt_rank, core.d_state, core.d_state], dim=-1)
    delta = F.softplus(dt @ core.dt_proj.weight.t() + core.dt_proj.bias)
    delta = delta * mask[:, None]
    A = -torch.exp(core.A_log)
    h = torch.zeros(d, core.d_state, dtype=xs.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(delta[t, :, None] * A) * h + delta[t, :, None] * B[t] * u[t, :, None]
        ys.append((h @ C[t] + core.D * u[t]) * F.silu(z[t]))
    return torch.stack(ys)  # (L, d_inner)


@pytest.mark.parametrize("length,rate", [(1, 10), (7, 3), (9, 3), (13, 4), (12, 12)])
def test_matches_an_independent_float64_loop(length, rate):
    torch.manual_seed(length * 31 + rate)
    m = SRMamba(8, rate=rate, d_state=4, backend="torch").double()
    x = torch.randn(2, length, 8, dtype=torch.float64)
    got = m(x)
    order = stride_order(length, rate)
    for b in range(2):
        xs, z = m.in_proj(x[b]).chunk(2, dim=-1)
        y = _branch(m.core, xs, z, torch.ones(length, dtype=torch.float64))
        pad = order.numel() - length
        xs_p, z_p = F.pad(xs, (0, 0, 0, pad)), F.pad(z, (0, 0, 0, pad))
        y_r = _branch(m.reordered_core, xs_p[order], z_p[order], (order < length).double())
        y_back = torch.empty_like(y_r)
        y_back[order] = y_r
        want = m.out_proj(y + y_back[:length])
        rel = float((got[b] - want).detach().norm() / want.detach().norm())
        assert rel < F64_BOUND, rel


def test_tokens_rate_apart_become_neighbours():
    # Perturbing token j changes output i exactly when i comes at or after j in the input order
    # (branch 1) or in the reordered walk (branch 2).
    torch.manual_seed(3)
    L, rate, j = 14, 4, 6
    m = SRMamba(8, rate=rate, d_state=4, backend="torch").double()
    x = torch.randn(1, L, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, j] += torch.randn(8, dtype=torch.float64)
    changed = ((m(x2) - m(x))[0].abs().amax(dim=-1) > 1e-12).tolist()
    rank = {int(p): r for r, p in enumerate(stride_order(L, rate))}
    expected = [i >= j or rank[i] >= rank[j] for i in range(L)]
    assert changed == expected
    assert not all(expected) and any(i < j for i in range(L) if expected[i])  # both branches matter


def test_gradients_reach_both_branches():
    torch.manual_seed(4)
    m = SRMamba(8, rate=3, d_state=4, backend="torch")
    x = torch.randn(2, 10, 8, requires_grad=True)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rate"):
        SRMamba(8, rate=0)
    with pytest.raises(ValueError, match="d_model=8"):
        SRMamba(8)(torch.randn(2, 5, 4))
