"""bnbook.torch's twins on every device at hand, against torch.nn: parity, autocast, half-precision
input, channels_last, and the whole-tensor path off the CPU.

The CPU cases run everywhere (CPU autocast is bfloat16 or float16). The CUDA cases run where torch
sees a CUDA device and are skipped elsewhere, with the reason. References: torch.nn's modules for
dtypes, memory formats and running statistics; ``F.batch_norm`` in float64 on the CPU for values
(the "truth" that a half-precision result is rounded from).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import bnbook.torch as bt

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False); these cases run on a GPU machine",
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# (device, autocast dtype): CPU autocast exists for bfloat16 and float16, CUDA's for both too
AUTOCAST = [
    ("cpu", torch.bfloat16),
    ("cpu", torch.float16),
    pytest.param("cuda", torch.float16, marks=CUDA),
    pytest.param("cuda", torch.bfloat16, marks=CUDA),
]
PAIRS = {
    "1d-dense": (bt.BatchNorm1d, nn.BatchNorm1d, (64, 6)),
    "1d": (bt.BatchNorm1d, nn.BatchNorm1d, (8, 6, 10)),
    "2d": (bt.BatchNorm2d, nn.BatchNorm2d, (8, 6, 7, 5)),
    "3d": (bt.BatchNorm3d, nn.BatchNorm3d, (4, 6, 3, 4, 5)),
}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def make_pair(kind: str, device: str, dtype=torch.float32, seed: int = 0):
    """Our twin and torch's module with the same random γ, β (no ``bias=`` keyword: torch < 2.12
    lacks it, and the CUDA machine may run an older torch)."""
    ours_cls, ref_cls, shape = PAIRS[kind]
    ref = ref_cls(shape[1], device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(shape[1], generator=gen) + 1)
        ref.bias.copy_(torch.randn(shape[1], generator=gen))
    ours = ours_cls(shape[1], device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, shape


def draw(shape, device, dtype, seed=1, scale=3.0, offset=2.0):
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(shape, generator=gen, dtype=torch.float64) + offset
    return x.to(device=device, dtype=dtype)


def forward_backward(module, x, dy, autocast_dtype=None):
    """y, dx (autograd.grad, so the layout is the backward's own), dγ, dβ."""
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    if autocast_dtype is None:
        y = module(x)
    else:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            y = module(x)
    (dx,) = torch.autograd.grad(y, x, dy.to(y.dtype), retain_graph=True)
    y.backward(dy.to(y.dtype))
    return y.detach(), dx, module.weight.grad, module.bias.grad


def truth(x, weight, bias, dy, training=True, running=(None, None), eps=1e-5):
    """Float64 values on the CPU: y, dx, dγ, dβ of batch norm at exactly these inputs."""
    x = x.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double().requires_grad_()
    b = bias.detach().cpu().double().requires_grad_()
    rm, rv = (None if r is None else r.detach().cpu().double() for r in running)
    y = F.batch_norm(x, rm, rv, w, b, training, 0.0, eps)
    y.backward(dy.detach().cpu().double())
    return y.detach(), x.grad, w.grad, b.grad


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual.detach().cpu().double(), expected, **tol)


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", list(PAIRS))
def test_parity_with_torch(device, dtype, kind):
    """Training steps (running statistics accumulate), then evaluation: values, gradients, buffers."""
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    ours, ref, shape = make_pair(kind, device, dtype)
    for step in range(3):
        x = draw(shape, device, dtype, seed=step, offset=step)
        dy = draw(shape, device, dtype, seed=10 + step, scale=1.0, offset=0.0)
        for a, b in zip(forward_backward(ours, x, dy), forward_backward(ref, x, dy), strict=True):
            assert a.dtype == b.dtype and a.device == b.device
            torch.testing.assert_close(a, b, **tol)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **tol)
    ours.eval()
    ref.eval()
    x, dy = draw(shape, device, dtype, seed=20), draw(shape, device, dtype, seed=21)
    for a, b in zip(forward_backward(ours, x, dy), forward_backward(ref, x, dy), strict=True):
        torch.testing.assert_close(a, b, **tol)


# ---------------------------------------------------------------------------- autocast and half input


