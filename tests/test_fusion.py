"""Tests of bnbook.fusion: folding an eval-mode batch norm into the layer before it."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnbook.fusion import fold_bn, fold_bn_into_conv, fold_bn_into_linear, inference_affine

DOUBLE = torch.float64


def _randomise_bn(bn: nn.Module, seed: int) -> nn.Module:
    """Give a batch norm non-trivial running statistics and affine parameters, then eval mode."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=DOUBLE) * 2)
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=DOUBLE) * 3 + 0.05)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=g, dtype=DOUBLE))
            bn.bias.copy_(torch.randn(c, generator=g, dtype=DOUBLE))
    return bn.eval()


def _bn(kind: str, c: int, seed: int = 0, **kwargs) -> nn.Module:
    cls = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[kind]
    return _randomise_bn(cls(c, dtype=DOUBLE, **kwargs), seed)


def _assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


# --- parity with torch.nn.utils.fusion, float64, 1e-9 ------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch_fuse_linear_bn_eval(bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 5, bias=bias, dtype=DOUBLE).eval()
    bn = _bn("1d", 5, seed=1)
    ours, ref = fold_bn_into_linear(lin, bn), fuse_linear_bn_eval(lin, bn)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=1e-9)
    x = torch.randn(11, 7, dtype=DOUBLE)
    torch.testing.assert_close(ours(x), bn(lin(x)), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("conv", "kind", "shape"),
    [
        (lambda b: nn.Conv1d(3, 6, 3, bias=b, dtype=DOUBLE), "1d", (4, 3, 9)),
        (
            lambda b: nn.Conv2d(3, 6, 3, padding=1, stride=2, bias=b, dtype=DOUBLE),
            "2d",
            (4, 3, 8, 8),
        ),
        (
            lambda b: nn.Conv2d(4, 6, 3, groups=2, dilation=2, bias=b, dtype=DOUBLE),
            "2d",
            (2, 4, 9, 9),
        ),
        (lambda b: nn.Conv3d(2, 6, 2, bias=b, dtype=DOUBLE), "3d", (2, 2, 4, 4, 4)),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_torch_fuse_conv_bn_eval(conv, kind, shape, bias):
    torch.manual_seed(0)
    layer = conv(bias).eval()
    bn = _bn(kind, 6, seed=2)
    ours, ref = fold_bn_into_conv(layer, bn), fuse_conv_bn_eval(layer, bn)
    assert type(ours) is type(layer)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=1e-9)
    x = torch.randn(*shape, dtype=DOUBLE)
    torch.testing.assert_close(ours(x), bn(layer(x)), rtol=0, atol=1e-9)


def test_affine_false_batch_norm_folds():
    # torch's fuse_linear_bn_weights multiplies by bn.weight and cannot take affine=False
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, dtype=DOUBLE)
    bn = _bn("1d", 3, affine=False)
    x = torch.randn(8, 4, dtype=DOUBLE)
    torch.testing.assert_close(fold_bn_into_linear(lin, bn)(x), bn(lin(x)), rtol=0, atol=1e-12)


def test_inference_affine_is_the_eval_map():
    bn = _bn("2d", 5, seed=3)
    scale, shift = inference_affine(bn)
    x = torch.randn(3, 5, 4, 4, dtype=DOUBLE)
    expected = scale[None, :, None, None] * x + shift[None, :, None, None]
    torch.testing.assert_close(bn(x), expected, rtol=0, atol=1e-12)


def test_inference_affine_uses_eps():
    bn = nn.BatchNorm1d(2, eps=0.5, dtype=DOUBLE).eval()
    scale, shift = inference_affine(bn)
    torch.testing.assert_close(scale, torch.full((2,), 1.5**-0.5, dtype=DOUBLE))
    torch.testing.assert_close(shift, torch.zeros(2, dtype=DOUBLE))


# --- dtype, gradients, no mutation ------------------------------------------------------------


