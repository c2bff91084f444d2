"""Tests of bnbook.small_batch: ghost batch norm, batch renormalisation, BLN and the FN sketch
(their formulas are also checked in tests/test_norms.py; the shared contract in
tests/test_conformance.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnbook.small_batch import (
    BatchLayerNorm,
    BatchRenorm1d,
    BatchRenorm2d,
    FullNormSketch,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    renorm_limits,
)

D = torch.float64


def batch_renorm(x, running_mean, running_var, weight=None, bias=None, momentum=0.1, **extras):
    """A training step of BatchRenorm1d whose buffers and parameters are the given tensors."""
    track = running_mean is not None
    layer = BatchRenorm1d(x.shape[1], 1e-5, momentum, True, track, dtype=D, **extras)
    if track:
        layer.running_mean, layer.running_var = running_mean, running_var
    with torch.no_grad():
        layer.weight.copy_(torch.ones(x.shape[1]) if weight is None else weight)
        layer.bias.copy_(torch.zeros(x.shape[1]) if bias is None else bias)
    return layer(x)


def _pair(layer_cls, *args, **kwargs):
    torch.manual_seed(0)
    ours = layer_cls(*args, **kwargs, dtype=D)
    theirs = torch.nn.BatchNorm1d(args[0], dtype=D)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(args[0], dtype=D) + 0.5)
        ours.bias.copy_(torch.randn(args[0], dtype=D))
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    return ours, theirs


@pytest.mark.parametrize("shape", [(16, 5), (8, 5, 7)])
def test_ghost_with_one_group_is_batch_norm(shape):
    ours, theirs = _pair(GhostBatchNorm1d, shape[1], ghost_batch_size=shape[0])
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(*shape, dtype=D)
    y, y2 = ours(x), theirs(x2)
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-9)
    (y * dy).sum().backward()
    (y2 * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-9, atol=1e-9)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("n", "g"), [(12, 4), (14, 4), (10, 4)])
def test_ghost_equals_batch_norm_per_group(n, g):
    x = torch.randn(n, 3, dtype=D)
    mean, var = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    y = batch_renorm(  # closed clips: ghost batch norm
        x, mean, var, momentum=1.0, r_max=1.0, d_max=0.0, ghost_batch_size=g
    )
    chunks = x.split(g)
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in chunks])
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    # momentum 1: the running mean is the size-weighted mean of the groups' means (= the batch mean)
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-9, atol=1e-9)
    unbiased = sum(len(c) * c.var(0, unbiased=True) for c in chunks) / n
    torch.testing.assert_close(var, unbiased, rtol=1e-9, atol=1e-9)


def test_ghost_2d_groups_over_pixels():
    x = torch.randn(4, 3, 5, 5, dtype=D)
    layer = GhostBatchNorm2d(3, ghost_batch_size=2, dtype=D)
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split(2)])
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)


def test_ghost_state_dict_loads_into_torch():
    layer = GhostBatchNorm1d(4, ghost_batch_size=2)
    layer(torch.randn(8, 4))
    ref = torch.nn.BatchNorm1d(4)
    ref.load_state_dict(layer.state_dict())
    layer.eval(), ref.eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), ref(x))


def test_ghost_without_running_stats_uses_group_stats_in_eval():
    layer = GhostBatchNorm1d(3, ghost_batch_size=4, track_running_stats=False).eval()
    x = torch.randn(8, 3)
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split(4)])
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: GhostBatchNorm1d(3, ghost_batch_size=0), "ghost_batch_size"),
        (lambda: GhostBatchNorm1d(3, ghost_batch_size=True), "ghost_batch_size"),
        (
            lambda: GhostBatchNorm1d(3, ghost_batch_size=2)(torch.randn(3, 3)),
            "more than 1 value",
        ),  # group of 1 left
        (lambda: GhostBatchNorm1d(3, ghost_batch_size=2)(torch.randn(4, 3, 2, 2)), "3D input"),
        (
            lambda: GhostBatchNorm1d(3, ghost_batch_size=2)(torch.randn(4, 5)),
            "should contain 5 elements not 3",
        ),
        (lambda: BatchRenorm1d(3, r_max=0.5), "r_max"),
        (lambda: BatchRenorm1d(3, d_max=-1.0), "d_max"),
        (lambda: BatchRenorm1d(3, warmup_steps=-1), "warmup_steps"),
        (lambda: BatchRenorm1d(3)(torch.randn(1, 3)), "more than 1 value"),
        (lambda: BatchRenorm2d(3)(torch.randn(2, 3)), "4D input"),
        (lambda: BatchRenorm1d(3)(torch.randn(4)), "1D input"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):  # ChannelMismatchError is a ValueError
        call()


def test_renorm_with_closed_clips_is_batch_norm():
    ours, theirs = _pair(BatchRenorm1d, 5, r_max=1.0, d_max=0.0)
    x = torch.randn(16, 5, dtype=D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(16, 5, dtype=D)
    y, y2 = ours(x), theirs(x2)
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-9)
    (y * dy).sum().backward()
    (y2 * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    shift=st.floats(-1.0, 1.0),
    log_scale=st.floats(-0.5, 0.5),
    seed=st.integers(0, 2**16),
)
def test_renorm_training_output_equals_inference_when_unclipped(shift, log_scale, seed):
    """With r and d inside their clips, training normalises with the running statistics."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=gen, dtype=D)
    mean_b, var_b = x.mean(0), x.var(0, unbiased=False)
    running_mean = mean_b + shift
    running_var = (var_b + 1e-5) * torch.exp(torch.tensor(2 * log_scale, dtype=D)) - 1e-5
    y = batch_renorm(x, running_mean.clone(), running_var.clone(), r_max=3.0, d_max=5.0)
    expected = (x - running_mean) / torch.sqrt(running_var + 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


def test_renorm_gradient_is_batch_norm_gradient_scaled_by_r():
    """r and d are constants in the backward pass: dL/dx = BN backward with gamma * r."""
    torch.manual_seed(1)
    x = torch.randn(16, 3, dtype=D, requires_grad=True)
    gamma = torch.rand(3, dtype=D) + 0.5
    running_mean, running_var = torch.randn(3, dtype=D) * 0.3, torch.rand(3, dtype=D) + 0.5
    dy = torch.randn(16, 3, dtype=D)
    y = batch_renorm(x, running_mean.clone(), running_var.clone(), gamma, None)
    (y * dy).sum().backward()
    with torch.no_grad():
        r = (torch.sqrt(x.var(0, unbiased=False) + 1e-5) / torch.sqrt(running_var + 1e-5)).clamp(
            1 / 3, 3
        )
    x2 = x.detach().clone().requires_grad_()
    (F.batch_norm(x2, None, None, gamma * r, None, training=True) * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-9)


def test_renorm_clips_are_applied():
    x = torch.randn(64, 2, dtype=D) * 10 + 100  # far from running stats (0, 1)
    y = batch_renorm(x, torch.zeros(2, dtype=D), torch.ones(2, dtype=D), r_max=3.0, d_max=5.0)
    x_hat_bn = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, x_hat_bn * 3.0 + 5.0, rtol=1e-9, atol=1e-9)


