"""bnbook.whitening: operation counts and ZCA whitening."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from bnbook.whitening import FlopCount, batch_norm_flops, whitening_flops, zca_whiten

DOUBLE = torch.float64


# --- operation counts ----------------------------------------------------------------------------
def test_flop_counts():
    m, d = 60, 100
    w = whitening_flops(m, d)
    assert isinstance(w, FlopCount)
    assert w == FlopCount(2 * m * d + 2 * m * d * d, 11 * d**3 + 2 * d, 2 * m * d * d)
    assert w.total == sum(w)
    assert batch_norm_flops(m, d) == FlopCount(4 * m * d, 3 * d, 3 * m * d)
    # whitening grows as d^3, batch norm as m d
    assert whitening_flops(m, 2 * d).factorisation == 8 * w.factorisation - 12 * d
    assert batch_norm_flops(2 * m, 2 * d).total < 4 * batch_norm_flops(m, d).total + 1


@pytest.mark.parametrize("m, d", [(0, 3), (3, 0), (True, 3), (2.5, 3), (3, -1)])
def test_flop_counts_reject_bad_sizes(m, d):
    for fn in (whitening_flops, batch_norm_flops):
        with pytest.raises(ValueError, match=r"must be an int >= 1"):
            fn(m, d)


# --- whitening -----------------------------------------------------------------------------------
def test_zca_whitened_batch_has_identity_covariance_and_zero_mean():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(5, 5, generator=g, dtype=DOUBLE)
    x = torch.randn(400, 5, generator=g, dtype=DOUBLE) @ mixing + 3.0
    w = zca_whiten(x, eps=1e-12)
    torch.testing.assert_close(w.mean(0), torch.zeros(5, dtype=DOUBLE), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.T @ w / 400, torch.eye(5, dtype=DOUBLE), rtol=0, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(8, 40), d=st.integers(1, 6))
def test_zca_is_rotation_equivariant(seed, m, d):
    """ZCA (unlike PCA whitening) commutes with rotations: zca(x R) = zca(x) R."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=DOUBLE)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DOUBLE))
    torch.testing.assert_close(
        zca_whiten(x @ rotation, eps=1e-3), zca_whiten(x, eps=1e-3) @ rotation, rtol=1e-7, atol=1e-8
    )


def test_zca_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=DOUBLE) * torch.tensor([1.0, 2.0, 3.0], dtype=DOUBLE)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: zca_whiten(v, eps=1e-3), (x,))


def test_zca_with_fewer_examples_than_features_needs_eps_but_stays_finite():
    x = torch.randn(6, 10, dtype=DOUBLE)
    centred = x - x.mean(0)
    assert torch.linalg.matrix_rank(centred.T @ centred).item() == 5
    assert torch.isfinite(zca_whiten(x, eps=1e-3)).all()


@pytest.mark.parametrize(
    "x, eps",
    [
        (torch.randn(5), 1e-5),
        (torch.randn(1, 3), 1e-5),
        (np.ones((4, 2)), 1e-5),
        (torch.randn(4, 2), 0.0),
    ],
)
def test_zca_rejects_bad_input(x, eps):
    with pytest.raises(ValueError):
        zca_whiten(x, eps=eps)
