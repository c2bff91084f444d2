"""Tests of bnbook.experiments: stacked networks must behave exactly like separate ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnbook.experiments import (
    Residual,
    StackedBatchNorm,
    StackedDropout,
    StackedLinear,
    StackedNorm,
    batch_indices,
    evaluate_stacked,
    largest_trainable,
    rescale_weights,
    stacked_mlp,
    steps_to_target,
    train_stacked,
    unstack,
)
from bnbook.torch import BatchNorm1d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def toy_data(n=120, d=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


# --- StackedLinear -------------------------------------------------------------------------


def test_linear_matches_separate_layers():
    lin = StackedLinear(3, 5, 4)
    x = torch.randn(3, 7, 5)
    y = lin(x)
    for s in range(3):
        ref = F.linear(x[s], lin.weight[s], lin.bias[s, 0])
        torch.testing.assert_close(y[s], ref)
    shared = torch.randn(7, 5)
    torch.testing.assert_close(lin(shared)[1], F.linear(shared, lin.weight[1], lin.bias[1, 0]))


def test_linear_without_bias():
    lin = StackedLinear(2, 3, 4, bias=False)
    assert lin.bias is None
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(lin(x)[0], x[0] @ lin.weight[0].T)


@pytest.mark.parametrize(
    "init, check",
    [
        ("torch", lambda w, b: w.abs().max() <= 1 / math.sqrt(400) and b.abs().max() > 0),
        ("glorot", lambda w, b: w.abs().max() <= math.sqrt(6 / 500) and b.abs().max() == 0),
        ("he", lambda w, b: abs(w.std() - math.sqrt(2 / 400)) < 0.003 and b.abs().max() == 0),
        (0.5, lambda w, b: abs(w.std() - 0.5) < 0.02 and b.abs().max() == 0),
    ],
)
def test_linear_init(init, check):
    lin = StackedLinear(2, 400, 100, init=init)
    assert check(lin.weight.detach(), lin.bias.detach())


@pytest.mark.parametrize("init", ["kaiming", -1.0, True])
def test_linear_bad_init(init):
    with pytest.raises(ValueError, match="init must be"):
        StackedLinear(2, 3, 4, init=init)


def test_linear_bad_sizes_and_shapes():
    with pytest.raises(ValueError, match="n_models must be a positive int"):
        StackedLinear(0, 3, 4)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        StackedLinear(2, 3.0, 4)
    lin = StackedLinear(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(S, N, C\) = \(2, N, 3\), got \(3, 5, 3\)"):
        lin(torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match="got"):
        lin(torch.randn(5, 4))


# --- StackedBatchNorm ----------------------------------------------------------------------


def _reference_bns(bn: StackedBatchNorm) -> list[BatchNorm1d]:
    refs = []
    for s in range(bn.n_models):
        ref = BatchNorm1d(bn.num_features, eps=bn.eps, momentum=bn.momentum).double()
        with torch.no_grad():
            ref.weight.copy_(bn.weight[s, 0])
            ref.bias.copy_(bn.bias[s, 0])
        refs.append(ref)
    return refs


def test_batchnorm_matches_bnbook_in_float64():
    bn = StackedBatchNorm(3, 5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    refs = _reference_bns(bn)
    x = (torch.randn(3, 16, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    dy = torch.randn(3, 16, 5, dtype=torch.float64)
    y = bn(x)
    y.backward(dy)
    for s, ref in enumerate(refs):
        xs = x.detach()[s].clone().requires_grad_()
        ys = ref(xs)
        ys.backward(dy[s])
        torch.testing.assert_close(y[s], ys, atol=1e-9, rtol=0)
        torch.testing.assert_close(x.grad[s], xs.grad, atol=1e-9, rtol=0)
        torch.testing.assert_close(bn.weight.grad[s, 0], ref.weight.grad, atol=1e-9, rtol=0)
        torch.testing.assert_close(bn.bias.grad[s, 0], ref.bias.grad, atol=1e-9, rtol=0)
        torch.testing.assert_close(bn.running_mean[s, 0], ref.running_mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(bn.running_var[s, 0], ref.running_var, atol=1e-12, rtol=0)
    bn.eval()
    x2 = torch.randn(3, 4, 5, dtype=torch.float64)
    for s, ref in enumerate(refs):
        torch.testing.assert_close(bn(x2)[s], ref.eval()(x2[s]), atol=1e-12, rtol=0)


def test_batchnorm_ghost_batches_normalise_each_group():
    g = 4
    bn = StackedBatchNorm(2, 3, ghost_batch_size=g).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = torch.randn(2, 12, 3, dtype=torch.float64) * 2 + 0.5
    y = bn(x)
    for s in range(2):
        for k in range(3):
            grp = x[s, k * g : (k + 1) * g]
            ref = F.batch_norm(grp, None, None, bn.weight[s, 0], bn.bias[s, 0], True, 0.0, bn.eps)
            torch.testing.assert_close(y[s, k * g : (k + 1) * g], ref, atol=1e-12, rtol=0)
    # running statistics from the whole mini-batch, as without ghost batches
    expected_mean = 0.1 * x.mean(1, keepdim=True)
    expected_var = 0.9 + 0.1 * x.var(1, keepdim=True)
    torch.testing.assert_close(bn.running_mean, expected_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(bn.running_var, expected_var, atol=1e-12, rtol=0)


def test_batchnorm_ghost_gradients_match_autograd_of_groups():
    bn = StackedBatchNorm(2, 3, ghost_batch_size=3).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: bn(t), (x,))


def test_batchnorm_per_network_ghost_sizes_match_separate_layers():
    sizes = [4, None, 2, 4]
    mixed = StackedBatchNorm(4, 3, ghost_batch_size=sizes).double()
    with torch.no_grad():
        mixed.weight.uniform_(0.5, 2.0)
        mixed.bias.normal_()
    x = (torch.randn(4, 8, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    dy = torch.randn(4, 8, 3, dtype=torch.float64)
    y = mixed(x)
    y.backward(dy)
    for j, g in enumerate(sizes):
        single = StackedBatchNorm(1, 3, ghost_batch_size=g).double()
        with torch.no_grad():
            single.weight.copy_(mixed.weight[j : j + 1])
            single.bias.copy_(mixed.bias[j : j + 1])
        xj = x.detach()[j : j + 1].clone().requires_grad_()
        yj = single(xj)
        yj.backward(dy[j : j + 1])
        torch.testing.assert_close(y[j : j + 1], yj, atol=1e-12, rtol=0)
        torch.testing.assert_close(x.grad[j : j + 1], xj.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(
            mixed.weight.grad[j : j + 1], single.weight.grad, atol=1e-12, rtol=0
        )
        torch.testing.assert_close(
            mixed.running_var[j : j + 1], single.running_var, atol=1e-12, rtol=0
        )


def test_batchnorm_ghost_equal_to_batch_is_plain_batchnorm():
    a = StackedBatchNorm(2, 3, ghost_batch_size=8)
    b = StackedBatchNorm(2, 3)
    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=0)


def test_batchnorm_errors():
    with pytest.raises(ValueError, match="ghost_batch_size must be None, an int >= 2"):
        StackedBatchNorm(2, 3, ghost_batch_size=1)
    with pytest.raises(ValueError, match=r"one such value per network \(S = 2\)"):
        StackedBatchNorm(2, 3, ghost_batch_size=[4, 4, 4])
    bn = StackedBatchNorm(2, 3, ghost_batch_size=4)
    with pytest.raises(ValueError, match="multiple of ghost_batch_size = 4"):
        bn(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="at least 2"):
        StackedBatchNorm(2, 3)(torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match=r"\(2, N, 3\), got \(2, 5, 4\)"):
        StackedBatchNorm(2, 3)(torch.randn(2, 5, 4))


@settings(max_examples=25, deadline=None)
@given(s=st.integers(1, 4), n=st.integers(2, 9), c=st.integers(1, 5), seed=st.integers(0, 99))
def test_batchnorm_output_is_standardised(s, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, n, c, generator=g, dtype=torch.float64) * 5 + 3
    if (x.var(1) < 1e-3).any():
        return
    y = StackedBatchNorm(s, c, eps=1e-12).double()(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(s, c, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(
        y.var(1, unbiased=False), torch.ones(s, c, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_stacked_norm_wrapping_bnbook_equals_stacked_batchnorm():
    wrapped = StackedNorm(3, 4, BatchNorm1d)
    direct = StackedBatchNorm(3, 4)
    x = torch.randn(3, 10, 4) * 2 + 1
    torch.testing.assert_close(wrapped(x), direct(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        wrapped.norm.running_var.view(3, 1, 4), direct.running_var, atol=1e-6, rtol=0
    )
    with pytest.raises(ValueError, match="StackedNorm"):
        wrapped(torch.randn(2, 10, 4))


# --- StackedDropout ------------------------------------------------------------------------


def test_dropout_per_model_probabilities():
    drop = StackedDropout([0.0, 0.5, 0.9])
    x = torch.ones(3, 400, 50)
    y = drop(x)
    torch.testing.assert_close(y[0], x[0])  # p = 0: untouched
    zero_frac = (y == 0).float().mean((1, 2))
    assert abs(zero_frac[1] - 0.5) < 0.02 and abs(zero_frac[2] - 0.9) < 0.02
    assert abs(y[1].mean() - 1) < 0.03 and abs(y[2].mean() - 1) < 0.08  # inverted dropout
    torch.testing.assert_close(drop.eval()(x), x)


@pytest.mark.parametrize("p", [[1.0], [-0.1], [], [[0.1]]])
def test_dropout_bad_probabilities(p):
    with pytest.raises(ValueError, match="probabilities in"):
        StackedDropout(p)


# --- stacked_mlp, unstack, rescale_weights -------------------------------------------------


def test_stacked_mlp_structure():
    net = stacked_mlp(2, (6, 5, 5, 3), norm="batch", dropout=0.2)
    kinds = [type(m).__name__ for m in net]
    assert kinds == [
        "StackedLinear",
        "StackedBatchNorm",
        "ReLU",
        "StackedDropout",
        "StackedLinear",
        "StackedBatchNorm",
        "ReLU",
        "StackedDropout",
        "StackedLinear",
    ]
    assert net[0].bias is None and net[-1].bias is not None
    after = stacked_mlp(2, (6, 5, 3), norm="batch", norm_position="after")
    assert [type(m).__name__ for m in after][:3] == ["StackedLinear", "ReLU", "StackedBatchNorm"]
    assert after[0].bias is not None
    res = stacked_mlp(2, (6, 5, 5, 5, 3), norm="batch", residual=True)
    assert sum(isinstance(m, Residual) for m in res) == 2
    assert res(torch.randn(2, 4, 6)).shape == (2, 4, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"widths": (5,)}, "at least an input and an output"),
        ({"norm_position": "middle"}, "norm_position"),
        ({"norm": "layer"}, "norm must be None, 'batch' or a callable"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"activation": "gelu"}, "activation must be one of"),
        ({"widths": (6, 5, 4, 3), "residual": True}, "equal hidden widths"),
    ],
)
def test_stacked_mlp_errors(kwargs, match):
    kwargs = {"widths": (6, 5, 3), **kwargs}
    with pytest.raises(ValueError, match=match):
        stacked_mlp(2, **kwargs)


def test_unstack_gives_the_same_function():
    net = stacked_mlp(3, (6, 5, 5, 4), norm="batch", residual=True)
    x = torch.randn(3, 8, 6)
    y = net(x)
    for s in range(3):
        single = unstack(net, s)
        assert isinstance(single[1], BatchNorm1d)
        torch.testing.assert_close(single(x[s]), y[s], atol=1e-5, rtol=0)
    net.eval()
    single = unstack(net, 1)
    assert not single.training
    torch.testing.assert_close(single(x[1]), net(x)[1], atol=1e-5, rtol=0)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        unstack(net, 3)
    with pytest.raises(ValueError, match="ghost"):
        unstack(stacked_mlp(2, (6, 5, 3), norm="batch", norm_kwargs={"ghost_batch_size": 2}), 0)


def test_unstack_wrapped_norm_and_dropout():
    net = stacked_mlp(2, (6, 5, 3), norm=BatchNorm1d, dropout=[0.0, 0.3])
    net.eval()
    single = unstack(net, 1)
    assert isinstance(single[3], nn.Dropout) and single[3].p == pytest.approx(0.3)
    x = torch.randn(4, 6)
    torch.testing.assert_close(single(x), net(x)[1], atol=1e-5, rtol=0)


def test_rescale_weights():
    net = stacked_mlp(3, (6, 5, 3), init="he")
    before = [m.weight.detach().clone() for m in net if isinstance(m, StackedLinear)]
    rescale_weights(net, [1.0, 10.0, 0.0])
    after = [m.weight.detach() for m in net if isinstance(m, StackedLinear)]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a[1], 10 * b[1])
        torch.testing.assert_close(a[0], b[0])
        assert a[2].abs().max() == 0
    with pytest.raises(ValueError, match="one value per network"):
        rescale_weights(net, [1.0, 2.0])
    with pytest.raises(ValueError, match="no StackedLinear"):
        rescale_weights(nn.Sequential(nn.Linear(2, 2)), [1.0])


# --- training: stacked == separate ---------------------------------------------------------


def _train_separately(net, x, y, idx, opt_factory, steps):
    opt = opt_factory(net.parameters())
    net.train()
    for t in range(steps):
        loss = F.cross_entropy(net(x[idx[t]]), y[idx[t]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize(
    "optimizer, kwargs, factory",
    [
        ("sgd", {"momentum": 0.9}, lambda lr: lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)),
        ("adam", {"adam_eps": 1e-7}, lambda lr: lambda p: torch.optim.Adam(p, lr=lr, eps=1e-7)),
    ],
)
def test_stacked_training_equals_separate_training(optimizer, kwargs, factory):
    x, y = toy_data()
    lrs = [0.05, 0.01, 0.002] if optimizer == "sgd" else [1e-2, 3e-3, 1e-3]
    seeds = [3, 4, 5]
    net = stacked_mlp(3, (12, 8, 8, 4), norm="batch", residual=False)
    copies = [unstack(net, s) for s in range(3)]
    hist = train_stacked(
        net, x, y, x, y, steps=15, lr=lrs, seeds=seeds, batch_size=20, optimizer=optimizer, **kwargs
    )
    idx = batch_indices(len(x), 20, 15, seeds)
    net.eval()
    out = net(x)
    for s, single in enumerate(copies):
        _train_separately(single, x, y, idx[:, s], factory(lrs[s]), 15)
        single.eval()
        torch.testing.assert_close(single(x), out[s], atol=2e-5, rtol=1e-4)
    assert hist.eval_acc.shape == (3, 2) and not hist.diverged.any()


def test_stacked_training_with_wrapped_bnbook_norm_equals_fast_path():
    x, y = toy_data()
    torch.manual_seed(1)
    a = stacked_mlp(2, (12, 8, 4), norm="batch")
    torch.manual_seed(1)
    b = stacked_mlp(2, (12, 8, 4), norm=BatchNorm1d)
    ha = train_stacked(a, x, y, x, y, steps=10, lr=0.1, seeds=[0, 1], batch_size=30)
    hb = train_stacked(b, x, y, x, y, steps=10, lr=0.1, seeds=[0, 1], batch_size=30)
    np.testing.assert_allclose(ha.eval_loss, hb.eval_loss, atol=1e-5)


def test_history_records_and_divergence():
    x, y = toy_data()
    net = stacked_mlp(3, (12, 16, 4), init="he")
    hist = train_stacked(
        net, x, y, x, y, steps=20, lr=[0.01, 0.1, 1e4], seeds=[0, 1, 2], eval_every=5
    )
    np.testing.assert_array_equal(hist.steps, [0, 5, 10, 15, 20])
    assert hist.train_loss.shape == hist.eval_loss.shape == hist.eval_acc.shape == (3, 5)
    assert np.isnan(hist.train_loss[:, 0]).all() and np.isfinite(hist.train_loss[:2, 1:]).all()
    np.testing.assert_array_equal(hist.diverged, [False, False, True])
    assert hist.eval_loss[1, -1] < hist.eval_loss[1, 0]  # the sane network learns
    assert net.training


def test_train_stacked_errors():
    x, y = toy_data()
    net = stacked_mlp(2, (12, 4))
    with pytest.raises(ValueError, match="seeds must have one entry per network"):
        train_stacked(net, x, y, x, y, steps=1, lr=0.1, seeds=[0])
    with pytest.raises(ValueError, match="lr must be a float or S = 2 floats"):
        train_stacked(net, x, y, x, y, steps=1, lr=[0.1, 0.2, 0.3], seeds=[0, 1])
    with pytest.raises(ValueError, match="optimizer must be"):
        train_stacked(net, x, y, x, y, steps=1, lr=0.1, seeds=[0, 1], optimizer="rmsprop")


def test_evaluate_stacked_restores_mode():
    x, y = toy_data()
    net = stacked_mlp(2, (12, 4), norm="batch")
    net.train()
    loss, acc = evaluate_stacked(net, x, y)
    assert net.training and loss.shape == acc.shape == (2,)
    manual = F.cross_entropy(net.eval()(x)[1], y).item()
    assert loss[1] == pytest.approx(manual, rel=1e-6)


# --- helpers -------------------------------------------------------------------------------


def test_batch_indices_are_epoch_permutations():
    idx = batch_indices(10, 3, 7, seeds=[0, 1])
    assert idx.shape == (7, 2, 3)
    first_epoch = idx[:3, 0].ravel()  # 3 full batches per epoch, one sample left out
    assert len(set(first_epoch.tolist())) == 9
    assert not np.array_equal(idx[:, 0], idx[:, 1])
    np.testing.assert_array_equal(idx, batch_indices(10, 3, 7, seeds=[0, 1]))
    with pytest.raises(ValueError, match="batch_size must be in"):
        batch_indices(10, 11, 1, seeds=[0])


def test_steps_to_target_and_largest_trainable():
    steps = np.array([0, 5, 10])
    acc = np.array([[[0.1, 0.8, 0.95]], [[0.1, 0.2, 0.3]]])
    np.testing.assert_array_equal(steps_to_target(steps, acc, 0.9), [[10.0], [np.inf]])
    np.testing.assert_array_equal(steps_to_target(steps, acc, 0.05), [[0.0], [0.0]])
    assert largest_trainable([1, 2, 3], np.array([True, True, False])) == 2
    assert math.isnan(largest_trainable([1, 2], np.array([[False, True], [True, False]])))
