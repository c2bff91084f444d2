"""bnbook.gradcheck: central differences, and the gaps between two implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnbook.gradcheck import (
    max_gap,
    module_gaps,
    numerical_gradient,
    pair_errors,
    relative_error,
)
from bnbook.numpy import batch_norm_backward, batch_norm_forward
from bnbook.torch import BatchNorm2d


def test_numerical_gradient_of_a_known_function_and_input_left_alone():
    x = np.array([0.5, -1.0, 2.0])
    before = x.copy()
    g = numerical_gradient(lambda v: np.sin(v), x, dout=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(g, np.cos(x) * [1, 2, 3], rtol=1e-8)
    np.testing.assert_array_equal(x, before)


def test_relative_error_is_scale_free_and_checks_shapes():
    a = np.array([1.0, 2.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(1e6 * a, 1e6 * (a + 1e-3)) == pytest.approx(relative_error(a, a + 1e-3))
    with pytest.raises(ValueError, match="same shape"):
        relative_error(a, a[:1])


def test_pair_errors_pass_a_correct_pair_and_catch_a_wrong_one():
    rng = np.random.default_rng(0)
    x, dy = rng.normal(2, 3, size=(6, 4)), rng.normal(size=(6, 4))
    g, b = rng.normal(size=4), rng.normal(size=4)
    assert max(pair_errors(batch_norm_forward, batch_norm_backward, (x, g, b), dy)) < 1e-6

    def wrong_backward(dout, cache):  # the path through the mean forgotten
        dx, dg, db = batch_norm_backward(dout, cache)
        return dx + dout.mean(0) * cache.gamma * cache.invstd, dg, db

    errors = pair_errors(batch_norm_forward, wrong_backward, (x, g, b), dy)
    assert errors[0] > 1e-2 and max(errors[1:]) < 1e-6


def test_max_gap_accepts_arrays_and_tensors():
    assert max_gap(torch.tensor([1.0, 3.0]), np.array([1.0, 2.0])) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        max_gap(np.zeros(2), np.zeros(3))


def test_module_gaps_small_for_twins_large_for_different_layers():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    ours, ref = BatchNorm2d(3).double(), nn.BatchNorm2d(3).double()
    gaps = module_gaps(ours, ref, x, eval_mode=True)
    assert set(gaps) == {"output", "input grad", "param grads", "eval output"}
    assert max(gaps.values()) < 1e-12 and ours.training and ref.training
    other = nn.InstanceNorm2d(3, affine=True).double()
    assert module_gaps(ours, other, x)["output"] > 1e-3


def test_pair_errors_checks_only_the_arguments_asked_for():
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    g, b = rng.normal(size=2), rng.normal(size=2)

    def dx_only(dout, cache):
        return batch_norm_backward(dout, cache)[0], None, None

    errors = pair_errors(batch_norm_forward, dx_only, (x, g, b), dy, wrt=[0])
    assert len(errors) == 1 and errors[0] < 1e-6
