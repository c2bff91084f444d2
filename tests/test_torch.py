"""bnbook.torch against torch.nn: parity in float64 to 1e-9 in every mode, gradients, state dicts, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.autograd.gradcheck import GradcheckError

import bnbook.autograd
import bnbook.torch as bt

# torch 2.13 deprecates torch.jit.script, which torch itself still calls inside compile and
# forward-mode AD; the tests below check the twins, not that.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

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


def test_float32_large_offset_dense_blas_paths():
    """Dense batches large enough for the float32 BLAS sums and the residual correction (2¹⁷ and
    2²⁰ elements) normalise values far from zero as accurately as a float64 reference."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(1024, 128), (2048, 512)]:
        x = (1e4 + 0.1 * torch.randn(shape, generator=gen)).requires_grad_()
        dy = torch.randn(shape, generator=gen)
        bn = bt.BatchNorm1d(shape[1])
        y = bn(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        x64 = x.detach().double().requires_grad_()
        y64 = F.batch_norm(x64, None, None, training=True)
        (dx64,) = torch.autograd.grad(y64, x64, dy.double())
        torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-3)
        torch.testing.assert_close(dx.double(), dx64, rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(bn.running_mean.double(), 0.1 * x64.detach().mean(0))


def test_float32_large_offset_spatial_path_keeps_the_mean_correction():
    """On a feature map (the blocked (N, C, L) path) the correction of the float32 mean reaches
    the output: y = (x − μ₁)·a + (β − r·a). Subtracting the corrected mean rounded to float32
    instead would leave errors of about 0.01 here (σ = 0.01, one ulp of 1e4 is 9.8e-4)."""
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 0.01 * torch.randn(16, 8, 32, 32, generator=gen)).requires_grad_()
    dy = torch.randn(x.shape, generator=gen)
    y = bt.BatchNorm2d(8)(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = F.batch_norm(x64, None, None, training=True)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-5)
    # dx is of order 1/σ = 100; torch's own float32 kernel is off by 1.3e-4 of its largest value
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=1e-3 * dx64.abs().max().item())


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
    monkeypatch.setattr(bnbook.autograd, "_BLOCK_ELEMENTS", block_elements)
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


@pytest.mark.parametrize("shape", [(6, 3), (1024, 256)], ids=["small", "blas-sums"])
def test_whole_tensor_path_on_dense_input_matches_torch(monkeypatch, shape):
    """The whole-tensor path (other devices, ``torch.compile``, ``torch.func``) on a dense input,
    including the large (M, C) table whose per-channel sums BLAS computes."""
    monkeypatch.setattr(bnbook.autograd, "_whole_tensor", lambda x: True)
    ours, ref = bt.BatchNorm1d(shape[1]).double(), nn.BatchNorm1d(shape[1]).double()
    gen = torch.Generator().manual_seed(5)
    x = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64) + 2
    run_step(ours, ref, x, torch.randn(shape, generator=gen, dtype=torch.float64))


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
    """As torch: the constructor accepts any number; a training forward needs eps > 0, an
    evaluation forward eps ≥ 0."""
    bn = bt.BatchNorm1d(3, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn(torch.randn(4, 3))
    with pytest.raises(ValueError, match="eps must be positive"):
        bt.batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)
    if eps != 0:
        with pytest.raises(ValueError, match="eps must be non-negative"):
            bn.eval()(torch.randn(4, 3))
    else:
        bn.eval()(torch.randn(4, 3))
    with pytest.raises(TypeError, match="eps"):
        bt.BatchNorm1d(3, eps="small")


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        bt.BatchNorm2d(3, momentum=momentum)


def test_integer_input_is_rejected_not_cast():
    x = torch.randint(0, 5, (4, 3))
    with pytest.raises(NotImplementedError):  # torch's type
        nn.BatchNorm1d(3)(x)
    # as torch: a NotImplementedError, not only a TypeError
    with pytest.raises(NotImplementedError, match="floating-point"):
        bt.BatchNorm1d(3)(x)
    with pytest.raises(TypeError):  # and still a TypeError
        bt.BatchNorm1d(3).eval()(x)


def test_eval_mode_needs_running_statistics():
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        bt.batch_norm(torch.randn(4, 3), None, None, training=False)


# ------------------------------------------------------------------------------ a true drop-in


