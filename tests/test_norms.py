"""Tests of bnbook.norms: parity with PyTorch in float64 (forward, gradients, running statistics),
NumPy backward passes against numerical gradients, the renorm/BLN/FN-sketch properties, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import bnbook.norms as N
import bnbook.norms_numpy as NP
import bnbook.small_batch as SB
from bnbook import models, train
from bnbook.gradcheck import numerical_gradient

F64 = torch.float64
TOL = 1e-9


def _randomise(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        for (name, p), (name2, q) in zip(
            src.named_parameters(), dst.named_parameters(), strict=True
        ):
            assert name == name2
            q.copy_(p)


def _compare(ours: nn.Module, ref: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """Forward, input and parameter gradients, and buffers after ``steps`` calls agree to 1e-9."""
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        x1 = (x + t).clone().requires_grad_(True)
        x2 = (x + t).clone().requires_grad_(True)
        ours.zero_grad()
        ref.zero_grad()
        y1, y2 = ours(x1), ref(x2)
        torch.testing.assert_close(y1, y2, atol=TOL, rtol=0)
        g = torch.randn(y1.shape, generator=gen, dtype=x.dtype)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=TOL, rtol=0)
        for (n1, p1), (_, p2) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            torch.testing.assert_close(p1.grad, p2.grad, atol=TOL, rtol=0, msg=n1)
        buffers2 = dict(ref.named_buffers())
        for name, b1 in ours.named_buffers():
            torch.testing.assert_close(b1, buffers2[name], atol=TOL, rtol=0, msg=name)


@pytest.fixture
def x4():
    return torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 + 1


# --------------------------------------------------------------------------------------------
# Parity with PyTorch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(x4, affine):
    ours = N.LayerNorm((6, 5, 5), elementwise_affine=affine, dtype=F64)
    ref = nn.LayerNorm((6, 5, 5), elementwise_affine=affine, dtype=F64)
    _randomise(ours)
    _copy_params(ours, ref)
    _compare(ours, ref, x4)
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_layer_norm_last_dim_and_no_bias():
    x = torch.randn(3, 7, 10, dtype=F64)
    ours, ref = N.LayerNorm(10, bias=False, dtype=F64), nn.LayerNorm(10, bias=False, dtype=F64)
    _randomise(ours)
    _copy_params(ours, ref)
    _compare(ours, ref, x)


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_norm_matches_torch(x4, groups):
    ours, ref = N.GroupNorm(groups, 6, dtype=F64), nn.GroupNorm(groups, 6, dtype=F64)
    _randomise(ours)
    _copy_params(ours, ref)
    _compare(ours, ref, x4)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_instance_norm_matches_torch_train_and_eval(x4, track, affine, momentum):
    kw = dict(affine=affine, track_running_stats=track, momentum=momentum, dtype=F64)
    ours, ref = N.InstanceNorm2d(6, **kw), nn.InstanceNorm2d(6, **kw)
    _randomise(ours)
    _copy_params(ours, ref)
    _compare(ours, ref, x4)  # training: running statistics updated as PyTorch does
    ours.eval()
    ref.eval()
    _compare(ours, ref, x4, steps=1)  # evaluation: running statistics used (if tracked)
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_instance_norm_1d_3d_and_unbatched():
    for ours, ref, shape in (
        (N.InstanceNorm1d(3, dtype=F64), nn.InstanceNorm1d(3, dtype=F64), (2, 3, 9)),
        (N.InstanceNorm3d(3, dtype=F64), nn.InstanceNorm3d(3, dtype=F64), (2, 3, 3, 4, 2)),
        (N.InstanceNorm2d(3, dtype=F64), nn.InstanceNorm2d(3, dtype=F64), (3, 4, 4)),
    ):
        _compare(ours, ref, torch.randn(shape, dtype=F64))


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_matches_torch(dim):
    conv1 = nn.Conv2d(3, 4, 3).double()
    conv2 = nn.Conv2d(3, 4, 3).double()
    conv2.load_state_dict(conv1.state_dict())
    N.weight_norm(conv1, dim=dim)
    torch_weight_norm(conv2, dim=dim)
    assert conv1.state_dict().keys() == conv2.state_dict().keys()
    for k, v in conv1.state_dict().items():
        torch.testing.assert_close(v, conv2.state_dict()[k], atol=TOL, rtol=0)
    _compare(conv1, conv2, torch.randn(2, 3, 6, 6, dtype=F64))


def test_weight_norm_state_dict_round_trips_with_torch():
    lin1, lin2 = nn.Linear(5, 3).double(), nn.Linear(5, 3).double()
    N.weight_norm(lin1)
    torch_weight_norm(lin2)
    _randomise(lin1)
    lin2.load_state_dict(lin1.state_dict())
    x = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(lin1(x), lin2(x), atol=TOL, rtol=0)


def test_renorm_with_unit_limits_is_batch_norm(x4):
    ours = SB.BatchRenorm2d(6, r_max=1.0, d_max=0.0, dtype=F64)
    ref = nn.BatchNorm2d(6, dtype=F64)
    _randomise(ours)
    _copy_params(ours, ref)
    _compare(ours, ref, x4, steps=3)
    ours.eval()
    ref.eval()
    _compare(ours, ref, x4, steps=1)
    # the state dict loads into PyTorch's batch norm
    fresh = nn.BatchNorm2d(6, dtype=F64)
    fresh.load_state_dict(ours.state_dict())


def test_renorm_momentum_none_is_cumulative_average(x4):
    ours = SB.BatchRenorm2d(6, momentum=None, r_max=1.0, d_max=0.0, dtype=F64)
    ref = nn.BatchNorm2d(6, momentum=None, dtype=F64)
    _compare(ours, ref, x4, steps=3)


def test_full_norm_sketch_with_alpha_one_trains_like_batch_norm(x4):
    ours, ref = SB.FullNormSketch(6, alpha=1.0, dtype=F64), nn.BatchNorm2d(6, dtype=F64)
    _randomise(ours)
    _copy_params(ours, ref)
    for t in range(2):
        g = torch.randn_like(x4)
        x1, x2 = (x4 + t).requires_grad_(True), (x4 + t).requires_grad_(True)
        y1, y2 = ours(x1), ref(x2)
        torch.testing.assert_close(y1, y2, atol=TOL, rtol=0)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Batch renormalisation: r and d, their clipping, the stopped gradient, the schedule
# --------------------------------------------------------------------------------------------


def _renorm_reference(x, mean, var, weight, bias, r_max, d_max, eps, stop):
    dims = (0, 2, 3)
    mb = x.mean(dims, keepdim=True)
    vb = ((x - mb) ** 2).mean(dims, keepdim=True)
    sb = torch.sqrt(vb + eps)
    s = torch.sqrt(var.reshape(1, -1, 1, 1) + eps)
    r = (sb / s).clamp(1 / r_max, r_max)
    d = ((mb - mean.reshape(1, -1, 1, 1)) / s).clamp(-d_max, d_max)
    if stop:
        r, d = r.detach(), d.detach()
    return ((x - mb) / sb * r + d) * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def test_renorm_matches_formula_with_stopped_gradient(x4):
    layer = SB.BatchRenorm2d(6, r_max=1.5, d_max=0.5, dtype=F64)
    _randomise(layer)
    with torch.no_grad():  # running statistics far from the batch's, so the clips are active
        layer.running_mean.fill_(3.0)
        layer.running_var.fill_(0.2)
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()
    g = torch.randn_like(x4)
    x1, x2, x3 = (x4.clone().requires_grad_(True) for _ in range(3))
    y = layer(x1)
    assert bool((layer.last_r == 1.5).any()) and bool((layer.last_d.abs() == 0.5).any())
    ref = _renorm_reference(x2, mean0, var0, layer.weight, layer.bias, 1.5, 0.5, layer.eps, True)
    torch.testing.assert_close(y, ref, atol=TOL, rtol=0)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=TOL, rtol=0)
    # gradients through r and d would differ: the test above could fail
    unstopped = _renorm_reference(
        x3, mean0, var0, layer.weight, layer.bias, 10.0, 10.0, layer.eps, False
    )
    (unstopped * g).sum().backward()
    assert (x3.grad - x1.grad).abs().max() > 1e-3


def test_renorm_running_statistics_follow_torch_convention(x4):
    layer = SB.BatchRenorm2d(6, momentum=0.3, dtype=F64)
    layer(x4)
    m = x4.shape[0] * 25
    mean = x4.mean((0, 2, 3))
    var = x4.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_mean, 0.3 * mean, atol=TOL, rtol=0)
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * var, atol=TOL, rtol=0)
    assert m > 1 and int(layer.num_batches_tracked) == 1


def test_renorm_limits_schedule():
    kw = dict(r_max=3.0, d_max=5.0, warmup_steps=100, r_ramp_steps=400, d_ramp_steps=200)
    assert SB.renorm_limits(0, **kw) == (1.0, 0.0)
    assert SB.renorm_limits(99, **kw) == (1.0, 0.0)
    assert SB.renorm_limits(200, **kw) == (1.5, 2.5)
    assert SB.renorm_limits(300, **kw) == (2.0, 5.0)
    assert SB.renorm_limits(10_000, **kw) == (3.0, 5.0)
    with pytest.raises(ValueError, match="r_max"):
        SB.renorm_limits(0, r_max=0.5)


def test_renorm_layer_uses_its_step_counter(x4):
    layer = SB.BatchRenorm2d(6, warmup_steps=2, r_ramp_steps=2, d_ramp_steps=2, dtype=F64)
    seen = []
    for _ in range(5):
        seen.append(layer.current_limits())
        layer(x4)
    assert seen == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), (2.0, 2.5), (3.0, 5.0)]


# --------------------------------------------------------------------------------------------
# Batch layer norm and the FN sketch
# --------------------------------------------------------------------------------------------


def test_batch_layer_norm_is_the_weighted_mix(x4):
    layer = SB.BatchLayerNorm(6, batch_size=4, dtype=F64)
    _randomise(layer)
    y = layer(x4)
    ln = N.standardize(x4, (1, 2, 3))
    bn = N.standardize(x4, (0, 2, 3))
    mix = 0.25 * ln + 0.75 * bn
    ref = mix * layer.weight.reshape(1, -1, 1, 1) + layer.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(y, ref, atol=TOL, rtol=0)
    # in evaluation the batch part uses the running statistics, the layer part the sample itself
    layer.eval()
    bn_eval = (x4 - layer.running_mean.reshape(1, -1, 1, 1)) / torch.sqrt(
        layer.running_var.reshape(1, -1, 1, 1) + layer.eps
    )
    ref_eval = (0.25 * ln + 0.75 * bn_eval) * layer.weight.reshape(
        1, -1, 1, 1
    ) + layer.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(layer(x4), ref_eval, atol=TOL, rtol=0)


def test_batch_layer_norm_with_m_one_is_layer_norm(x4):
    layer = SB.BatchLayerNorm(6, batch_size=1, dtype=F64)
    torch.testing.assert_close(layer(x4), N.standardize(x4, (1, 2, 3)), atol=TOL, rtol=0)
    assert bool((layer.running_mean == 0).all()) and bool((layer.running_var == 1).all())


def test_batch_layer_norm_gradcheck():
    layer = SB.BatchLayerNorm(3, batch_size=2, dtype=F64)
    x = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_full_norm_sketch_update_is_weighted_chan():
    layer = SB.FullNormSketch(1, alpha=0.25, affine=False, dtype=F64)
    a = torch.randn(5, 1, dtype=F64)
    b = torch.randn(5, 1, dtype=F64) + 2
    layer(a)
    layer(b)
    mean_a, var_a = a.mean(), a.var(unbiased=False)
    mean_b, var_b = b.mean(), b.var(unbiased=False)
    mean = 0.75 * mean_a + 0.25 * mean_b
    var = 0.75 * var_a + 0.25 * var_b + 0.25 * 0.75 * (mean_b - mean_a) ** 2
    torch.testing.assert_close(layer.running_mean[0], mean, atol=TOL, rtol=0)
    torch.testing.assert_close(layer.running_var[0], var, atol=TOL, rtol=0)


def test_full_norm_sketch_gradient_flows_only_through_current_batch():
    layer = SB.FullNormSketch(2, alpha=0.5, affine=False, dtype=F64)
    layer(torch.randn(6, 2, dtype=F64))
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()

    def step(t):  # the history (running estimates) is the same constant at every call
        with torch.no_grad():
            layer.running_mean.copy_(mean0)
            layer.running_var.copy_(var0)
        return layer(t)

    x = torch.randn(6, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(step, (x,))
    # and the gradient differs from batch norm's (the history enters the normalisation)
    g = torch.randn(6, 2, dtype=F64)
    x1 = x.detach().clone().requires_grad_(True)
    (step(x1) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (N.standardize(x2, 0) * g).sum().backward()
    assert (x1.grad - x2.grad).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# NumPy forward/backward pairs
# --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(3, 4, 2, 2), (2, 6, 3, 1), (5, 2, 4, 3)]),
    axes=st.sampled_from([(0, 2, 3), (1, 2, 3), (2, 3), (1,)]),
    seed=st.integers(0, 2**16),
)
def test_standardize_backward_matches_numerical_gradient(shape, axes, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=shape)
    g = rng.normal(size=shape)
    x_hat, cache = NP.standardize_forward(x, axes)
    dx = NP.standardize_backward(g, cache)
    num = numerical_gradient(lambda t: NP.standardize_forward(t, axes)[0], x, g)
    np.testing.assert_allclose(dx, num, atol=1e-6)
    # property: x̂ has zero mean over the axes, and the gradient is orthogonal to 1 and to x̂
    np.testing.assert_allclose(x_hat.mean(axis=axes), 0, atol=1e-12)
    np.testing.assert_allclose(dx.sum(axis=axes), 0, atol=1e-9)


def test_numpy_layer_group_instance_match_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 4, 4))
    w, b = rng.normal(size=6), rng.normal(size=6)
    g = rng.normal(size=x.shape)
    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    for groups in (1, 3, 6):
        y, cache = NP.group_norm_forward(x, groups, w, b)
        dx, dw, db = NP.group_norm_backward(g, cache)
        for t in (xt, wt, bt):
            t.grad = None
        yt = torch.nn.functional.group_norm(xt, groups, wt, bt)
        (yt * torch.tensor(g)).sum().backward()
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=TOL)
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=TOL)
        np.testing.assert_allclose(dw, wt.grad.numpy(), atol=TOL)
        np.testing.assert_allclose(db, bt.grad.numpy(), atol=TOL)
    y_in, _ = NP.instance_norm_forward(x, w, b)
    np.testing.assert_allclose(y_in, NP.group_norm_forward(x, 6, w, b)[0], atol=TOL)
    # layer norm with an elementwise affine
    wl, bl = rng.normal(size=(6, 4, 4)), rng.normal(size=(6, 4, 4))
    y, cache = NP.layer_norm_forward(x, (6, 4, 4), wl, bl)
    dx, dwl, dbl = NP.layer_norm_backward(g, cache)
    xt.grad = None
    wlt, blt = torch.tensor(wl, requires_grad=True), torch.tensor(bl, requires_grad=True)
    yt = torch.nn.functional.layer_norm(xt, (6, 4, 4), wlt, blt)
    (yt * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=TOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=TOL)
    np.testing.assert_allclose(dwl, wlt.grad.numpy(), atol=TOL)
    np.testing.assert_allclose(dbl, blt.grad.numpy(), atol=TOL)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_numpy_weight_norm_matches_torch(dim):
    rng = np.random.default_rng(1)
    v = rng.normal(size=(4, 3, 2, 2))
    conv = nn.Conv2d(3, 4, 2, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(v))
    torch_weight_norm(conv, dim=dim)
    gp = conv.parametrizations.weight.original0
    with torch.no_grad():
        gp.copy_(torch.tensor(rng.normal(size=tuple(gp.shape))))
    g = gp.detach().numpy()
    w, cache = NP.weight_norm_forward(v, g, dim=dim)
    np.testing.assert_allclose(w, conv.weight.detach().numpy(), atol=TOL)
    dw = rng.normal(size=v.shape)
    (conv.weight * torch.tensor(dw)).sum().backward()
    dv, dg = NP.weight_norm_backward(dw, cache)
    np.testing.assert_allclose(dv, conv.parametrizations.weight.original1.grad.numpy(), atol=TOL)
    np.testing.assert_allclose(dg, gp.grad.numpy(), atol=TOL)
    if dim == 0:  # the gradient of v is orthogonal to v, row by row
        np.testing.assert_allclose((dv * v).reshape(4, -1).sum(1), 0, atol=1e-12)


def test_torch_standardize_gradcheck():
    x = torch.randn(3, 4, 2, 2, dtype=F64, requires_grad=True)
    for dims in ((0, 2, 3), (1, 2, 3), (2, 3)):
        assert torch.autograd.gradcheck(lambda t, d=dims: N.standardize(t, d), (x,))


# --------------------------------------------------------------------------------------------
# The comparison network: the stacked networks are independent
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", models.FAMILY_METHODS)
def test_family_cnn_networks_are_independent(method):
    torch.manual_seed(0)
    net = models.family_cnn(method, seeds=2, batch_size=4, steps=10).double()
    x = torch.randn(4, 2, 14, 14, dtype=F64)
    x2 = x.clone()
    x2[:, 1] = torch.randn(4, 14, 14, dtype=F64) * 3
    y = net(x)
    assert y.shape == (4, 2, 10)
    y[:, 0].sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    torch.manual_seed(0)
    net2 = models.family_cnn(method, seeds=2, batch_size=4, steps=10).double()
    y2 = net2(x2)
    torch.testing.assert_close(y2[:, 0], y[:, 0], atol=1e-12, rtol=0)  # network 0 ignores network 1
    assert (y2[:, 1] - y[:, 1]).abs().max() > 1e-3
    y2[:, 0].sum().backward()
    for n, p in net2.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-10, rtol=0, msg=n)


def test_train_family_returns_one_accuracy_per_seed():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 14, 14, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    acc = train.train_family("group", 8, x, y, x[:20], y[:20], seeds=(0, 1), steps=3)
    assert acc.shape == (2,) and ((0 <= acc) & (acc <= 1)).all()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="divisible"):
        N.GroupNorm(4, 6)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        N.LayerNorm(5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="spatial element"):
        N.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1))
    with pytest.raises(ValueError, match="weight should contain 4 elements not 3"):
        N.InstanceNorm2d(3, affine=True)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="more than 1 value"):
        SB.BatchRenorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        SB.BatchRenorm2d(3)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        SB.BatchLayerNorm(3, batch_size=0)
    with pytest.raises(ValueError, match="alpha"):
        SB.FullNormSketch(3, alpha=0.0)
    with pytest.raises(TypeError, match="floating"):
        NP.standardize_forward(np.arange(6).reshape(2, 3), 0)
    with pytest.raises(ValueError, match="repeat"):
        NP.standardize_forward(np.ones((2, 3)), (0, 0))
    with pytest.raises(ValueError, match="num_groups"):
        NP.group_norm_forward(np.ones((2, 6, 2)), 4)
    with pytest.raises(ValueError, match="g must have shape"):
        NP.weight_norm_forward(np.ones((3, 2)), np.ones((3,)))
    with pytest.raises(ValueError, match="dy must have"):
        _, cache = NP.group_norm_forward(np.ones((2, 6, 2)) + np.arange(2)[:, None, None], 3)
        NP.group_norm_backward(np.ones((2, 6)), cache)


# --------------------------------------------------------------------------------------------
# RMS normalisation (chapter ch-beyond)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6, 0.3])
@pytest.mark.parametrize("shape", [(6,), (5, 6), [4, 5, 6]])
def test_rms_norm_matches_torch(x4, affine, eps, shape):
    x = x4.permute(0, 2, 3, 1)[..., : shape[-1]].reshape(4, 5, 5, 6)  # trailing (…, 6)
    x = x.reshape(-1, *tuple(shape)) if len(shape) > 1 else x
    ours = N.RMSNorm(shape, eps=eps, elementwise_affine=affine, dtype=F64)
    ref = nn.RMSNorm(shape, eps=eps, elementwise_affine=affine, dtype=F64)
    _randomise(ours)
    ref.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(ref)
    _compare(ours, ref, x)


def test_rms_norm_state_dict_and_reset_follow_torch():
    ours, ref = N.RMSNorm((3, 4), dtype=F64), nn.RMSNorm((3, 4), dtype=F64)
    _randomise(ref)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    torch.testing.assert_close(ours.weight, ref.weight, atol=0, rtol=0)
    ours.reset_parameters()
    assert bool((ours.weight == 1).all())
    assert N.RMSNorm(4, elementwise_affine=False).weight is None


def test_rms_norm_default_eps_is_torchs():
    # Mean squares near float32's machine epsilon: the default eps changes the output visibly.
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)) * 3e-4
    ours, ref = N.RMSNorm(16)(x), nn.RMSNorm(16)(x)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert (ours - N.RMSNorm(16, eps=1e-6)(x)).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_low_precision_computes_in_float32_like_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 7, 32, generator=gen) * 1e-3).to(dtype)
    w = torch.randn(32, generator=gen).to(dtype)
    ours = N.rms_norm(x, (32,), w)
    ref = torch.nn.functional.rms_norm(x, (32,), w)
    assert ours.dtype == ref.dtype == dtype
    torch.testing.assert_close(ours.float(), ref.float(), atol=0, rtol=0)


def test_rms_norm_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    w = torch.randn(4, 5, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: N.rms_norm(a, (4, 5), b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a: N.rms_norm(a, 5, None, 1e-5), (x,))


def test_numpy_rms_norm_matches_torch_and_numerical_gradient():
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, size=(3, 4, 6))
    w = rng.normal(size=6)
    g = rng.normal(size=x.shape)
    y, cache = NP.rms_norm_forward(x, 6, w, eps=1e-5)
    dx, dw = NP.rms_norm_backward(g, cache)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.rms_norm(xt, (6,), wt, 1e-5)
    (yt * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(dw, wt.grad.numpy(), atol=TOL, rtol=0)
    num = numerical_gradient(lambda t: NP.rms_norm_forward(t, 6, w, eps=1e-5)[0], x, g)
    np.testing.assert_allclose(dx, num, atol=1e-7, rtol=0)
    dx0, dw0 = NP.rms_norm_backward(g, NP.rms_norm_forward(x, (4, 6), eps=1e-5)[1])
    assert dw0 is None and dx0.shape == x.shape


def test_rms_backward_is_layer_norms_without_the_mean_term():
    # For an input with zero mean over the normalised axes, layer norm's statistics and RMS
    # norm's coincide, so their backward passes differ exactly by layer norm's -mean(d) term.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 8))
    x -= x.mean(axis=1, keepdims=True)
    d = rng.normal(size=x.shape)
    _, rms_cache = NP.rms_norm_forward(x, 8, eps=1e-5)
    _, ln_cache = NP.layer_norm_forward(x, 8, eps=1e-5)
    dx_rms, _ = NP.rms_norm_backward(d, rms_cache)
    dx_ln, _, _ = NP.layer_norm_backward(d, ln_cache)
    np.testing.assert_allclose(dx_ln, dx_rms - rms_cache.inv_rms * d.mean(axis=1, keepdims=True))
    assert np.abs(d.mean(axis=1)).min() > 1e-3  # the term is not trivially zero


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(2, 16),
)
def test_rms_norm_is_invariant_to_positive_rescaling(scale, seed, d):
    x = np.random.default_rng(seed).normal(size=(3, d))
    eps = 1e-10
    y1, c1 = NP.rms_norm_forward(x, d, eps=eps)
    y2, _ = NP.rms_norm_forward(scale * x, d, eps=eps)
    # eps breaks the invariance by at most eps / mean(x²) relative, for the smaller input
    ms = np.minimum(1.0, scale**2) / c1.inv_rms.max() ** 2
    np.testing.assert_allclose(y1, y2, rtol=10 * eps / ms + 1e-12, atol=1e-12)


def test_rms_norm_errors():
    with pytest.raises(RuntimeError, match="normalized_shape"):
        N.RMSNorm(5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="eps"):
        N.RMSNorm(5, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        N.rms_norm(torch.randn(2, 5), 5, eps=-1.0)
    with pytest.raises(TypeError, match="floating"):
        N.RMSNorm(4)(torch.arange(8).reshape(2, 4))
    with pytest.raises(TypeError, match="floating"):
        NP.rms_norm_forward(np.arange(6).reshape(2, 3), 3)
    with pytest.raises(ValueError, match="normalized_shape"):
        NP.rms_norm_forward(np.ones((2, 3)), 4)
    with pytest.raises(ValueError, match="weight must have shape"):
        NP.rms_norm_forward(np.ones((2, 3)), 3, np.ones(4))
    with pytest.raises(ValueError, match="dy must have"):
        NP.rms_norm_backward(np.ones((2, 4)), NP.rms_norm_forward(np.ones((2, 3)), 3)[1])


# --------------------------------------------------------------------------------------------
# Empty batches and channels-last input, as torch.nn handles them
# --------------------------------------------------------------------------------------------

EDGE_MODULES = {
    "LayerNorm": lambda: N.LayerNorm((4, 5, 5)),
    "RMSNorm": lambda: N.RMSNorm((4, 5, 5)),
    "GroupNorm": lambda: N.GroupNorm(2, 4),
    "InstanceNorm2d": lambda: N.InstanceNorm2d(4, affine=True),
    "InstanceNorm2d-running": lambda: N.InstanceNorm2d(4, affine=True, track_running_stats=True),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", EDGE_MODULES)
def test_empty_batch_gives_empty_output_and_keeps_running_stats(name, training):
    layer = EDGE_MODULES[name]().train(training)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", EDGE_MODULES)
def test_channels_last_is_preserved(name, training):
    layer = EDGE_MODULES[name]().train(training)
    x = torch.randn(3, 4, 5, 5)
    x_cl = x.to(memory_format=torch.channels_last)
    y = layer(x_cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, EDGE_MODULES[name]().train(training)(x))
