"""bnbook.torch against torch.nn: parity in float64 to 1e-9 in every mode, gradients, state dicts, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.gradcheck import GradcheckError

import bnbook.torch as bt

TOL = dict(rtol=1e-9, atol=1e-9)
PAIRS = {
    (2,): (bt.BatchNorm1d, nn.BatchNorm1d, (16, 5)),
    (3,): (bt.BatchNorm1d, nn.BatchNorm1d, (8, 5, 7)),
    (4,): (bt.BatchNorm2d, nn.BatchNorm2d, (4, 5, 6, 3)),
    (5,): (bt.BatchNorm3d, nn.BatchNorm3d, (3, 5, 2, 4, 3)),
}
MODES = [
    {},
    {"momentum": None},
    {"momentum": 0.0},
    {"momentum": 1.0},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
]


def make_pair(dims, kwargs, dtype=torch.float64, seed=0):
    ours_cls, ref_cls, shape = PAIRS[dims]
    ours = ours_cls(5, dtype=dtype, **kwargs)
    ref = ref_cls(5, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in ref.named_parameters():  # random γ, β so that they matter
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    ours.load_state_dict(ref.state_dict())
    return ours, ref, shape


def assert_close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or TOL))


def run_step(ours, ref, x, dy):
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert_close(ya, yb)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(xa.grad, xb.grad)
    for (_name, pa), (_, pb) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-9)
    for (name, ba), (_, bb) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):
        assert ba.dtype == bb.dtype, name
        assert_close(ba, bb)


@pytest.mark.parametrize("dims", list(PAIRS))
@pytest.mark.parametrize(
    "kwargs", MODES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default"
)
def test_parity_train_then_eval(dims, kwargs):
    ours, ref, shape = make_pair(dims, kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):  # several steps: running statistics accumulate
        x = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64) + step
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        run_step(ours, ref, x, dy)
    ours.eval()
    ref.eval()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    run_step(ours, ref, x, torch.randn(shape, generator=gen, dtype=torch.float64))
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


@pytest.mark.parametrize("dims", list(PAIRS))
def test_running_statistics_values(dims):
    """The update rule itself: (1 − m)·running + m·batch with the unbiased variance."""
    ours, _, shape = make_pair(dims, {"momentum": 0.25})
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    ours(x)
    reduce = [0] + list(range(2, x.dim()))
    mean = x.mean(reduce)
    var = x.var(reduce, unbiased=True)
    assert_close(ours.running_mean, 0.25 * mean)
    assert_close(ours.running_var, 0.75 + 0.25 * var)
    assert int(ours.num_batches_tracked) == 1


def test_cumulative_average_with_momentum_none():
    bn = bt.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    xs = [torch.randn(10, 3, dtype=torch.float64) + i for i in range(5)]
    for x in xs:
        bn(x)
    assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    assert int(bn.num_batches_tracked) == 5


def test_eval_without_running_stats_uses_batch_statistics():
    bn = bt.BatchNorm1d(4, track_running_stats=False, dtype=torch.float64).eval()
    x = torch.randn(32, 4, dtype=torch.float64) * 5 + 2
    y = bn(x)
    assert_close(y.mean(0), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_functional_parity_all_modes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64) * 2 + 3
    w = torch.randn(4, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    for training in (True, False):
        for weight, bias in ((w, b), (None, None), (w, None), (None, b)):
            rm_a, rv_a = (
                torch.randn(4, dtype=torch.float64),
                torch.rand(4, dtype=torch.float64) + 0.5,
            )
            rm_b, rv_b = rm_a.clone(), rv_a.clone()
            ya = bt.batch_norm(x, rm_a, rv_a, weight, bias, training, 0.2, 1e-4)
            yb = F.batch_norm(x, rm_b, rv_b, weight, bias, training, 0.2, 1e-4)
            assert_close(ya, yb)
            assert_close(rm_a, rm_b)
            assert_close(rv_a, rv_b)
    # training without running statistics
    assert_close(bt.batch_norm(x, None, None, w, b, True), F.batch_norm(x, None, None, w, b, True))


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5), (3, 2, 3, 4), (2, 2, 2, 3, 2)])
def test_autograd_function_gradcheck(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: bt.BatchNormFunction.apply(x, w, b, 1e-5)[0], (x, w, b)
    )
    assert torch.autograd.gradcheck(
        lambda x: bt.BatchNormFunction.apply(x, None, None, 1e-5)[0], (x,)
    )


def test_eval_mode_gradcheck():
    bn = bt.BatchNorm2d(3, dtype=torch.float64)
    bn(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    bn.eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))


def test_a_wrong_backward_would_be_caught():
    """gradcheck has teeth: a backward that drops the Σ dy x̂ term fails it."""

    class Broken(bt.BatchNormFunction):
        @staticmethod
        def backward(ctx, dy, _a, _b):
            x_hat, mean, invstd, weight = ctx.saved_tensors
            return dy * invstd, None, None, None

    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x: Broken.apply(x, None, None, 1e-5)[0], (x,))


def test_state_dict_round_trips_both_ways():
    ours, ref, shape = make_pair((4,), {})
    for _ in range(3):
        ours(torch.randn(shape, dtype=torch.float64))
    fresh_ref = nn.BatchNorm2d(5, dtype=torch.float64)
    fresh_ref.load_state_dict(ours.state_dict())
    fresh_ours = bt.BatchNorm2d(5, dtype=torch.float64)
    fresh_ours.load_state_dict(fresh_ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ours.state_dict().items():
        assert_close(fresh_ours.state_dict()[key], value)
    # torch.save / torch.load of a model holding the twin
    buffer = io.BytesIO()
    torch.save(nn.Sequential(ours).state_dict(), buffer)
    buffer.seek(0)
    nn.Sequential(nn.BatchNorm2d(5, dtype=torch.float64)).load_state_dict(torch.load(buffer))


def test_old_state_dict_without_num_batches_tracked_loads():
    bn = bt.BatchNorm1d(3)
    state = bn.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 0


def test_parameters_buffers_and_deepcopy_match_torch():
    for kwargs in MODES:
        ours, ref = bt.BatchNorm2d(4, **kwargs), nn.BatchNorm2d(4, **kwargs)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
        assert (ours.bias is None) == (ref.bias is None)
        assert (ours.running_mean is None) == (ref.running_mean is None)
    clone = copy.deepcopy(bt.BatchNorm1d(3))
    assert isinstance(clone, bt.BatchNorm1d)


def test_reset_parameters_and_running_stats():
    bn = bt.BatchNorm1d(3)
    bn(torch.randn(5, 3) * 4 + 2)
    with torch.no_grad():
        bn.weight.fill_(3)
    bn.reset_parameters()
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    assert torch.equal(bn.weight, torch.ones(3))
    assert int(bn.num_batches_tracked) == 0


def test_input_is_not_mutated_and_noncontiguous_input_works():
    x = torch.randn(6, 4, 5, 3).transpose(2, 3)  # non-contiguous
    before = x.clone()
    y_ours = bt.BatchNorm2d(4)(x)
    y_ref = nn.BatchNorm2d(4)(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)


def test_float32_large_offset_still_normalises():
    """A two-pass variance: E[x²] − E[x]² would cancel catastrophically here (mean 1e4, std 0.1)."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(4096, 8), (64, 8, 16, 16)]:
        x = 1e4 + 0.1 * torch.randn(shape, generator=gen)
        y = bt.BatchNorm1d(8)(x) if len(shape) == 2 else bt.BatchNorm2d(8)(x)
        reduce = [0] + list(range(2, len(shape)))
        # with ε = 1e-5 and σ² = 0.01 the exact output std is sqrt(0.01 / 0.01001) = 0.9995
        torch.testing.assert_close(y.std(reduce), torch.full((8,), 0.9995), rtol=0, atol=2e-3)
        # the mean itself is only representable to half an ulp of 1e4 (4.9e-4), i.e. 4.9e-3 in units of σ
        torch.testing.assert_close(y.mean(reduce), torch.zeros(8), rtol=0, atol=6e-3)


