"""bnbook.stacked: S networks as one, layer by layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnbook.stacked import (
    Residual,
    StackedBatchNorm,
    StackedDropout,
    StackedHead,
    StackedLinear,
    StackedNorm,
    rescale_weights,
    stacked_mlp,
    unstack,
)
from bnbook.torch import BatchNorm1d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


def test_stacked_head_is_one_linear_per_network():
    head = StackedHead(3, 5, 2)
    x = torch.randn(4, 15)
    out = head(x)
    assert out.shape == (4, 3, 2)
    for s in range(3):
        expected = x[:, 5 * s : 5 * (s + 1)] @ head.weight[s] + head.bias[s]
        torch.testing.assert_close(out[:, s], expected)