def _pair(cls_o, cls_t, *args, **kwargs):
    return cls_o(*args, **kwargs), cls_t(*args, **kwargs)


def test_constructor_is_as_lenient_as_torch():
    """NumPy scalars, a 0-dim tensor momentum, eps = 0 and num_features = 0 construct, as in torch;
    what torch rejects is rejected with the argument named."""
    np = pytest.importorskip("numpy")
    for kwargs in [
        {"num_features": np.int64(3), "eps": np.float32(1e-3), "momentum": np.float64(0.2)},
        {"num_features": 3, "momentum": torch.tensor(0.2)},
        {"num_features": 3, "eps": 0.0},
    ]:
        ours, ref = _pair(bt.BatchNorm1d, nn.BatchNorm1d, **kwargs)
        x = torch.randn(6, 3)
        if kwargs.get("eps", 1) != 0.0:
            torch.testing.assert_close(ours(x), ref(x))
            torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert bt.BatchNorm1d(0).weight.shape == (0,)
    for bad, kind in [(3.0, TypeError), ("3", TypeError), (True, TypeError), (-1, ValueError)]:
        with pytest.raises(kind, match="num_features"):
            bt.BatchNorm1d(bad)
    with pytest.raises(TypeError, match="momentum"):
        bt.BatchNorm1d(3, momentum="fast")


def test_no_affine_no_tracking_normalises_any_channel_count():
    ours, ref = _pair(bt.BatchNorm2d, nn.BatchNorm2d, 5, affine=False, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert_close(ours.double()(x), ref.double()(x))
    with pytest.raises(RuntimeError, match="should contain 3 elements not 5"):
        bt.BatchNorm2d(5, track_running_stats=False)(x)


def test_second_derivatives_hessian_and_gradient_penalty():
    """Issue 13: once_differentiable made the Hessian all zeros and dropped a gradient penalty."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    hessians = [
        torch.autograd.functional.hessian(
            lambda x, f=f: (f(x, None, None, w, b, True) ** 3).sum(), x
        )
        for f in (bt.batch_norm, F.batch_norm)
    ]
    assert hessians[1].abs().max() > 0.1
    assert_close(hessians[0], hessians[1])
    penalties = []
    for f in (bt.batch_norm, F.batch_norm):
        (dx,) = torch.autograd.grad((f(x, None, None, w, b, True) ** 3).sum(), x, create_graph=True)
        penalty = (dx**2).sum()
        penalties.append(torch.autograd.grad(penalty, (x, w, b)))
    for ours, ref in zip(*penalties, strict=True):
        assert_close(ours, ref)


def test_torch_func_transforms_and_batched_gradients():
    from torch.func import grad, jacrev, jvp, vmap

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    ours = lambda x: bt.batch_norm(x, None, None, w, None, True)  # noqa: E731
    ref = lambda x: F.batch_norm(x, None, None, w, None, True)  # noqa: E731
    xs = torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64)
    assert_close(vmap(ours)(xs), vmap(ref)(xs))
    assert_close(grad(lambda x: (ours(x) ** 2).sum())(x), grad(lambda x: (ref(x) ** 2).sum())(x))
    assert_close(jacrev(ours)(x), jacrev(ref)(x))
    v = torch.randn_like(x)
    assert_close(jvp(ours, (x,), (v,))[1], jvp(ref, (x,), (v,))[1])
    # is_grads_batched, and gradcheck's batched-gradient and forward-AD checks
    grads = torch.randn(3, *x.shape, generator=gen, dtype=torch.float64)
    (ga,) = torch.autograd.grad(ours(x), x, grads, is_grads_batched=True)
    (gb,) = torch.autograd.grad(ref(x), x, grads, is_grads_batched=True)
    assert_close(ga, gb)
    assert torch.autograd.gradcheck(
        ours, (x,), check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True
    )


def test_forward_mode_ad_in_training_matches_torch():
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 3, 4, dtype=torch.float64)
    ours, ref = _pair(bt.BatchNorm1d, nn.BatchNorm1d, 3, dtype=torch.float64)
    with fwAD.dual_level():
        ya = fwAD.unpack_dual(ours(fwAD.make_dual(x, t))).tangent
        yb = fwAD.unpack_dual(ref(fwAD.make_dual(x, t))).tangent
    assert_close(ya, yb)
    assert_close(ours.running_mean, ref.running_mean)  # updated with the primal only


def test_torch_compile_fullgraph():
    ours = bt.BatchNorm2d(3)
    ref = nn.BatchNorm2d(3)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")  # tracing, no codegen: fast
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, ref(x))
    assert int(ours.num_batches_tracked) == 1


def test_compiled_large_dense_table_is_summed_by_blas():
    """Under ``torch.compile`` a dense table beyond 2**20 values is summed by a matrix product,
    which the compiler leaves to BLAS (a matrix-vector product or ``sum(0)`` it would lower to a
    slow loop of its own): two in each direction, with results, gradients and running statistics
    as torch's. Traced by AOTAutograd, run without code generation (fast)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    shape = (4100, 256)  # 1,049,600 values
    ours, ref = bt.BatchNorm1d(shape[1]).double(), nn.BatchNorm1d(shape[1]).double()
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(11)
    x = 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64) + 2
    run_step(compiled, ref, x, torch.randn(shape, generator=gen, dtype=torch.float64))
    mm = torch.ops.aten.mm.default
    # forward: μ and σ²; backward: Σ dy and Σ dy·x̂
    assert [sum(n.target is mm for n in g.graph.nodes) for g in graphs] == [2, 2]


