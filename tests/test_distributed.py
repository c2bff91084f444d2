"""Tests of bnbook.distributed, bnbook.launch and bnbook.distributed_workers: Chan's formula, the synchronised layer in one process (a gloo group
of one) and in two spawned processes against one process on the concatenated batch, the converter,
the launcher's clean-up, and errors."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnbook.distributed as D
import bnbook.distributed_workers as W
import bnbook.launch as LA
from bnbook.torch import BatchNorm2d

F64 = torch.float64


def _stats(x: torch.Tensor):
    return torch.tensor(float(x.numel())), x.mean(), ((x - x.mean()) ** 2).sum()


# --------------------------------------------------------------------------------------------
# Chan's formula
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2),
    seed=st.integers(0, 2**16),
    offset=st.sampled_from([0.0, 1e3]),
)
def test_combine_stats_equals_whole_batch(sizes, seed, offset):
    x = torch.tensor(np.random.default_rng(seed).normal(offset, 2.0, size=sum(sizes)), dtype=F64)
    parts = torch.split(x, sizes)
    counts = torch.tensor([float(len(p)) for p in parts], dtype=F64)
    means = torch.stack([p.mean() if len(p) else torch.zeros((), dtype=F64) for p in parts])[
        :, None
    ]
    m2s = torch.stack(
        [((p - p.mean()) ** 2).sum() if len(p) else torch.zeros((), dtype=F64) for p in parts]
    )[:, None]
    n, mean, m2 = D.combine_stats(counts, means, m2s)
    assert float(n) == len(x)
    torch.testing.assert_close(mean[0], x.mean(), atol=1e-12 * (1 + offset), rtol=0)
    torch.testing.assert_close(m2[0] / n, x.var(unbiased=False), atol=1e-10, rtol=1e-10)


def test_chan_beats_raw_sum_of_squares_in_float32():
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + 0.01 * torch.randn(2, 4096, generator=gen, dtype=torch.float32)
    true_var = x.double().var(unbiased=False).item()
    n, mean, m2 = D.chan_combine(*_stats(x[0]), *_stats(x[1]))
    chan_var = (m2 / n).item()
    raw = (
        (x * x).sum() / x.numel() - x.mean() ** 2
    ).item()  # E[x²] − E[x]², as one all-reduce would
    assert abs(chan_var - true_var) / true_var < 1e-3
    assert abs(raw - true_var) / true_var > 0.5  # cancellation: the raw formula is wrong


def test_chan_combine_with_an_empty_group():
    n, mean, m2 = D.chan_combine(
        torch.tensor(0.0),
        torch.tensor(0.0),
        torch.tensor(0.0),
        torch.tensor(3.0),
        torch.tensor(2.0),
        torch.tensor(5.0),
    )
    assert (float(n), float(mean), float(m2)) == (3.0, 2.0, 5.0)


def test_bytes_per_step():
    assert D.bytes_per_step(16, 2) == {
        "forward_sent": 132,
        "forward_received": 132,
        "backward_reduced": 128,
    }
    assert D.bytes_per_step(8, 4, itemsize=8)["forward_received"] == 3 * 17 * 8


# --------------------------------------------------------------------------------------------
# One process: no group (plain BN) and a gloo group of one
# --------------------------------------------------------------------------------------------


def _twin_modules(dtype=F64, momentum=0.1):
    ours = D.SyncBatchNorm(3, momentum=momentum, dtype=dtype)
    ref = nn.BatchNorm2d(3, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        ours.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _check_against(ours, ref, steps=2, dtype=F64, tol=1e-9):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 3, 5, 5, generator=gen, dtype=dtype) * 3 + 2
        g = torch.randn(x.shape, generator=gen, dtype=dtype)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours.zero_grad()
        ref.zero_grad()
        y1, y2 = ours(x1), ref(x2)
        y1.backward(g)
        y2.backward(g)
        for a, b in (
            (y1, y2),
            (x1.grad, x2.grad),
            (ours.weight.grad, ref.weight.grad),
            (ours.bias.grad, ref.bias.grad),
        ):
            torch.testing.assert_close(a, b, atol=tol, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=tol, rtol=0)


def test_without_process_group_it_is_batch_norm():
    assert not dist.is_initialized()
    ours, ref = _twin_modules()
    _check_against(ours, ref)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-12, rtol=0)
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_group_of_one_matches_batch_norm(group_of_one, momentum):
    ours, ref = _twin_modules(momentum=momentum)
    _check_against(ours, ref, steps=3)


def test_sync_function_gradcheck(group_of_one):
    x = torch.randn(3, 2, 2, 2, dtype=F64, requires_grad=True)
    w = torch.randn(2, dtype=F64, requires_grad=True)
    b = torch.randn(2, dtype=F64, requires_grad=True)

    def f(x, w, b):
        return D.SyncBatchNormFunction.apply(x, w, b, 1e-5, dist.group.WORLD)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_one_value_per_channel_raises(group_of_one):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        D.SyncBatchNorm(3)(torch.randn(1, 3))


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 2, 2, 2, 2)])
def test_any_rank_from_two_up(group_of_one, shape):
    ours = D.SyncBatchNorm(3, dtype=F64)
    ref = nn.BatchNorm1d(3, dtype=F64)
    x = torch.randn(shape, dtype=F64) * 2 + 1
    y_ref = ref(x.reshape(shape[0], 3, -1)).reshape(shape)
    torch.testing.assert_close(ours(x), y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-12, rtol=0)
    ours.eval()
    ref.eval()
    y_ref = ref(x.reshape(shape[0], 3, -1)).reshape(shape)
    torch.testing.assert_close(ours(x), y_ref, atol=1e-12, rtol=0)


def test_input_errors():
    with pytest.raises(ValueError, match="1D input"):
        D.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(TypeError, match="floating-point"):
        D.SyncBatchNorm(3)(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        D.SyncBatchNorm(3)(torch.randn(2, 4, 5))


# --------------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------------


def test_convert_sync_batchnorm_keeps_state_and_mode():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(BatchNorm2d(4, momentum=None)),
    )
    with torch.no_grad():
        net[1].weight.fill_(2.0)
        net[1].running_mean.fill_(0.5)
        net[1].num_batches_tracked.fill_(7)
    net[3][0].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = D.convert_sync_batchnorm(net)
    assert out is net
    assert isinstance(net[1], D.SyncBatchNorm) and isinstance(net[3][0], D.SyncBatchNorm)
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[2], nn.ReLU)
    assert net[3][0].momentum is None and not net[3][0].training and net[1].training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    single = D.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(5, affine=False))
    assert isinstance(single, D.SyncBatchNorm) and single.weight is None


# --------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------


def _single_process(x, grads, momentum=0.1):
    # torch's BatchNorm1d on the (N, C, L) view: the reference for an input of any rank >= 2
    ref = nn.BatchNorm1d(x.shape[1], momentum=momentum, dtype=x.dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1], dtype=x.dtype))
        ref.bias.copy_(torch.linspace(-0.2, 0.2, x.shape[1], dtype=x.dtype))
    out = []
    for t, g in enumerate(grads):
        xr = (x + t).clone().requires_grad_(True)
        ref.zero_grad()
        y = ref(xr.reshape(x.shape[0], x.shape[1], -1)).reshape(x.shape)
        y.backward(g)
        out.append((y.detach(), xr.grad, ref.weight.grad.clone(), ref.bias.grad.clone()))
    return out, ref


def _check_two_process(results, x, grads, tol, momentum=0.1):
    steps, ref = _single_process(x, grads, momentum)
    for t, (y, dx, dw, db) in enumerate(steps):
        torch.testing.assert_close(torch.cat([r["y"][t] for r in results]), y, atol=tol, rtol=0)
        torch.testing.assert_close(torch.cat([r["dx"][t] for r in results]), dx, atol=tol, rtol=0)
        torch.testing.assert_close(sum(r["dweight"][t] for r in results), dw, atol=tol, rtol=0)
        torch.testing.assert_close(sum(r["dbias"][t] for r in results), db, atol=tol, rtol=0)
    for r in results:
        torch.testing.assert_close(r["running_mean"], ref.running_mean, atol=tol, rtol=0)
        torch.testing.assert_close(r["running_var"], ref.running_var, atol=tol, rtol=0)
        assert r["num_batches_tracked"] == len(grads)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LA.LOOPBACK, port))
        except OSError:
            return False
    return True


def test_two_processes_equal_one_process_on_the_whole_batch(monkeypatch):
    ports = []
    real_store = dist.TCPStore

    def recording_store(*args, **kwargs):
        store = real_store(*args, **kwargs)
        ports.append(store.port)
        return store

    monkeypatch.setattr(dist, "TCPStore", recording_store)
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, 3, 4, 4, generator=gen, dtype=F64) * 2 + 5
    g64 = [torch.randn(x64.shape, generator=gen, dtype=F64) for _ in range(2)]
    x32, g32 = x64.float(), [g.float() for g in g64]
    x_odd = torch.randn(7, 2, 3, generator=gen, dtype=F64)
    g_odd = [torch.randn(x_odd.shape, generator=gen, dtype=F64)]
    x_6d = torch.randn(5, 2, 3, 2, 2, 2, generator=gen, dtype=F64) * 3 - 1
    g_6d = [torch.randn(x_6d.shape, generator=gen, dtype=F64) for _ in range(2)]
    x_2d = torch.randn(6, 4, generator=gen, dtype=F64)
    g_2d = [torch.randn(x_2d.shape, generator=gen, dtype=F64)]
    tasks = [
        (W.equivalence_worker, {"x": x64, "grads": g64}),
        (W.equivalence_worker, {"x": x32, "grads": g32}),
        # unequal shards (3 and 4 samples) and the cumulative average
        (W.equivalence_worker, {"x": x_odd, "grads": g_odd, "sizes": (3, 4), "momentum": None}),
        # an empty shard on rank 0, and inputs of rank 6 and 2, as torch.nn.SyncBatchNorm allows
        (W.equivalence_worker, {"x": x_6d, "grads": g_6d, "sizes": (0, 5)}),
        (W.equivalence_worker, {"x": x_2d, "grads": g_2d, "sizes": (2, 4)}),
        (W.worker_info, {}),
        (W.timing_worker, {"shape": (4, 2, 3, 3), "repeats": 3, "payload_factor": 2}),
    ]
    per_rank = LA.launch(W.tasks_worker, 2, (tasks,), timeout=120)
    _check_two_process([r[0] for r in per_rank], x64, g64, tol=1e-9)
    _check_two_process([r[1] for r in per_rank], x32, g32, tol=1e-5)
    _check_two_process([r[2] for r in per_rank], x_odd, g_odd, tol=1e-9, momentum=None)
    _check_two_process([r[3] for r in per_rank], x_6d, g_6d, tol=1e-9)
    assert per_rank[0][3]["y"][0].shape == (0, 2, 3, 2, 2, 2)
    _check_two_process([r[4] for r in per_rank], x_2d, g_2d, tol=1e-9)
    expected = LA.choose_backend(2)
    assert [r[5] for r in per_rank] == [
        {
            "rank": k,
            "world_size": 2,
            "backend": expected,
            "device": str(LA.worker_device(k, expected)),
        }
        for k in range(2)
    ]
    # the timing task: one wall-clock sample per round for each of the four, on both ranks
    for timing in (r[6] for r in per_rank):
        assert sorted(timing) == ["collectives", "collectives_large", "local", "sync"]
        assert all(len(v) == 3 and min(v) > 0 for v in timing.values()), timing
    # the launcher served its store on one port, and closed it
    assert len(ports) == 1 and _port_is_free(ports[0])


def test_launch_reports_a_failing_worker_and_cleans_up():
    import math
    import multiprocessing

    # math.log(rank, world_size) = math.log(0, 1) raises "math domain error" in the worker
    with pytest.raises(RuntimeError, match="worker 0 raised:(.|\n)*math domain error"):
        LA.launch(W.tasks_worker, 1, ([(math.log, {})],), timeout=60)
    assert multiprocessing.active_children() == []


def test_launch_argument_errors():
    import multiprocessing

    with pytest.raises(ValueError, match="world_size"):
        LA.launch(W.tasks_worker, 0)
    with pytest.raises(ValueError, match="backend must be"):
        LA.launch(W.tasks_worker, 1, backend="mpi")
    if LA._gpu_count() < 2:  # refused up front, before any worker starts
        with pytest.raises(ValueError, match="backend='nccl'.*world_size=2"):
            LA.launch(W.tasks_worker, 2, ([],), backend="nccl")
    assert multiprocessing.active_children() == []


# --------------------------------------------------------------------------------------------
# The backend: NCCL only with one GPU per worker
# --------------------------------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs: ``gpus(n)``."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


@pytest.mark.parametrize(
    ("n_gpus", "world_size", "expected"),
    [
        (0, 1, "gloo"),
        (0, 2, "gloo"),
        (1, 1, "nccl"),
        (1, 2, "gloo"),
        (2, 2, "nccl"),
        (2, 3, "gloo"),
    ],
)
def test_choose_backend_takes_nccl_only_with_a_gpu_per_worker(gpus, n_gpus, world_size, expected):
    gpus(n_gpus)
    assert LA.choose_backend(world_size) == expected
    assert LA.choose_backend(world_size, "gloo") == "gloo"


@pytest.mark.parametrize(("n_gpus", "world_size"), [(0, 1), (0, 2), (1, 2), (3, 4)])
def test_nccl_without_enough_gpus_is_refused(gpus, n_gpus, world_size):
    gpus(n_gpus)
    with pytest.raises(ValueError) as info:
        LA.choose_backend(world_size, "nccl")
    message = str(info.value)
    assert "nccl" in message and f"world_size={world_size}" in message
    assert f"{n_gpus} GPU(s)" in message


def test_nccl_with_enough_gpus_is_accepted(gpus):
    gpus(4)
    assert LA.choose_backend(4, "nccl") == "nccl"
    with pytest.raises(ValueError, match="backend must be"):
        LA.choose_backend(2, "NCCL")


def test_a_single_gpu_launch_runs_two_workers_on_gloo(gpus):
    gpus(1)  # the parent decides; the workers then never touch CUDA
    infos = LA.launch(W.tasks_worker, 2, ([(W.worker_info, {})],), timeout=120)
    assert [i[0]["backend"] for i in infos] == ["gloo", "gloo"]
    assert [i[0]["device"] for i in infos] == ["cpu", "cpu"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs, one per worker")
def test_nccl_two_gpus_equal_one_process():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=gen, dtype=F64) * 2 + 5
    grads = [torch.randn(x.shape, generator=gen, dtype=F64) for _ in range(2)]
    tasks = [(W.equivalence_worker, {"x": x, "grads": grads}), (W.worker_info, {})]
    per_rank = LA.launch(W.tasks_worker, 2, (tasks,), backend="nccl", timeout=120)
    assert [r[1]["device"] for r in per_rank] == ["cuda:0", "cuda:1"]
    _check_two_process([r[0] for r in per_rank], x, grads, tol=1e-9)
