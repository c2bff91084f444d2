"""The batch-norm tests of PyTorch's ``test/test_nn.py``, ported to pytest and run on the twins with
``torch.nn`` (and ``F.batch_norm``) beside them as the control.

Each test carries the name of the one it ports. Every case is parametrised over [torch, twin]:
the same assertions must hold for both. The CUDA tests (cuDNN half precision, NHWC on CUDA, CPU
against CUDA) are written for CUDA and skipped without it. Not ported, because they test torch
internals that a from-scratch layer does not have: ``test_batch_norm_update_stats`` (the
``torch.batch_norm_update_stats`` kernel), the cuDNN/MIOpen backend selection tests, and the
``SyncBatchNorm`` conversion tests (SyncBatchNorm belongs to :mod:`bnbook.distributed`).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import bnbook.torch as bt

# torch 2.13 deprecates torch.jit.script; the tests below still check what it does with the twins.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False); these cases run on a GPU machine",
)
IMPLS = {
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, "F": F.batch_norm},
    "twin": {1: bt.BatchNorm1d, 2: bt.BatchNorm2d, 3: bt.BatchNorm3d, "F": bt.batch_norm},
}
impl = pytest.mark.parametrize("impl", [IMPLS["torch"], IMPLS["twin"]], ids=["torch", "twin"])


@impl
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bad", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_stat_or_param_is_not_same_size_as_input(impl, training, bad):
    """test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_input"""
    x = torch.rand(2, 10)
    args = {"running_mean": torch.rand(10), "running_var": torch.rand(10)}
    args["weight"], args["bias"] = torch.rand(10), torch.rand(10)
    for size in (9, 11):
        kwargs = dict(args, **{bad: torch.rand(size)})
        with pytest.raises(RuntimeError):
            impl["F"](
                x,
                kwargs["running_mean"],
                kwargs["running_var"],
                kwargs["weight"],
                kwargs["bias"],
                training=training,
            )


@impl
@pytest.mark.parametrize("dual_indices", [(0,), (1,), (1, 2), (0, 1), (0, 1, 2)])
def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(
    impl, dual_indices
):
    """With a tangent on the input, a tangent on a running statistic raises; without one on the
    input, nothing is differentiated forward and nothing raises."""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2), torch.randn(2), torch.randn(2))
    with fwAD.dual_level():
        duals = [
            fwAD.make_dual(a, torch.rand_like(a)) if i in dual_indices else a
            for i, a in enumerate(args)
        ]
        if 0 in dual_indices and (1 in dual_indices or 2 in dual_indices):
            with pytest.raises(
                RuntimeError, match="not differentiable wrt running_mean and running_var"
            ):
                impl["F"](*duals, training=False, momentum=-1.2)
        else:
            impl["F"](*duals, training=False, momentum=-1.2)


@impl
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(impl):
    x = torch.rand(1, 10, 1)
    with pytest.raises(ValueError):
        impl[1](10)(x)


@impl
def test_batchnorm_buffer_update_when_stats_are_not_tracked(impl):
    """Turning ``track_running_stats`` off after construction: training no longer updates the
    buffers, nor counts the batch."""
    bn = impl[1](10, momentum=None)
    bn.track_running_stats = False
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    tracked = bn.num_batches_tracked.clone()
    bn(torch.rand(10, 10))
    assert torch.equal(bn.running_mean, running_mean)
    assert torch.equal(bn.running_var, running_var)
    assert torch.equal(bn.num_batches_tracked, tracked)


@impl
def test_batchnorm_load_state_dict(impl):
    bn = impl[2](3)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(0)
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    empty = {}
    bn.load_state_dict(empty, strict=False)  # nothing to load: the count is kept
    assert bn.state_dict()["num_batches_tracked"] == torch.tensor(10)
    # on meta, the count is loaded as a real tensor
    with torch.device("meta"):
        meta_bn = impl[2](3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty, assign=True, strict=False)
    assert meta_bn.state_dict()["num_batches_tracked"] == torch.tensor(0)


@impl
def test_batchnorm_half_overflow(impl):
    """A (2, 2, 300, 300) float16 input: the float16 sum of squares would overflow."""
    torch.manual_seed(0)
    for affine in (True, False):
        bn_half = impl[2](2, affine=affine).half()
        bn_float = impl[2](2, affine=affine)
        x = torch.randn(2, 2, 300, 300) * 10
        y_half, y_float = bn_half(x.half()), bn_float(x)
        assert torch.isfinite(y_half).all()
        torch.testing.assert_close(y_half.float(), y_float, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(
            bn_half.running_var.float(), bn_float.running_var, rtol=1e-2, atol=1e-2
        )


@impl
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batchnorm_nhwc_cpu(impl, dtype):
    for n, c, h, w in [(4, 8, 5, 5), (2, 3, 7, 2)]:
        x = torch.randn(n, c, h, w).to(dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        x_ref = x.clone().requires_grad_()
        bn, ref = impl[2](c).to(dtype), impl[2](c).to(dtype)
        y_cl, y = bn(x_cl), ref(x_ref)
        g = torch.randn_like(y)
        y_cl.backward(g.contiguous(memory_format=torch.channels_last))
        y.backward(g)
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
        assert x_cl.grad.is_contiguous(memory_format=torch.channels_last)
        tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(y_cl, y, **tol)
        torch.testing.assert_close(x_cl.grad, x_ref.grad, **tol)


@impl
def test_batchnorm_non_contig_cpu(impl):
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)  # non-contiguous
    bn = impl[2](2).eval()
    bn.running_mean, bn.running_var = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 9.0])
    y = bn(x.contiguous().view(1, 2, 3, 1).transpose(2, 3).transpose(2, 3))
    assert y.shape == (1, 2, 3, 1)
    x = torch.randn(4, 3, 5, 6).transpose(2, 3)  # non-contiguous, not channels-last
    ref = nn.BatchNorm2d(3)
    torch.testing.assert_close(impl[2](3)(x), ref(x.contiguous()))


@impl
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_grad(impl, affine):
    """_test_batchnorm_grad: gradcheck and gradgradcheck through the module in training."""
    bn = impl[1](3, affine=affine).double()
    x = torch.rand(4, 3, 2, dtype=torch.double, requires_grad=True)
    params = tuple(bn.parameters())

    def fn(x, *p):
        return bn(x)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


@impl
@pytest.mark.parametrize("track", [True, False])
def test_batchnorm_eval(impl, track):
    """_test_batchnorm_eval: in eval mode two forwards agree, and so do their gradients."""
    bn = impl[1](3, track_running_stats=track).eval()
    x = torch.rand(4, 3, requires_grad=True)
    g = torch.rand(4, 3)
    y1 = bn(x)
    y1.backward(g)
    grad1 = x.grad.clone()
    x.grad = None
    y2 = bn(x)
    y2.backward(g)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(grad1, x.grad)
    # the same with a module that has seen a batch
    bn.train()
    bn(torch.rand(4, 3))
    bn.eval()
    torch.testing.assert_close(bn(x), bn(x))


@impl
def test_batchnorm_simple_average(impl):
    """momentum=None: the running statistics are the plain average of the batches' statistics."""
    torch.manual_seed(0)
    bn = impl[1](10, momentum=None)
    x1, x2 = torch.rand(16, 10), torch.rand(16, 10)
    ref = impl[1](10, momentum=None)
    ref(x1)
    mean1, var1 = ref.running_mean.clone(), ref.running_var.clone()
    ref.reset_running_stats()
    ref(x2)
    mean2, var2 = ref.running_mean.clone(), ref.running_var.clone()
    bn(x1)
    bn(x2)
    torch.testing.assert_close(bn.running_mean, (mean1 + mean2) / 2)
    torch.testing.assert_close(bn.running_var, (var1 + var2) / 2)
    bn.reset_running_stats()
    bn.momentum = 0.1
    bn(x1)
    assert int(bn.num_batches_tracked) == 1


