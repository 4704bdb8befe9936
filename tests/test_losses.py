"""The discrete-time NLL survival loss against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mamba2d.train import nll_survival_loss


def _logits(hazards):
    h = torch.tensor(hazards, dtype=torch.float64)
    return torch.log(h / (1 - h))


def test_matches_hand_computed_values():
    logits = torch.stack([_logits([0.2, 0.5, 0.4, 0.9]), _logits([0.1, 0.3, 0.6, 0.5])])
    bins = torch.tensor([2, 1])
    censorship = torch.tensor([0, 1])  # patient 0: event in bin 2; patient 1: censored in bin 1
    event = -(math.log(0.8 * 0.5) + math.log(0.4))  # -log S_1 - log h_2
    censored = -math.log(0.9 * 0.7)  # -log S_1
    got = nll_survival_loss(logits, bins, censorship)
    assert abs(got.item() - (event + censored) / 2) < 1e-12
    alpha = 0.4
    # (1 - alpha) * (censored + uncensored) + alpha * uncensored, per patient, then the mean.
    weighted = ((1 - alpha) * event + alpha * event + (1 - alpha) * censored) / 2
    assert abs(nll_survival_loss(logits, bins, censorship, alpha=alpha).item() - weighted) < 1e-12


def test_event_in_first_bin_and_saturated_logits_stay_finite():
    logits = torch.tensor([[60.0, -60.0], [-60.0, 60.0]], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([0, 1]), torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() < 1e-20  # both events sit where the model put all the hazard


def test_bad_inputs():
    with pytest.raises(ValueError, match="bins must lie"):
        nll_survival_loss(torch.zeros(2, 4), torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="entries"):
        nll_survival_loss(torch.zeros(2, 4), torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_bins"):
        nll_survival_loss(torch.zeros(4), torch.tensor([0]), torch.tensor([0]))
