"""Tests of bnbook.normfree: scaled weight standardisation, the ReLU gain, unit-wise norms and
adaptive gradient clipping, the three residual networks, and the training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bnbook.normfree as NF
from bnbook.norms import standardize

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3)])
def test_scaled_ws_standardises_each_unit(shape):
    w = torch.randn(shape, generator=_gen(), dtype=F64) * 4 + 2
    gain = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=_gen(1), dtype=F64) + 0.5
    ws = NF.scaled_ws(w, gain, act_gain=1.7, eps=1e-14)
    rows = ws.reshape(shape[0], -1)
    torch.testing.assert_close(rows.mean(1), torch.zeros(shape[0], dtype=F64), atol=1e-12, rtol=0)
    # each unit's squared norm is (γ·gain)²: fan_in values of variance γ²·gain²/fan_in
    expected = (1.7 * gain.reshape(-1)) ** 2
    torch.testing.assert_close(rows.pow(2).sum(1), expected, atol=1e-9, rtol=0)
    fan_in = math.prod(shape[1:])
    ref = (
        standardize(w, tuple(range(1, len(shape))), 1e-14 / fan_in) * gain * 1.7 / math.sqrt(fan_in)
    )
    torch.testing.assert_close(ws, ref, atol=1e-12, rtol=0)


def test_scaled_ws_stacked_is_per_model():
    w = torch.randn(3, 4, 6, generator=_gen(), dtype=F64)
    stacked = NF.scaled_ws(w, act_gain=2.0, stacked=True)
    for s in range(3):
        torch.testing.assert_close(stacked[s], NF.scaled_ws(w[s], act_gain=2.0), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="fan-in"):
        NF.scaled_ws(torch.randn(3, 4), stacked=True)


def test_relu_gain_restores_unit_variance():
    z = torch.randn(2_000_000, generator=_gen(3), dtype=F64)
    assert (NF.RELU_GAIN * F.relu(z)).var().item() == pytest.approx(1.0, abs=5e-3)
    assert F.relu(z).var().item() == pytest.approx(0.5 * (1 - 1 / math.pi), abs=5e-3)


@pytest.mark.parametrize("weight_scale", [0.1, 1.0, 10.0])
def test_ws_linear_after_relu_keeps_unit_variance_whatever_the_weights(weight_scale):
    layer = NF.StackedWSLinear(2, 256, 128, act_gain=NF.RELU_GAIN).double()
    with torch.no_grad():
        layer.weight.mul_(weight_scale)
    z = torch.randn(2, 4096, 256, generator=_gen(4), dtype=F64)
    out = layer(F.relu(z))
    assert out.var().item() == pytest.approx(1.0, abs=0.05)


def test_unitwise_norm():
    w = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    torch.testing.assert_close(NF.unitwise_norm(w), torch.tensor([[5.0], [10.0]]))
    torch.testing.assert_close(NF.unitwise_norm(torch.tensor([3.0, 4.0])), torch.tensor([5.0]))
    stacked = torch.stack([w, 2 * w])  # (S, out, in): one norm per model and unit
    torch.testing.assert_close(
        NF.unitwise_norm(stacked, stacked=True), torch.tensor([[[5.0], [10.0]], [[10.0], [20.0]]])
    )
    bias = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])  # (S, 1, out): one unit per model
    torch.testing.assert_close(
        NF.unitwise_norm(bias, stacked=True), torch.tensor([[[5.0]], [[1.0]]])
    )


def _agc_reference(w, g, clipping, eps):
    out = g.clone()
    for i in range(w.shape[0]):
        w_norm = max(w[i].norm().item(), eps)
        g_norm = g[i].norm().item()
        if g_norm > clipping * w_norm:
            out[i] = g[i] * (clipping * w_norm / g_norm)
    return out


@settings(max_examples=30, deadline=None)
@given(clipping=st.floats(1e-3, 1.0), seed=st.integers(0, 2**31 - 1))
def test_adaptive_grad_clip_matches_the_rule(clipping, seed):
    gen = _gen(seed)
    w = torch.randn(6, 5, generator=gen, dtype=F64)
    w[0] = 0.0  # a zero unit: its threshold uses the eps floor
    p = torch.nn.Parameter(w)
    p.grad = (
        torch.randn(6, 5, generator=gen, dtype=F64) * torch.logspace(-3, 1, 6, dtype=F64)[:, None]
    )
    expected = _agc_reference(w, p.grad, clipping, 1e-3)
    NF.adaptive_grad_clip_([p], clipping, eps=1e-3)
    torch.testing.assert_close(p.grad, expected, atol=1e-12, rtol=1e-12)
    ratio = p.grad.norm(dim=1) / w.norm(dim=1).clamp_min(1e-3)
    assert (ratio <= clipping * (1 + 1e-9)).all()


def test_adaptive_grad_clip_stacked_equals_per_model():
    gen = _gen(7)
    w = torch.randn(3, 4, 5, generator=gen)
    g = torch.randn(3, 4, 5, generator=gen) * 10
    stacked = torch.nn.Parameter(w.clone())
    stacked.grad = g.clone()
    NF.adaptive_grad_clip_([stacked], 0.05, stacked=True)
    for s in range(3):
        single = torch.nn.Parameter(w[s].clone())
        single.grad = g[s].clone()
        NF.adaptive_grad_clip_([single], 0.05)
        torch.testing.assert_close(stacked.grad[s], single.grad)
    untouched = torch.nn.Parameter(torch.ones(2, 2))
    untouched.grad = torch.full((2, 2), 1e-4)
    NF.adaptive_grad_clip_([untouched, torch.nn.Parameter(torch.ones(3))], 0.01)
    assert bool((untouched.grad == 1e-4).all())
    with pytest.raises(ValueError, match="clipping"):
        NF.adaptive_grad_clip_([untouched], 0.0)


@pytest.mark.parametrize("variant", NF.VARIANTS)
def test_networks_are_independent_across_models(variant):
    torch.manual_seed(0)
    net = NF.ResidualMLP(variant, n_models=3, in_features=12, width=8, depth=2)
    x = torch.randn(3, 5, 12)
    if variant != "batch":  # no batch statistics: a model's output ignores the others' inputs
        x2 = x.clone()
        x2[1:] += 1.0
        torch.testing.assert_close(net(x)[0], net(x2)[0])
    net(x)[0].sum().backward()
    for name, p in net.named_parameters():
        assert p.grad[1:].abs().max() == 0, name


def test_skipinit_blocks_start_as_the_identity():
    torch.manual_seed(1)
    net = NF.ResidualMLP("skipinit", n_models=2, in_features=12, width=8, depth=3)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(net(x), net.head(F.relu(net.stem(x))))


def test_nf_signal_standard_deviation_follows_tau():
    torch.manual_seed(2)
    net = NF.ResidualMLP("nf", n_models=1, in_features=256, width=512, depth=4, residual_scale=0.5)
    for block in net.blocks:  # let every branch contribute, as after training
        torch.nn.init.ones_(block[-1].theta)
    seen = []
    for block in net.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    net(torch.randn(2048, 256))
    for depth, h in enumerate(seen):  # the hook sees h / τ_l: unit variance at every depth
        assert h.std().item() == pytest.approx(1.0, abs=0.08), depth
    assert net.expected_std(4) == pytest.approx(math.sqrt(1 + 4 * 0.25))


def _data(n=64, d=12, seed=0):
    gen = _gen(seed)
    x = torch.randn(n, d, generator=gen)
    return x, (x[:, 0] > 0).long()


def test_train_residual_is_deterministic_and_learns():
    x, y = _data()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        net = NF.ResidualMLP("nf", n_models=2, in_features=12, width=16, depth=2, classes=2)
        runs.append(
            NF.train_residual(
                net, x, y, x, y, steps=60, lr=0.05, seeds=[0, 1], batch_size=16, clipping=0.1
            )
        )
    np.testing.assert_array_equal(runs[0].batch_loss, runs[1].batch_loss)
    assert (runs[0].final_acc > 0.8).all() and not runs[0].diverged.any()


def test_clipping_bounds_every_step_and_spares_the_head():
    x, y = _data()
    torch.manual_seed(4)
    net = NF.ResidualMLP("skipinit", n_models=1, in_features=12, width=8, depth=1, classes=2)
    net, x = net.double(), x.double()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    lam, lr = 1e-3, 0.5
    NF.train_residual(net, x, y, x, y, steps=1, lr=lr, seeds=[0], batch_size=64, clipping=lam)
    for name, p in net.named_parameters():  # one SGD step: Δ = lr · (clipped) gradient
        if name.startswith("head."):
            continue
        step = NF.unitwise_norm(p.detach() - before[name], stacked=True)
        bound = lr * lam * NF.unitwise_norm(before[name], stacked=True).clamp_min(1e-3)
        assert (step <= bound * (1 + 1e-5)).all(), name
        if name == "stem.weight":  # (the branch weights get no gradient while θ = 0)
            assert (step >= bound * 0.999).all(), name  # the clip was active
    head_step = (net.head.weight - before["head.weight"]).norm().item()
    assert head_step > lr * lam * before["head.weight"].norm().item() * 10


def test_divergence_is_reported():
    x, y = _data()
    torch.manual_seed(5)
    net = NF.ResidualMLP("skipinit", n_models=2, in_features=12, width=8, depth=2, classes=2)
    with torch.no_grad():
        for b in net.blocks:
            b[-1].theta.fill_(1.0)
    run = NF.train_residual(net, x * 1e3, y, x, y, steps=20, lr=[1e-3, 1e3], seeds=[0, 1])
    assert list(run.diverged) == [False, True]


def test_errors():
    with pytest.raises(ValueError, match="variant"):
        NF.ResidualMLP("layer")
    x, y = _data()
    with pytest.raises(ValueError, match="seeds"):
        NF.train_residual(
            NF.ResidualMLP("nf", n_models=2, in_features=12, classes=2),
            x,
            y,
            x,
            y,
            steps=1,
            lr=0.1,
            seeds=[0],
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("variant", NF.VARIANTS)
def test_trains_on_cuda(variant):
    dev = torch.device("cuda")
    x, y = (t.to(dev) for t in _data())
    net = NF.ResidualMLP(variant, n_models=2, in_features=12, width=8, depth=1, classes=2).to(dev)
    run = NF.train_residual(
        net, x, y, x, y, steps=3, lr=0.05, seeds=[0, 1], batch_size=8, clipping=0.1
    )
    assert np.isfinite(run.batch_loss).all()