def test_works_inside_a_model_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8, bias=False), bt.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)
    )
    x, target = torch.randn(64, 4), torch.randn(64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("block_elements", [1, 1 << 30], ids=["one-sample-blocks", "one-block"])
@pytest.mark.parametrize("dims", [(3,), (4,), (5,)])
def test_blocked_and_whole_tensor_paths_match_torch(monkeypatch, dims, block_elements):
    """The CPU's cache-blocked loop (one sample per block here) and the whole-tensor path that other
    devices take (one block) both give torch's results."""
    monkeypatch.setattr(bt, "_BLOCK_ELEMENTS", block_elements)
    ours, ref, shape = make_pair(dims, {})
    gen = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64) + 1
    run_step(ours, ref, x, torch.randn(shape, generator=gen, dtype=torch.float64))
    x = x.bfloat16()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours.float()(xa), ref.float()(xb)
    ya.float().sum().backward()
    yb.float().sum().backward()
    assert_close(ya.float(), yb.float(), rtol=1e-2, atol=1e-2)
    assert_close(xa.grad.float(), xb.grad.float(), rtol=1e-2, atol=1e-2)


def test_no_call_into_torch_batch_norm():
    """From scratch: neither torch's batch-norm functions nor its modules run inside the twins."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        for bn, x in [
            (bt.BatchNorm1d(3), torch.randn(6, 3)),
            (bt.BatchNorm2d(3), torch.randn(4, 3, 5, 5)),
        ]:
            x.requires_grad_()
            bn(x).sum().backward()
            bn(x.to(memory_format=torch.channels_last) if x.dim() == 4 else x)
            bn.eval()(x).sum().backward()
        F.batch_norm(
            x, None, None, training=True
        )  # the recorder sees torch's own when it is called
    assert "batch_norm" in record.names
    record.names.remove("batch_norm")
    assert not [n for n in record.names if "norm" in n], record.names


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("cls", "ref_cls", "bad_shape"),
    [
        (bt.BatchNorm1d, nn.BatchNorm1d, (2, 3, 4, 5)),
        (bt.BatchNorm1d, nn.BatchNorm1d, (3,)),
        (bt.BatchNorm2d, nn.BatchNorm2d, (2, 3, 4)),
        (bt.BatchNorm3d, nn.BatchNorm3d, (2, 3, 4, 5)),
    ],
)
def test_wrong_number_of_dimensions(cls, ref_cls, bad_shape):
    x = torch.randn(bad_shape)
    with pytest.raises(ValueError) as ref_err:
        ref_cls(3)(x)
    with pytest.raises(ValueError, match=r"expected .*D input") as err:
        cls(3)(x)
    assert str(ref_err.value).split(")")[0] in str(err.value)  # torch's own wording comes first
    assert str(tuple(bad_shape)).replace(",)", ")")[:-1] in str(err.value)  # the shape received


def test_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bt.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"\(1, 3, 1, 1\)"):
        bt.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    # a single image with spatial extent is fine, as in torch: per-sample statistics
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(bt.BatchNorm2d(3)(x), nn.BatchNorm2d(3)(x), rtol=1e-5, atol=1e-5)
    # and in eval mode a single sample is fine
    bt.BatchNorm1d(3).eval()(torch.randn(1, 3))


def test_channel_mismatch():
    with pytest.raises(RuntimeError, match=r"should contain 4 elements not 3"):
        bt.BatchNorm1d(3)(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"\(8, 4, 5, 5\)"):
        bt.BatchNorm2d(3)(torch.randn(8, 4, 5, 5))
    with pytest.raises(RuntimeError):
        bt.batch_norm(torch.randn(8, 4), None, None, torch.ones(3), None, training=True)


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        bt.BatchNorm1d(3, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        bt.batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        bt.BatchNorm2d(3, momentum=momentum)


def test_integer_input_is_rejected_not_cast():
    x = torch.randint(0, 5, (4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        bt.BatchNorm1d(3)(x)
    with pytest.raises(RuntimeError):  # the kind torch raises, too
        bt.BatchNorm1d(3)(x)


def test_eval_mode_needs_running_statistics():
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        bt.batch_norm(torch.randn(4, 3), None, None, training=False)
