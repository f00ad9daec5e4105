"""GAE against values worked out by hand (SB3's habit), terminated vs truncated kept apart."""

from __future__ import annotations

import pytest
import torch

from rl.gae import gae

R = torch.tensor([[1.0], [0.0], [2.0]])
V = torch.tensor([[0.5], [0.4], [0.3]])


def col(*xs):
    return torch.tensor([[x] for x in xs])


def test_no_boundary():
    # delta = r + 0.9 * V(next) - V; A_t = delta_t + 0.72 * A_{t+1}; last value 0.6
    adv, ret = gae(R, V, col(0.4, 0.3, 0.6), col(0, 0, 0), gamma=0.9, lam=0.8)
    assert adv.squeeze(-1).tolist() == pytest.approx([1.927616, 1.4828, 2.24])
    assert ret.squeeze(-1).tolist() == pytest.approx([2.427616, 1.8828, 2.54])


def test_terminated_in_the_middle_bootstraps_zero():
    adv, _ = gae(R, V, col(0.4, 0.0, 0.6), col(0, 1, 0), gamma=0.9, lam=0.8)
    assert adv.squeeze(-1).tolist() == pytest.approx([0.572, -0.4, 2.24])


def test_truncated_in_the_middle_bootstraps_final_value():
    adv, _ = gae(R, V, col(0.4, 1.0, 0.6), col(0, 1, 0), gamma=0.9, lam=0.8)
    assert adv.squeeze(-1).tolist() == pytest.approx([1.22, 0.5, 2.24])


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.5), (1.0, 1.0), (0.5, 0.0), (0.99, 0.95)])
def test_limits(gamma, lam):
    nv = col(0.4, 0.3, 0.6)
    adv, _ = gae(R, V, nv, col(0, 0, 0), gamma=gamma, lam=lam)
    delta = R + gamma * nv - V
    if lam == 0.0:
        assert torch.allclose(adv, delta)  # one-step TD error
    if lam == 1.0 and gamma == 1.0:
        # Monte-Carlo return (with the final bootstrap) minus value
        mc = torch.tensor([[3.6], [2.6], [2.6]])
        assert torch.allclose(adv + V, mc)
    if gamma == 0.0:
        assert torch.allclose(adv, R - V)


def test_batch_columns_independent():
    r2 = torch.cat([R, R.flip(0)], 1)
    v2 = torch.cat([V, V], 1)
    nv = torch.cat([col(0.4, 0.3, 0.6), col(0.4, 0.3, 0.6)], 1)
    adv, _ = gae(r2, v2, nv, torch.zeros(3, 2), 0.9, 0.8)
    a0, _ = gae(R, V, col(0.4, 0.3, 0.6), col(0, 0, 0), 0.9, 0.8)
    assert torch.allclose(adv[:, :1], a0)


def test_bad_gamma():
    with pytest.raises(ValueError, match="gamma=1.5"):
        gae(R, V, V, V, gamma=1.5, lam=0.9)