def test_renorm_ghost_groups():
    x = torch.randn(12, 3, dtype=D)
    mean, var = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    y = batch_renorm(x, mean.clone(), var.clone(), r_max=1.0, d_max=0.0, ghost_batch_size=4)
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split(4)])
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


def test_renorm_ramp_schedule_and_eval():
    layer = BatchRenorm1d(3, r_ramp_steps=10, d_ramp_steps=10)
    assert layer.current_limits() == (1.0, 0.0)
    for _ in range(5):
        layer(torch.randn(8, 3))
    assert layer.current_limits() == pytest.approx((2.0, 2.5))
    for _ in range(10):
        layer(torch.randn(8, 3))
    assert layer.current_limits() == (3.0, 5.0)
    ref = torch.nn.BatchNorm1d(3)
    ref.load_state_dict(layer.state_dict())
    layer.eval(), ref.eval()
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), ref(x))


def test_cumulative_momentum():
    layer = GhostBatchNorm1d(2, ghost_batch_size=4, momentum=None, dtype=D)
    xs = [torch.randn(8, 2, dtype=D) for _ in range(3)]
    for x in xs:
        layer(x)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))


def test_input_not_mutated():
    x = torch.randn(8, 3)
    before = x.clone()
    GhostBatchNorm1d(3, ghost_batch_size=4)(x)
    BatchRenorm1d(3)(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GhostBatchNorm2d(3, ghost_batch_size=2),
        lambda: BatchRenorm2d(3, ghost_batch_size=2),
        lambda: BatchLayerNorm(3, batch_size=4),
        lambda: FullNormSketch(3),
    ],
)
def test_empty_batch_and_channels_last(make):
    layer = make()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer(torch.randn(0, 3, 4, 4)).shape == (0, 3, 4, 4)
    for key, value in layer.state_dict().items():
        if key != "num_batches_tracked":
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    x = torch.randn(4, 3, 4, 4)
    y = make()(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, make()(x))


def test_one_renorm_schedule_and_signature():
    layer = BatchRenorm2d(3, 1e-3, 0.2, r_max=2.0, warmup_steps=2, r_ramp_steps=4, d_ramp_steps=2)
    assert (layer.eps, layer.momentum) == (1e-3, 0.2)  # torch's positional arguments first
    limits = []
    for _ in range(8):
        limits.append(layer.current_limits())
        layer(torch.randn(4, 3, 2, 2))
    assert limits == [renorm_limits(t, **layer.schedule) for t in range(8)]
    assert limits[2:4] == [(1.0, 0.0), (1.25, 2.5)] and limits[-1] == (2.0, 5.0)
    with pytest.raises(TypeError):
        BatchRenorm2d(3, 1e-5, 0.1, True, True, None, None, 3.0)  # extras are keyword-only