def test_torch_jit_script_says_why_and_what_instead():
    with pytest.raises(RuntimeError, match="autograd.Function.*torch.compile"):
        torch.jit.script(bt.BatchNorm2d(3))


def test_half_precision_cases():
    """fp16 (2, 2, 300, 300): no overflow; half input into a float32 module, dense and spatial,
    training and eval: the input's dtype out, finite gradients matching torch's."""
    x = torch.randn(2, 2, 300, 300) * 100
    ours, ref = _pair(bt.BatchNorm2d, nn.BatchNorm2d, 2)
    torch.testing.assert_close(ours(x.half()).float(), ref(x.half()).float(), atol=1e-2, rtol=0)
    assert torch.isfinite(ours.running_var).all()
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=0)
    for shape, classes in [
        ((8, 3), (bt.BatchNorm1d, nn.BatchNorm1d)),
        ((4, 3, 5, 5), (bt.BatchNorm2d, nn.BatchNorm2d)),
    ]:
        for dtype in (torch.float16, torch.bfloat16):
            for training in (True, False):
                ours, ref = (c(3).train(training) for c in classes)
                xa = torch.randn(shape).to(dtype).requires_grad_()
                xb = xa.detach().clone().requires_grad_()
                ya, yb = ours(xa), ref(xb)
                assert ya.dtype == yb.dtype == dtype
                g = torch.randn(shape).to(dtype)
                ya.backward(g)
                yb.backward(g)
                assert torch.isfinite(xa.grad).all()
                torch.testing.assert_close(xa.grad.float(), xb.grad.float(), atol=2e-2, rtol=2e-2)


def test_inf_in_spatial_training_input_gives_inf_running_mean():
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("inf")
    ours, ref = _pair(bt.BatchNorm2d, nn.BatchNorm2d, 3)
    ours(x)
    ref(x)
    assert ours.running_mean[0] == ref.running_mean[0] == float("inf")
    torch.testing.assert_close(ours.running_mean[1:], ref.running_mean[1:])


def test_twins_are_torch_batch_norms_for_torch_utilities():
    from torch.func import replace_all_batch_norm_modules_

    model = nn.Sequential(nn.Conv2d(3, 4, 3), bt.BatchNorm2d(4), nn.ReLU())
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm)
    replace_all_batch_norm_modules_(model)
    assert model[1].running_mean is None and not model[1].track_running_stats
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), bt.BatchNorm2d(4))
    )
    assert isinstance(synced[1], nn.SyncBatchNorm)
    # quantization's fusion looks its methods up by exact type, so a twin (like any subclass of
    # torch's classes) is named in the additional mapping torch provides for that
    from torch.ao.quantization import fuse_modules
    from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), bt.BatchNorm2d(4))
    model(torch.randn(2, 3, 7, 7))  # non-trivial running statistics
    model.eval()
    x = torch.randn(2, 3, 7, 7)
    mapping = {"additional_fuser_method_mapping": {(nn.Conv2d, bt.BatchNorm2d): fuse_conv_bn}}
    fused = fuse_modules(model, [["0", "1"]], fuse_custom_config_dict=mapping)
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