def half_tolerance(dtype):
    """One rounding of a float32 result to ``dtype``: half an ulp relative, with slack."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize(("device", "amp"), AUTOCAST)
@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("source", ["half", "float32"], ids=["half-input", "float32-input"])
def test_autocast_like_torch(device, amp, kind, training, source):
    """Under torch.autocast the twin gives torch's output dtype (the input's: batch_norm is on no
    autocast list), float32 statistics, and gradients of torch's dtypes, with values within one
    rounding of the float64 truth. Before the fix: ``linalg.vecdot: Expected x and y to have the
    same dtype``."""
    ours, ref, shape = make_pair(kind, device)
    if not training:
        for m in (ours, ref):
            m(draw(shape, device, torch.float32, seed=5))  # some running statistics
            m.eval()
    x = draw(shape, device, amp if source == "half" else torch.float32)
    dy = draw(shape, device, torch.float32, seed=2, scale=1.0, offset=0.0)
    got = forward_backward(ours, x, dy, autocast_dtype=amp)
    ref_out = forward_backward(ref, x, dy, autocast_dtype=amp)
    for a, b in zip(got, ref_out, strict=True):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
    y, dx, dw, db = got
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == db.dtype == torch.float32
    running = (None, None) if training else (ours.running_mean, ours.running_var)
    t_y, t_dx, t_dw, t_db = truth(x, ours.weight, ours.bias, dy.to(y.dtype), training, running)
    tol = half_tolerance(y.dtype) if y.dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    assert_close(y, t_y, **tol)
    assert_close(dx, t_dx, rtol=tol["rtol"], atol=tol["atol"] * float(t_dx.abs().max()))
    assert_close(dw, t_dw, rtol=1e-4, atol=1e-3)  # float32 sums of rounded products
    assert_close(db, t_db, rtol=1e-4, atol=1e-3)
    for name in ("running_mean", "running_var"):
        assert getattr(ours, name).dtype == torch.float32
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("device", "half"), AUTOCAST)
@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_input_into_float32_module(device, half, kind, training):
    """No autocast: a float16/bfloat16 input into a float32 module gives a half output and a half
    dx (as torch), float32 dγ and dβ, values within one rounding of the truth."""
    ours, ref, shape = make_pair(kind, device)
    if not training:
        for m in (ours, ref):
            m(draw(shape, device, torch.float32, seed=5))
            m.eval()
    x = draw(shape, device, half)
    dy = draw(shape, device, half, seed=2, scale=1.0, offset=0.0)
    got, ref_out = forward_backward(ours, x, dy), forward_backward(ref, x, dy)
    assert (
        [t.dtype for t in got] == [t.dtype for t in ref_out] == [half, half] + [torch.float32] * 2
    )
    running = (None, None) if training else (ours.running_mean, ours.running_var)
    t_y, t_dx, t_dw, t_db = truth(x, ours.weight, ours.bias, dy, training, running)
    tol = half_tolerance(half)
    y, dx, dw, db = got
    assert_close(y, t_y, **tol)
    assert_close(dx, t_dx, rtol=tol["rtol"], atol=tol["atol"] * float(t_dx.abs().max()))
    assert_close(dw, t_dw, rtol=1e-4, atol=1e-3)
    assert_close(db, t_db, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4096, 3), (16, 3, 32, 32)], ids=["dense", "spatial"])
def test_float16_statistics_accumulate_in_float32(device, shape):
    """Σx² here is ~1e9, far past float16's largest value (65504): a float16 accumulation gives
    inf or NaN; float32 accumulation gives the truth to one rounding."""
    x = draw(shape, device, torch.float16, scale=50.0, offset=200.0)
    dy = draw(shape, device, torch.float16, seed=2, scale=1.0, offset=0.0)
    bn = (bt.BatchNorm1d if len(shape) == 2 else bt.BatchNorm2d)(shape[1], device=device)
    y, dx, dw, db = forward_backward(bn, x, dy)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    t_y, t_dx, t_dw, t_db = truth(x, bn.weight, bn.bias, dy)
    assert_close(y, t_y, **half_tolerance(torch.float16))
    assert_close(dx, t_dx, rtol=2e-3, atol=2e-3 * float(t_dx.abs().max()))
    assert_close(dw, t_dw, rtol=1e-4, atol=1e-2)
    running_var = x.cpu().double().var((0, *range(2, x.dim()))) * 0.1 + 0.9
    assert_close(bn.running_var, running_var, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------- channels_last


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("dtype", "amp"),
    [(torch.float64, None), (torch.float32, None), (torch.bfloat16, torch.bfloat16)],
    ids=["float64", "float32", "bfloat16-autocast"],
)
def test_channels_last_is_preserved(device, kind, training, dtype, amp):
    """A channels_last (channels_last_3d) input gives a channels_last output and dx, as torch's."""
    ours, ref, shape = make_pair(
        kind, device, torch.float64 if dtype == torch.float64 else torch.float32
    )
    if not training:
        for m in (ours, ref):
            m(draw(shape, device, m.weight.dtype, seed=5))
            m.eval()
    fmt = CHANNELS_LAST[len(shape)]
    x = draw(shape, device, dtype).contiguous(memory_format=fmt)
    dy = draw(
        shape, device, dtype, seed=2, scale=1.0, offset=0.0
    )  # contiguous: dx must not copy it
    got, ref_out = forward_backward(ours, x, dy, amp), forward_backward(ref, x, dy, amp)
    for name, a, b in zip(("y", "dx"), got[:2], ref_out[:2], strict=True):
        assert b.is_contiguous(memory_format=fmt), f"torch's {name} is not {fmt} any more"
        assert a.is_contiguous(memory_format=fmt), f"{name} came back in another memory format"
        assert a.dtype == b.dtype
    tol = {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),  # two roundings apart at most
    }[dtype]
    for a, b in zip(got, ref_out, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


# ---------------------------------------------------------------------------- the path taken


class _CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _calls_per_step(device: str, n: int) -> int:
    bn = bt.BatchNorm2d(2, device=device)
    x = torch.ones(n, 2, 256, 256, device=device, requires_grad=True)
    with _CountCalls() as counter:
        bn(x).sum().backward()
    return counter.calls


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=CUDA)])
def test_whole_tensor_path_off_the_cpu(device):
    """Off the CPU the number of tensor operations does not grow with the batch: no cache-blocking
    loop launching tiny kernels (on CUDA it was 32–140× slower than cuDNN). The meta device, which
    computes shapes only, stands in for an accelerator where none is at hand."""
    assert _calls_per_step(device, 2) == _calls_per_step(device, 32)


def test_cpu_keeps_cache_blocking():
    """On the CPU the blocking pays (a block of temporaries stays in cache), so the loop stays:
    a batch 16× larger takes more operations."""
    assert _calls_per_step("cpu", 32) > _calls_per_step("cpu", 2)
