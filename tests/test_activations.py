"""Tests of bnbook.activations: looking inside networks, percentiles over training, whitening cost."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import bnbook.torch as bnt
from bnbook.activations import (
    FlopCount,
    PercentileRecorder,
    batch_norm_flops,
    init_scaled_,
    input_percentiles,
    module_inputs,
    percentile_drift,
    whitening_flops,
    zca_whiten,
)
from bnbook.data import MNISTSplits
from bnbook.models import mlp
from bnbook.train import train_classifier

DOUBLE = torch.float64
BN_CLASSES = [nn.BatchNorm1d, bnt.BatchNorm1d]


def _bn_net(bn_cls, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), bn_cls(5), nn.Sigmoid(), nn.Linear(5, 3))
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        net[1].running_mean.copy_(torch.linspace(-1, 1, 5))
        net[1].running_var.copy_(torch.linspace(0.5, 2, 5))
        net[1].weight.copy_(torch.linspace(0.5, 1.5, 5))
        net[1].bias.copy_(torch.linspace(-0.3, 0.3, 5))
        net[1].num_batches_tracked.fill_(7)
    return net


# --- module_inputs -------------------------------------------------------------------------------
def test_module_inputs_returns_what_each_module_received():
    torch.manual_seed(0)
    net = mlp((7, 5, 4, 3), activation="tanh")
    x = torch.randn(9, 7)
    z1, z2 = module_inputs(net, x, [net[1], 3])  # a module and an index
    torch.testing.assert_close(z1, net[0](x))
    torch.testing.assert_close(z2, net[2](torch.tanh(net[0](x))))
    assert not z1.requires_grad


def test_module_inputs_accepts_a_selector_function():
    net = mlp((4, 3, 2), activation="relu")
    (z,) = module_inputs(net, torch.ones(2, 4), [lambda m: m[1]])
    assert z.shape == (2, 3)


@pytest.mark.parametrize("bn_cls", BN_CLASSES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_stats_normalise_with_the_batch_and_leave_the_model_unchanged(bn_cls, mode):
    net = _bn_net(bn_cls).train(mode == "train")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(11, 6)
    (z,) = module_inputs(net, x, [2], batch_stats=True)
    bn = net[1]
    expected = F.batch_norm(net[0](x), None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert net.training == (mode == "train") and bn.training == (mode == "train")


@pytest.mark.parametrize("bn_cls", BN_CLASSES)
def test_without_batch_stats_eval_mode_uses_the_running_statistics(bn_cls):
    net = _bn_net(bn_cls).eval()
    x = torch.randn(11, 6)
    (z,) = module_inputs(net, x, [2])
    bn = net[1]
    expected = F.batch_norm(
        net[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
    )
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)


def test_batch_stats_keeps_dropout_in_its_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 50), nn.BatchNorm1d(50), nn.Dropout(0.5), nn.ReLU()).eval()
    x = torch.randn(8, 4)
    (a,) = module_inputs(net, x, [3], batch_stats=True)
    (b,) = module_inputs(net, x, [3], batch_stats=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout stayed off: deterministic
    assert not net[2].training


def test_buffers_are_restored_even_when_the_forward_pass_fails():
    net = _bn_net(nn.BatchNorm1d).eval()
    before = net[1].running_mean.clone()
    with pytest.raises(RuntimeError):
        module_inputs(net, torch.randn(4, 99), [2], batch_stats=True)  # wrong width
    torch.testing.assert_close(net[1].running_mean, before, rtol=0, atol=0)
    assert not net[1].training
    assert not net[2]._forward_hooks  # the hook was removed


def test_module_called_twice_or_never_raises():
    relu = nn.ReLU()
    twice = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    with pytest.raises(RuntimeError, match="called 2 times"):
        module_inputs(twice, torch.randn(2, 3), [relu])
    with pytest.raises(RuntimeError, match="called 0 times"):
        module_inputs(nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3), [nn.ReLU()])


def test_bad_selectors_raise():
    net = mlp((4, 3, 2))
    with pytest.raises(IndexError, match="out of range"):
        module_inputs(net, torch.randn(2, 4), [10])
    with pytest.raises(TypeError, match="nn.Sequential"):
        module_inputs(nn.ModuleList([nn.ReLU()]), torch.randn(2, 4), [0])
    with pytest.raises(TypeError, match="returned"):
        module_inputs(net, torch.randn(2, 4), [lambda m: "not a module"])
    with pytest.raises(TypeError, match="module must be"):
        module_inputs(net, torch.randn(2, 4), ["relu"])


# --- percentiles ---------------------------------------------------------------------------------
def test_input_percentiles_match_numpy():
    torch.manual_seed(0)
    net = mlp((5, 8, 2), activation="sigmoid")
    x = torch.randn(200, 5)
    p = input_percentiles(net, 1, x, q=(10, 50, 90))
    z = net[0](x).detach().double().numpy()
    np.testing.assert_allclose(p, np.percentile(z, [10, 50, 90], axis=0), rtol=1e-12)
    assert p.shape == (3, 8)


def test_input_percentiles_of_a_convolutional_input_are_per_channel():
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())
    x = torch.randn(4, 1, 6, 6)
    p = input_percentiles(conv, 1, x, q=(50,))
    z = conv[0](x).detach()
    expected = [np.percentile(z[:, c].double().numpy(), 50) for c in range(3)]
    np.testing.assert_allclose(p[0], expected, rtol=1e-12)


@pytest.mark.parametrize("q", [(-1, 50), (50, 101), [[10, 20]]])
def test_bad_percentiles_raise(q):
    with pytest.raises(ValueError, match="percentiles in"):
        input_percentiles(mlp((3, 2, 2)), 1, torch.randn(5, 3), q=q)


def test_recorder_records_at_every_evaluation_point_without_changing_training():
    g = torch.Generator().manual_seed(0)
    data = MNISTSplits(
        *(
            t
            for _ in range(3)
            for t in (torch.rand(120, 20, generator=g), torch.randint(0, 10, (120,), generator=g))
        )
    )

    def run(with_recorder: bool):
        torch.manual_seed(0)
        net = mlp((20, 16, 16, 10), activation="sigmoid", norm=bnt.BatchNorm1d)
        rec = PercentileRecorder(data.x_test[:100], module=5) if with_recorder else None
        hist = train_classifier(net, data, steps=20, eval_every=10, callback=rec, seed=0)
        return net, hist, rec

    net_a, hist_a, rec = run(True)
    net_b, _, _ = run(False)
    assert rec.steps == hist_a.steps == [0, 10, 20]
    assert rec.percentiles.shape == (3, 3, 16)
    assert np.all(np.diff(rec.percentiles, axis=1) >= 0)  # 15th <= 50th <= 85th
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_empty_recorder_has_an_empty_array():
    rec = PercentileRecorder(torch.zeros(2, 3), module=0)
    assert rec.percentiles.shape == (0, 3, 0)


def test_percentile_drift():
    p = np.zeros((4, 3, 2))
    p[-1, :, 1] = [1.0, -2.0, 3.0]
    p[1, :, 0] = 5.0
    np.testing.assert_allclose(percentile_drift(p), [0.0, 2.0])
    np.testing.assert_allclose(percentile_drift(p, start=1), [5.0, 2.0])
    np.testing.assert_allclose(percentile_drift(p, start=0, stop=1), [5.0, 0.0])
    with pytest.raises(ValueError, match=r"\(T, Q, F\)"):
        percentile_drift(np.zeros((4, 3)))


# --- initialisation ------------------------------------------------------------------------------
def test_init_scaled_sets_the_weight_scale_and_biases():
    torch.manual_seed(0)
    net = init_scaled_(mlp((400, 300, 10), bias=True), 2.0, bias=0.25)
    std = net[0].weight.std().item()
    assert abs(std - 2.0 / math.sqrt(400)) < 0.01 * 2.0 / math.sqrt(400)
    assert abs(net[2].weight.std().item() - 2.0 / math.sqrt(300)) < 0.05 * 2.0 / math.sqrt(300)
    assert torch.all(net[0].bias == 0.25) and torch.all(net[2].bias == 0.25)


@pytest.mark.parametrize("gain", [-1.0, math.inf, math.nan])
def test_init_scaled_rejects_bad_gains(gain):
    with pytest.raises(ValueError, match="gain"):
        init_scaled_(mlp((3, 2)), gain)


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
        with pytest.raises(ValueError, match="positive int"):
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