@impl
def test_batchnorm_update_stats(impl):
    x = torch.rand(6, 4, 3)
    bn = impl[1](4, momentum=0.5)
    bn(x)
    mean = x.mean((0, 2))
    var = x.var((0, 2), unbiased=True)
    torch.testing.assert_close(bn.running_mean, 0.5 * mean)
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * var)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    before = bn.running_mean.clone()
    bn(x)  # eval: no update, no count
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 1


@impl
def test_batchnorm_large_batch(impl):
    """A batch larger than 65535 (a CUDA grid limit once) and a long spatial extent."""
    for shape, cls in [((70000, 3), impl[1]), ((2, 3, 70000), impl[1])]:
        x = torch.randn(shape)
        y = cls(3)(x)
        dims = (0,) if len(shape) == 2 else (0, 2)
        torch.testing.assert_close(y.mean(dims), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(y.var(dims, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


@impl
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm_empty(impl, dims):
    """_test_module_empty_input: N = 0 gives an empty output, zero parameter gradients, running
    statistics unchanged, and counts the batch."""
    shape = {1: (0, 5, 9), 2: (0, 5, 2, 2), 3: (0, 5, 2, 2, 2)}[dims]
    bn = impl[dims](5)
    x = torch.randn(shape, requires_grad=True)
    y = bn(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(bn.weight.grad, torch.zeros(5)) and torch.equal(bn.bias.grad, torch.zeros(5))
    assert torch.equal(bn.running_mean, torch.zeros(5)) and torch.equal(
        bn.running_var, torch.ones(5)
    )
    assert int(bn.num_batches_tracked) == 1
    assert bn.eval()(x).shape == shape
    assert impl["F"](x, None, None, training=True).shape == shape


@impl
def test_batchnorm_affine(impl):
    """affine=False has no parameters; bias=False has γ only."""
    assert [n for n, _ in impl[2](3, affine=False).named_parameters()] == []
    assert [n for n, _ in impl[2](3, bias=False).named_parameters()] == ["weight"]
    assert impl[2](3, bias=False).bias is None


@impl
def test_batchnorm_functional_running_stats_both_or_neither(impl):
    """F.batch_norm in training with only one running statistic raises ValueError."""
    with pytest.raises(ValueError, match="both be None or neither"):
        impl["F"](torch.randn(4, 3), torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="both be None or neither"):
        impl["F"](torch.randn(4, 3), None, torch.ones(3), training=True)


@impl
def test_batchnorm_state_dict_round_trip_through_torch_save(impl):
    bn = impl[2](3)
    bn(torch.randn(4, 3, 2, 2))
    buffer = io.BytesIO()
    torch.save(bn.state_dict(), buffer)
    buffer.seek(0)
    other = IMPLS["twin" if impl is IMPLS["torch"] else "torch"][2](3)
    other.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(other.running_mean, bn.running_mean)


@CUDA
@impl
def test_batchnorm_nhwc_cuda(impl):
    for dtype in (torch.half, torch.float):
        x = torch.randn(4, 8, 5, 5, device="cuda", dtype=dtype)
        bn = impl[2](8).cuda().to(dtype)
        ref = impl[2](8).cuda().to(dtype)
        y_cl = bn(x.contiguous(memory_format=torch.channels_last))
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y_cl, ref(x), atol=1e-2, rtol=1e-2)


@CUDA
@impl
def test_batchnorm_cudnn_half(impl):
    x = torch.randint(1, 10, (2, 3, 2, 2), dtype=torch.half, device="cuda").requires_grad_()
    bn = impl[2](3).cuda()  # float32 module, half input
    y = bn(x)
    assert y.dtype == torch.half
    y.sum().backward()
    ref_x = x.detach().float().requires_grad_()
    ref = impl[2](3).cuda()(ref_x)
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)


@CUDA
@impl
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_2D_vs_cpu(impl, training):
    """test_batchnorm_2D_train_NCHW_vs_cpu / _inference_NCHW_vs_cpu."""
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    x_gpu = x.detach().cuda().requires_grad_()
    bn_cpu, bn_gpu = impl[2](3).train(training), impl[2](3).cuda().train(training)
    y_cpu, y_gpu = bn_cpu(x), bn_gpu(x_gpu)
    g = torch.randn_like(y_cpu)
    y_cpu.backward(g)
    y_gpu.backward(g.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn_gpu.running_mean.cpu(), bn_cpu.running_mean)