def test_float32_fold_is_computed_in_double():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    bn = _randomise_bn(nn.BatchNorm1d(32), seed=4)
    with torch.no_grad():
        bn.running_var.mul_(1e-3)  # large scales magnify rounding
    ours = fold_bn_into_linear(lin, bn)
    assert ours.weight.dtype == torch.float32 and ours.bias.dtype == torch.float32
    # the same float32 values, folded in float64: the exact answer to ~1e-16
    ref = fold_bn_into_linear(copy.deepcopy(lin).double(), copy.deepcopy(bn).double())
    # one float32 rounding of the exact value: relative error at most 2**-24
    rel = ((ours.weight.double() - ref.weight).abs() / ref.weight.abs()).max()
    assert rel <= 2.0**-24 * (1 + 1e-6), rel


def test_requires_grad_and_gradients_flow():
    lin = nn.Linear(4, 3, bias=False, dtype=DOUBLE)
    folded = fold_bn_into_linear(lin, _bn("1d", 3))
    assert folded.weight.requires_grad and folded.bias.requires_grad
    folded(torch.randn(2, 4, dtype=DOUBLE)).sum().backward()
    assert folded.weight.grad is not None and folded.bias.grad is not None
    frozen = nn.Linear(4, 3, dtype=DOUBLE).requires_grad_(False)
    out = fold_bn_into_linear(frozen, _bn("1d", 3))
    assert not out.weight.requires_grad and not out.bias.requires_grad


def test_inputs_are_not_mutated():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, bias=False, dtype=DOUBLE)
    bn = _bn("2d", 3)
    conv_before, bn_before = (
        {k: v.clone() for k, v in conv.state_dict().items()},
        {k: v.clone() for k, v in bn.state_dict().items()},
    )
    folded = fold_bn_into_conv(conv, bn)
    assert folded is not conv and conv.bias is None
    for k, v in conv.state_dict().items():
        torch.testing.assert_close(v, conv_before[k], rtol=0, atol=0)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, bn_before[k], rtol=0, atol=0)


# --- fold_bn over a whole model -----------------------------------------------------------------


def _mlp() -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(6, 8, bias=False),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).double()
    for i in (1, 4):
        _randomise_bn(model[i], seed=i)
    return model.eval()


def test_fold_bn_mlp_same_function_and_no_batch_norm_left():
    torch.manual_seed(0)
    model = _mlp()
    folded = fold_bn(model)
    assert [type(m).__name__ for m in folded] == [
        "Linear",
        "Identity",
        "ReLU",
        "Linear",
        "Identity",
        "Tanh",
        "Linear",
    ]
    x = torch.randn(16, 6, dtype=DOUBLE)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-9)
    # the original is untouched
    assert isinstance(model[1], nn.BatchNorm1d) and model[0].bias is None
    # and the folded layers match torch's own fusion
    ref = fuse_linear_bn_eval(model[3], model[4])
    torch.testing.assert_close(folded[3].weight, ref.weight, rtol=0, atol=1e-9)


def test_fold_bn_cnn_nested_sequential():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(
        block,
        nn.Sequential(nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    ).double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomise_bn(m, seed=m.num_features)
    model.eval()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(3, 1, 6, 6, dtype=DOUBLE)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-9)


def test_fold_bn_leaves_batch_norm_without_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    model.eval()
    folded = fold_bn(model)
    assert isinstance(folded[1], nn.BatchNorm1d)
    x = torch.randn(5, 3, dtype=DOUBLE)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_fold_bn_ignores_batch_norm_not_after_linear_or_conv():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4)).double()
    _randomise_bn(model[2], 0)
    model.eval()
    folded = fold_bn(model)
    assert isinstance(folded[2], nn.BatchNorm1d)


# --- errors -------------------------------------------------------------------------------------


def test_training_mode_raises():
    lin, bn = nn.Linear(3, 4), nn.BatchNorm1d(4)  # a fresh BN is in training mode
    with pytest.raises(RuntimeError, match="training mode"):
        fold_bn_into_linear(lin, bn)
    with pytest.raises(RuntimeError, match="training mode"):
        fold_bn(nn.Sequential(lin, bn))


