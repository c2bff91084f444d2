"""PyTorch's generic module tests (``test/test_modules.py``) over its own ``module_db`` entries for
BatchNorm1d/2d/3d, run on the twins with ``torch.nn`` beside them as the control.

The inputs are torch's: ``module_db``'s ``module_inputs_func`` and ``module_error_inputs_func`` for
each class (affine, not affine, momentum, cumulative average, not tracking statistics, zero batch,
``bias=False``; ``eps`` 0 and negative as errors), called with torch's ``ModuleInfo`` and
instantiated with either class. Each test below is a port of the test of the same name, written
for pytest (parametrised over [torch.nn class, twin] and training/evaluation); where torch's
version needs CUDA, the port is skipped without it. Not ported, because they cannot apply to a
module of this package: ``test_check_inplace`` (BatchNorm has no ``inplace`` argument, so torch
selects no BatchNorm entry either) and the lazy-module branches (the twins are not lazy).
Sizes are torch's own, all small: the whole file runs in a few seconds.
"""

from __future__ import annotations

import io
from copy import deepcopy
from functools import partial
from itertools import product

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

import bnbook.torch as bt

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False); these cases run on a GPU machine",
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TWINS = {
    nn.BatchNorm1d: bt.BatchNorm1d,
    nn.BatchNorm2d: bt.BatchNorm2d,
    nn.BatchNorm3d: bt.BatchNorm3d,
}
INFOS = {info.module_cls: info for info in module_db if info.module_cls in TWINS}
CASES = [
    pytest.param(
        info, cls, id=f"{info.module_cls.__name__}-{'twin' if cls in TWINS.values() else 'torch'}"
    )
    for info in INFOS.values()
    for cls in (info.module_cls, TWINS[info.module_cls])
]
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def test_module_db_has_every_batch_norm():
    assert set(INFOS) == set(TWINS)
    assert all(info.train_and_eval_differ for info in INFOS.values())


def inputs(info, device="cpu", dtype=torch.float32, requires_grad=False, training=True):
    return info.module_inputs_func(
        info, device=device, dtype=dtype, requires_grad=requires_grad, training=training
    )


def control_subset(cls, module_inputs):
    """Every input for a twin; every third for ``torch.nn`` in the slow tests (gradients, layouts).

    The control shows that a test passes on torch's own layer; torch's batch-norm kernels fall
    back to a slow per-sample loop for gradcheck's batched gradients, and all inputs for the
    control would take most of the unit suite's time budget.
    """
    return module_inputs if cls in TWINS.values() else module_inputs[::3]


def build(cls, module_input, device="cpu", dtype=torch.float32, training=True):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    m = cls(*args, **kwargs).to(device).to(dtype)
    return m.train(training)


def forward_args(module_input):
    return module_input.forward_input.args, module_input.forward_input.kwargs


