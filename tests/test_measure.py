"""Tests of bnbook.measure: internal covariate shift and smoothness against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnbook.measure import (
    ETAS,
    internal_covariate_shift,
    largest_trainable,
    loss_and_gradients,
    per_model_cross_entropy,
    precise_bn,
    smoothness,
    steps_to_target,
    weighted_layers,
)
from bnbook.stacked import stacked_mlp, unstack
from bnbook.torch import BatchNorm1d

D = torch.float64


def half_sq(out, target):
    """0.5 · mean over the batch of the squared error (summed over outputs)."""
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


def _mlp(widths=(8, 6, 6, 6, 3), norm=True):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1], strict=True):
        layers += [nn.Linear(a, b, dtype=D)]
        layers += [nn.BatchNorm1d(b, dtype=D)] if norm else []
        layers += [nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1], dtype=D))
    return nn.Sequential(*layers)


def test_ics_matches_closed_form_of_a_deep_linear_network():
    # L = 1/(2N) sum ||W3 W2 W1 x - y||^2; layer 2's gradient before and after W1's step, by hand
    torch.manual_seed(1)
    net = nn.Sequential(
        *(nn.Linear(a, b, bias=False, dtype=D) for a, b in ((5, 4), (4, 3), (3, 2)))
    )
    x, y = torch.randn(10, 5, dtype=D), torch.randn(10, 2, dtype=D)
    w1, w2, w3 = (m.weight.detach().numpy() for m in net)
    xn, yn, lr = x.numpy(), y.numpy(), 0.3

    def grads(w1):
        h1 = xn @ w1.T
        r = (h1 @ w2.T @ w3.T - yn) / len(xn)
        return (w3 @ w2).T @ r.T @ xn, w3.T @ r.T @ h1  # dL/dW1, dL/dW2

    g1, g2 = grads(w1)
    _, g2_after = grads(w1 - lr * g1)
    expected_rel = np.linalg.norm(g2 - g2_after) / np.linalg.norm(g2)
    expected_cos = (g2 * g2_after).sum() / (np.linalg.norm(g2) * np.linalg.norm(g2_after))
    got = internal_covariate_shift(net, x, y, lr, loss=half_sq)
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got[0], [expected_rel, expected_cos], rtol=1e-10)
    assert 1e-3 < got[0, 0] < 1  # the case is not trivial: the gradient does move


def test_no_shift_when_nothing_below_the_layer_can_move():
    net = _mlp()
    x, y = torch.randn(16, 8, dtype=D), torch.randint(0, 3, (16,))
    # lr = 0: the earlier layers stay put
    np.testing.assert_allclose(
        internal_covariate_shift(net, x, y, 0.0), [[0, 1], [0, 1]], atol=1e-12
    )
    # an identity below the first linear layer: nothing below layer 1 has parameters
    ident = nn.Sequential(nn.Identity(), *_mlp())
    got = internal_covariate_shift(ident, x, y, 0.5, layers=[1])
    np.testing.assert_allclose(got, [[0, 1]], atol=1e-12)
    # ... whereas the same layer one position up does shift
    assert internal_covariate_shift(ident, x, y, 0.5, layers=[4])[0, 0] > 1e-3


def test_default_layers_are_the_hidden_ones_after_the_first():
    net = _mlp()
    assert weighted_layers(net) == [0, 3, 6, 9]  # BatchNorm1d's weight (gamma) is not a layer
    x, y = torch.randn(16, 8, dtype=D), torch.randint(0, 3, (16,))
    np.testing.assert_array_equal(
        internal_covariate_shift(net, x, y, 0.1),
        internal_covariate_shift(net, x, y, 0.1, layers=[3, 6]),
    )


def test_smoothness_matches_closed_form_of_least_squares():
    # L(w) = 1/(2N) ||Xw - y||^2: g = X^T r / N, H = X^T X / N, grad(w - eta g) = g - eta H g
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 1, bias=False, dtype=D))
    x, y = (
        torch.randn(20, 4, dtype=D) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=D),
        torch.randn(20, 1, dtype=D),
    )
    xn, yn, w = x.numpy(), y.numpy()[:, 0], net[0].weight.detach().numpy()[0]
    g = xn.T @ (xn @ w - yn) / len(xn)
    h = xn.T @ xn / len(xn)
    etas = np.array([0.01, 0.05, 0.1, 0.3])
    losses = [0.5 * np.mean((xn @ (w - e * g) - yn) ** 2) for e in etas]
    hg = np.linalg.norm(h @ g)
    expected = [max(losses) - min(losses), etas.max() * hg, hg / np.linalg.norm(g)]
    np.testing.assert_allclose(smoothness(net, x, y, etas, loss=half_sq), expected, rtol=1e-10)
    # the effective K is a lower bound on the largest eigenvalue of H
    assert expected[2] <= np.linalg.eigvalsh(h).max()


def test_stacked_networks_give_each_network_its_own_measurement():
    torch.manual_seed(3)
    s = 3
    net = stacked_mlp(s, (12, 8, 8, 8, 4), norm="batch", init="he").double()
    x, y = torch.randn(s, 16, 12, dtype=D), torch.randint(0, 4, (s, 16))
    ics, smooth = internal_covariate_shift(net, x, y, 0.2), smoothness(net, x, y)
    assert ics.shape == (s, 2, 2) and smooth.shape == (s, 3)
    for i in range(s):
        single = unstack(net, i).double()
        np.testing.assert_allclose(
            ics[i], internal_covariate_shift(single, x[i], y[i], 0.2), rtol=1e-9
        )
        np.testing.assert_allclose(smooth[i], smoothness(single, x[i], y[i]), rtol=1e-9)
    assert np.ptp(smooth[:, 2]) > 0  # three different networks, three different answers


def test_the_model_is_left_as_it_was():
    net = _mlp().train()
    x, y = torch.randn(16, 8, dtype=D), torch.randint(0, 3, (16,))
    per_model_cross_entropy(net(x), y).backward()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    internal_covariate_shift(net, x, y, 0.5)
    smoothness(net, x, y)
    for k, v in net.state_dict().items():  # parameters and running statistics
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for p, g in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert net.training


def test_loss_and_gradients_gives_zero_for_unused_parameters():
    net = nn.Sequential(nn.Linear(3, 2, dtype=D))
    unused = nn.Linear(2, 2, dtype=D)
    net.add_module("unused", unused)
    net.forward = lambda x: net[0](x)  # the second layer never runs
    value, grads = loss_and_gradients(net, torch.randn(4, 3, dtype=D), torch.randint(0, 2, (4,)))
    assert value.dim() == 0 and len(grads) == 4
    assert all(g.abs().sum() == 0 for g in grads[2:]) and grads[0].abs().sum() > 0


def test_per_model_cross_entropy_matches_torch():
    logits, target = torch.randn(2, 5, 4, dtype=D), torch.randint(0, 4, (2, 5))
    got = per_model_cross_entropy(logits, target)
    expected = [nn.functional.cross_entropy(logits[i], target[i]) for i in range(2)]
    torch.testing.assert_close(got, torch.stack(expected))
    shared = per_model_cross_entropy(logits, target[0])
    torch.testing.assert_close(shared[1], nn.functional.cross_entropy(logits[1], target[0]))


def test_default_etas():
    assert len(ETAS) == 8 and ETAS[0] == pytest.approx(0.05) and ETAS[-1] == pytest.approx(0.4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda n, x, y: internal_covariate_shift(n, x, y, -0.1), ValueError, "lr must be"),
        (lambda n, x, y: internal_covariate_shift(n, x, y, float("nan")), ValueError, "lr must be"),
        (
            lambda n, x, y: internal_covariate_shift(n, x, y, 0.1, layers=[1]),
            ValueError,
            "weighted",
        ),
        (lambda n, x, y: smoothness(n, x, y, etas=()), ValueError, "etas"),
        (lambda n, x, y: smoothness(n, x, y, etas=(0.1, -0.2)), ValueError, "etas"),
        (lambda n, x, y: smoothness(nn.ModuleList(n), x, y), TypeError, "nn.Sequential"),
        (
            lambda n, x, y: smoothness(n, x, y, loss=lambda o, t: torch.ones(7, dtype=D) * o.sum()),
            ValueError,
            "does not split",
        ),
        (
            lambda n, x, y: smoothness(
                n, x, y, loss=lambda o, t: o[:2, :2].sum() * torch.ones(2, 2)
            ),
            ValueError,
            "0-d or",
        ),
    ],
)
def test_errors(call, error, match):
    net = _mlp()
    with pytest.raises(error, match=match):
        call(net, torch.randn(16, 8, dtype=D), torch.randint(0, 3, (16,)))


def test_default_needs_a_layer_between_first_and_last():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="pass layers="):
        internal_covariate_shift(net, torch.randn(5, 3), torch.randint(0, 2, (5,)), 0.1)


@pytest.mark.parametrize("bn", [torch.nn.BatchNorm1d, BatchNorm1d])
def test_precise_bn_averages_batch_statistics_and_leaves_model_alone(bn):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), bn(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(70, 5)
    fresh = precise_bn(net, x, batch_size=20)  # three batches of 20; the last 10 dropped
    h = net[0](x[:60]).detach().view(3, 20, 4)
    assert not fresh.training and net.training
    torch.testing.assert_close(fresh[1].running_mean, h.mean(1).mean(0))
    torch.testing.assert_close(fresh[1].running_var, h.var(1).mean(0))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="batch_size"):
        precise_bn(net, x, batch_size=1)


def test_steps_to_target_and_largest_trainable():
    steps = np.array([0, 5, 10])
    acc = np.array([[[0.1, 0.8, 0.95]], [[0.1, 0.2, 0.3]]])
    np.testing.assert_array_equal(steps_to_target(steps, acc, 0.9), [[10.0], [np.inf]])
    np.testing.assert_array_equal(steps_to_target(steps, acc, 0.05), [[0.0], [0.0]])
    assert largest_trainable([1, 2, 3], np.array([True, True, False])) == 2
    assert math.isnan(largest_trainable([1, 2], np.array([[False, True], [True, False]])))
