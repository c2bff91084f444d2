"""Tests of bnbook.activations: looking inside networks, percentiles over training, whitening cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnbook.torch as bnt
from bnbook.activations import (
    PercentileRecorder,
    input_percentiles,
    module_inputs,
    percentile_drift,
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
    assert rec.steps == hist_a.steps.tolist() == [0, 10, 20]
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


def test_batch_stats_leave_stacked_batch_norm_buffers_alone():
    from bnbook.stacked import StackedBatchNorm, stacked_mlp

    torch.manual_seed(0)
    net = stacked_mlp(2, (6, 5, 5, 3), activation="sigmoid", norm="batch").train()
    bn = next(m for m in net.modules() if isinstance(m, StackedBatchNorm))
    before = bn.running_mean.clone()
    module_inputs(net, torch.randn(20, 6) * 3 + 1, [len(net) - 2], batch_stats=True)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