def assert_placed(module, device, dtype):
    device = torch.device(device)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device == device, name
        if t.dtype.is_floating_point:
            assert t.dtype == dtype, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward(info, cls, training, dtype, device):
    for module_input in inputs(info, device, dtype, training=training):
        m = build(cls, module_input, device, dtype, training)
        args, kwargs = forward_args(module_input)
        out = m(*args, **kwargs)
        assert out.shape == args[0].shape and out.dtype == dtype
        # .float() / .double() move every floating parameter and buffer
        (m.float() if dtype == torch.float32 else m.double())(*args, **kwargs)
        assert_placed(m, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_factory_kwargs(info, cls, training, device):
    for module_input in inputs(info, device, torch.float64, training=training):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m = cls(*args, **kwargs, device=device, dtype=torch.float64).train(training)
        assert_placed(m, device, torch.float64)


@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_repr(info, cls, training):
    for module_input in inputs(info, training=training):
        m = build(cls, module_input, training=training)
        ref = build(info.module_cls, module_input, training=training)
        assert str(m) == repr(m)
        assert repr(m).split("(", 1)[1] == repr(ref).split("(", 1)[1]  # same arguments shown


@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_pickle(info, cls, training):
    for module_input in inputs(info, training=training):
        torch.manual_seed(0)
        m = build(cls, module_input, training=training)
        args, kwargs = forward_args(module_input)
        out = m(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        copy = torch.load(buffer, weights_only=False)
        assert type(copy) is cls
        # the copy carries the running statistics the forward just updated
        torch.testing.assert_close(
            copy(*args, **kwargs), out if not training else copy(*args, **kwargs)
        )
        if not training:
            torch.testing.assert_close(copy(*args, **kwargs), out)


def _non_contiguous(t):
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_non_contiguous_tensors(info, cls, training):
    module_inputs = inputs(info, requires_grad=True, training=training)
    for module_input in control_subset(cls, module_inputs):
        (x,), _ = forward_args(module_input)
        m = build(cls, module_input, training=training)
        torch.manual_seed(0)
        reference = m(x)
        g = torch.randn_like(reference)
        results = []
        for inp, grad in product([x, _non_contiguous(x)], [g, _non_contiguous(g)]):
            inp = inp.detach().requires_grad_()
            m.zero_grad(set_to_none=True)
            out = m(inp)
            out.backward(grad)
            results.append((out, inp.grad, [p.grad for p in m.parameters()]))
        out0, dx0, dp0 = results[0]
        for out, dx, dp in results[1:]:
            torch.testing.assert_close(out, out0)
            torch.testing.assert_close(dx, dx0, atol=1e-4, rtol=0)
            for a, b in zip(dp, dp0, strict=True):
                torch.testing.assert_close(a, b)


def _gradients(info, cls, training, check):
    """Port of ``_test_gradients_helper``: the total derivative, then each parameter alone."""
    module_inputs = inputs(info, dtype=torch.float64, requires_grad=True, training=training)
    for module_input in control_subset(cls, module_inputs):
        m = build(cls, module_input, dtype=torch.float64, training=training)
        (x,), _ = forward_args(module_input)
        params = tuple(m.parameters())

        def fn(x, *ps, m=m):
            return m(x)

        assert check(fn, (x, *params))
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        for p, old in zip(params, saved, strict=True):
            p.requires_grad_(old)
            assert check(fn, (x, *params))
            p.requires_grad_(False)
        for p, old in zip(params, saved, strict=True):
            p.requires_grad_(old)


@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_grad(info, cls, training):
    """torch's gradcheck with its test-suite defaults (batched gradients included), in fast mode
    (random projections instead of full Jacobians: the file's time budget)."""
    _gradients(info, cls, training, partial(gradcheck, fast_mode=True))


@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_gradgrad(info, cls, training):
    """Second derivatives: failed on the twins while their backward was ``once_differentiable``."""
    _gradients(info, cls, training, partial(gradgradcheck, fast_mode=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_memory_format(info, cls, training, device):
    module_inputs = inputs(info, device, requires_grad=True, training=training)
    for module_input in control_subset(cls, module_inputs):
        (x,), _ = forward_args(module_input)
        formats = {4: torch.channels_last, 5: torch.channels_last_3d}
        input_formats = [torch.contiguous_format]
        module_formats = [torch.preserve_format, torch.contiguous_format]
        if x.dim() in formats:
            input_formats.append(formats[x.dim()])
            module_formats.append(formats[x.dim()])
        m = build(cls, module_input, device, training=training)
        state = deepcopy(m.state_dict())
        desired = m(x)
        g = torch.rand_like(desired)
        params = [p for p in m.parameters() if p.requires_grad]
        ref_grads = torch.autograd.grad(desired, [x, *params], g) if training else None
        for in_format, mod_format in product(input_formats, module_formats):
            m.load_state_dict(state)  # the same running statistics for every layout
            m.to(memory_format=mod_format)
            inp = x.detach().clone().to(memory_format=in_format).requires_grad_()
            out = m(inp)
            torch.testing.assert_close(out, desired)
            layout = in_format if in_format != torch.contiguous_format else None
            assert out.is_contiguous(memory_format=layout or torch.contiguous_format)
            if training:
                grads = torch.autograd.grad(out, [inp, *params], torch.empty_like(out).copy_(g))
                for a, b in zip(grads, ref_grads, strict=True):
                    torch.testing.assert_close(a, b)
                assert grads[0].is_contiguous(memory_format=layout or torch.contiguous_format)


@pytest.mark.parametrize(("info", "cls"), CASES)
def test_if_train_and_eval_modes_differ(info, cls):
    """Without a ``training`` attribute the forward raises AttributeError naming it."""
    for module_input in inputs(info):
        m = build(cls, module_input)
        delattr(m, "training")
        args, kwargs = forward_args(module_input)
        with pytest.raises(AttributeError, match="'training'"):
            m(*args, **kwargs)


@pytest.mark.parametrize(("info", "cls"), CASES)
def test_device_ctx_init(info, cls):
    """Built under ``torch.device('meta')``: meta parameters and buffers, shapes and dtypes as on
    the CPU."""
    for module_input in inputs(info):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        m_cpu = cls(*args, **kwargs)
        with torch.device("meta"):
            m = cls(*args, **kwargs)
        pairs = [
            *zip(m.parameters(), m_cpu.parameters(), strict=True),
            *zip(m.buffers(), m_cpu.buffers(), strict=True),
        ]
        assert pairs
        for meta, cpu in pairs:
            assert meta.is_meta
            assert (meta.shape, meta.dtype, meta.requires_grad) == (
                cpu.shape,
                cpu.dtype,
                cpu.requires_grad,
            )


@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_errors(info, cls, training):
    """torch's error inputs: ``eps`` = 0 and ``eps`` < 0 are accepted by the constructor and
    rejected by a training forward with "eps must be positive"."""
    for error_input in info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=training
    ):
        module_input = error_input.module_error_input
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        assert error_input.error_on == ModuleErrorEnum.FORWARD_ERROR
        m = cls(*args, **kwargs)  # the constructor accepts it, as torch's does
        fw_args, fw_kwargs = forward_args(module_input)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            m(*fw_args, **fw_kwargs)


@pytest.mark.parametrize(("info", "cls"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to(info, cls, dtype):
    """``.to(dtype)`` moves parameters and buffers (``num_batches_tracked`` stays long), keeping
    parameters as the same leaf objects, and the module still trains."""
    for module_input in inputs(info):
        m = build(cls, module_input)
        params = list(m.parameters())
        m.to(dtype)
        assert_placed(m, "cpu", dtype)
        assert [id(p) for p in m.parameters()] == [id(p) for p in params]
        if m.num_batches_tracked is not None:
            assert m.num_batches_tracked.dtype == torch.long
        (x,), _ = forward_args(module_input)
        assert m(x.to(dtype)).dtype == dtype


@pytest.mark.parametrize(("info", "cls"), CASES)
def test_to_empty(info, cls):
    """Built on meta, then ``to_empty`` and ``reset_parameters``: the module of a CPU build."""
    for module_input in inputs(info):
        args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
        with torch.device("meta"):
            m = cls(*args, **kwargs)
        m.to_empty(device="cpu")
        m.reset_parameters()
        ref = cls(*args, **kwargs)
        assert_placed(m, "cpu", torch.float32)
        for (name, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
        (x,), _ = forward_args(module_input)
        torch.testing.assert_close(m(x), ref(x))


@CUDA
@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
def test_multiple_device_transfer(info, cls, training):
    for gpu_input, cpu_input in zip(
        inputs(info, "cuda", training=training), inputs(info, "cpu", training=training), strict=True
    ):
        m = build(cls, gpu_input, "cuda", training=training)
        m(*gpu_input.forward_input.args)
        assert_placed(m, "cuda:0", torch.float32)
        m.cpu()
        m(*cpu_input.forward_input.args)
        assert_placed(m, "cpu", torch.float32)
        m.cuda()
        m(*gpu_input.forward_input.args)
        assert_placed(m, "cuda:0", torch.float32)


@CUDA
@pytest.mark.parametrize(("info", "cls"), CASES)
@TRAINING
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_gpu_parity(info, cls, training, dtype):
    tol = {torch.float32: dict(atol=5e-2, rtol=0), torch.float64: dict(atol=4e-4, rtol=0)}[dtype]
    for module_input in inputs(info, "cpu", dtype, requires_grad=True, training=training):
        (x,), _ = forward_args(module_input)
        x_gpu = x.detach().cuda().requires_grad_()
        m_cpu = build(cls, module_input, "cpu", dtype, training)
        m_gpu = build(cls, module_input, "cuda", dtype, training)
        out_cpu, out_gpu = m_cpu(x), m_gpu(x_gpu)
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, **tol)
        g = torch.randn_like(out_cpu)
        out_cpu.backward(g)
        out_gpu.backward(g.cuda())
        torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, **tol)
        for a, b in zip(m_cpu.parameters(), m_gpu.parameters(), strict=True):
            torch.testing.assert_close(b.grad.cpu(), a.grad, **tol)