def test_no_running_stats_raises():
    bn = nn.BatchNorm1d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_bn_into_linear(nn.Linear(3, 4), bn)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        inference_affine(bn)


def test_feature_mismatch_raises():
    with pytest.raises(ValueError, match=r"linear.out_features = 4, got 5"):
        fold_bn_into_linear(nn.Linear(3, 4), nn.BatchNorm1d(5).eval())
    with pytest.raises(ValueError, match=r"conv.out_channels = 4, got 3"):
        fold_bn_into_conv(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(3).eval())


def test_wrong_types_raise():
    with pytest.raises(TypeError, match="nn.Linear"):
        fold_bn_into_linear(nn.Conv1d(1, 2, 1), nn.BatchNorm1d(2).eval())
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        fold_bn_into_conv(nn.ConvTranspose2d(1, 2, 3), nn.BatchNorm2d(2).eval())
    with pytest.raises(TypeError, match="batch-norm layer"):
        fold_bn_into_linear(nn.Linear(2, 2), nn.LayerNorm(2))
    with pytest.raises(TypeError, match="nn.Sequential"):
        fold_bn(nn.Linear(2, 2))


def test_uninitialised_lazy_batch_norm_raises():
    bn = nn.LazyBatchNorm1d().eval()
    with pytest.raises(ValueError, match="not initialised"):
        inference_affine(bn)


def test_bnbook_torch_twins_fold_like_torch():
    bt = pytest.importorskip("bnbook.torch")
    if not hasattr(bt, "BatchNorm2d"):
        pytest.skip("bnbook.torch has no BatchNorm2d yet")
    torch.manual_seed(0)
    ours_bn = bt.BatchNorm2d(3, dtype=DOUBLE)
    ref_bn = _bn("2d", 3, seed=5)
    ours_bn.load_state_dict(ref_bn.state_dict())
    ours_bn.eval()
    conv = nn.Conv2d(2, 3, 3, dtype=DOUBLE).eval()
    torch.testing.assert_close(
        fold_bn_into_conv(conv, ours_bn).weight,
        fuse_conv_bn_eval(conv, ref_bn).weight,
        atol=1e-9,
        rtol=0,
    )


# --- property: folding is exact in exact arithmetic, so float64 agrees to rounding -------------


@settings(max_examples=40, deadline=None)
@given(
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    batch=st.integers(1, 5),
    bias=st.booleans(),
    affine=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_property_folded_linear_equals_bn_of_linear(n_in, n_out, batch, bias, affine, eps, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias, dtype=DOUBLE)
    bn = _randomise_bn(nn.BatchNorm1d(n_out, eps=eps, affine=affine, dtype=DOUBLE), seed)
    x = torch.randn(batch, n_in, dtype=DOUBLE)
    torch.testing.assert_close(fold_bn_into_linear(lin, bn)(x), bn(lin(x)), rtol=1e-10, atol=1e-10)


def test_is_batch_norm_goes_by_type_not_by_name():
    from bnbook.fusion import is_batch_norm
    from bnbook.norms import InstanceNorm2d
    from bnbook.small_batch import BatchLayerNorm, GhostBatchNorm2d

    class BatchNorm2d(nn.Module):  # the name of a batch norm, and its buffers, but not the type
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))
            self.momentum = 0.1

    assert not is_batch_norm(BatchNorm2d())
    assert is_batch_norm(GhostBatchNorm2d(3, ghost_batch_size=2))  # no "BatchNorm2d" in its name
    assert is_batch_norm(InstanceNorm2d(3, track_running_stats=True))
    assert not is_batch_norm(InstanceNorm2d(3))  # no running statistics: no fixed map
    assert not is_batch_norm(BatchLayerNorm(3, batch_size=4))  # evaluation is not one affine map
    conv = nn.Conv2d(1, 3, 3)
    folded = fold_bn(nn.Sequential(conv, GhostBatchNorm2d(3, ghost_batch_size=2)).eval())
    assert isinstance(folded[1], nn.Identity)
