"""What the processes of chapter ``ch-distributed`` run: the equivalence check of
:class:`bnbook.distributed.SyncBatchNorm` against one process, synchronised and per-worker training,
the timing of the collectives, and a runner for several such tasks in one launch.

Each worker is a module-level function ``fn(rank, world_size, ...)`` so that the processes that
:func:`bnbook.launch.launch` spawns can import it. With several GPUs the same check runs under
``torchrun``: ``torchrun --standalone --nproc-per-node=2 -m bnbook.distributed_workers``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnbook.distributed import SyncBatchNorm, convert_sync_batchnorm
from bnbook.launch import choose_backend, worker_device

__all__ = ["equivalence_worker", "train_worker", "timing_worker", "tasks_worker", "worker_info"]


def _shard(n: int, rank: int, sizes: Sequence[int] | None, world_size: int) -> slice:
    if sizes is None:
        per = n // world_size
        return slice(rank * per, (rank + 1) * per)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def equivalence_worker(
    rank: int,
    world_size: int,
    x: Tensor,
    grads: Sequence[Tensor],
    sizes: Sequence[int] | None = None,
    momentum: float | None = 0.1,
) -> dict[str, Any]:
    """Run :class:`SyncBatchNorm` on this rank's shard of ``x`` for ``len(grads)`` training steps.

    Step t feeds the shard of ``x + t`` (so the statistics change) and back-propagates the shard of
    ``grads[t]``. Returns the outputs and input gradients of this shard (stacked over steps), the
    local dγ and dβ of each step, and the final running statistics.
    """
    device = worker_device(rank, dist.get_backend())
    shard = _shard(x.shape[0], rank, sizes, world_size)
    layer = SyncBatchNorm(x.shape[1], momentum=momentum, device=device, dtype=x.dtype)
    with torch.no_grad():  # a non-trivial γ, β, identical on every rank
        layer.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1], dtype=x.dtype))
        layer.bias.copy_(torch.linspace(-0.2, 0.2, x.shape[1], dtype=x.dtype))
    outs, dxs, dws, dbs = [], [], [], []
    for t, g in enumerate(grads):
        xi = (x[shard] + t).to(device).requires_grad_(True)
        y = layer(xi)
        layer.weight.grad = layer.bias.grad = None
        y.backward(g[shard].to(device))
        outs.append(y.detach().cpu())
        dxs.append(xi.grad.cpu())
        dws.append(layer.weight.grad.cpu())
        dbs.append(layer.bias.grad.cpu())
    return {
        "y": outs,
        "dx": dxs,
        "dweight": dws,
        "dbias": dbs,
        "running_mean": layer.running_mean.cpu(),
        "running_var": layer.running_var.cpu(),
        "num_batches_tracked": int(layer.num_batches_tracked),
    }


def train_worker(
    rank: int,
    world_size: int,
    *,
    sync: bool,
    per_worker_batch: int,
    steps: int,
    seed: int | None = None,
    lr: float = 0.1,
    model: str = "mlp",
) -> dict[str, Any]:
    """Train a small model data-parallel with ``DistributedDataParallel`` and plain SGD.

    ``model="mlp"``: :func:`bnbook.models.mlp` ``(784, 64, 10)`` with :class:`bnbook.torch.BatchNorm1d`;
    ``model="cnn"``: :func:`bnbook.models.cnn` ``(8, 16)`` with :class:`bnbook.torch.BatchNorm2d`. Both
    are initialised after ``torch.manual_seed(seed)``, as a single process would. Every step, the
    global batch of ``world_size · per_worker_batch`` training images (from
    :func:`bnbook.train.batches` with ``seed``) is split into equal shards, one per worker. Batch norm
    is synchronised (:func:`convert_sync_batchnorm`) if ``sync``, else each worker normalises with its
    own shard. Returns this worker's per-step training loss (``"loss"``), the test accuracy of the
    final model in evaluation mode (``"test_acc"``), and its test accuracy in *training* mode
    (``"train_mode_acc"``): the test images in groups of ``world_size · per_worker_batch``, each
    worker normalising its shard of every group as in training (with its own shard, or synchronised).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnbook.data import load_mnist_subset
    from bnbook.models import cnn, mlp
    from bnbook.torch import BatchNorm1d, BatchNorm2d
    from bnbook.train import batches, evaluate

    if model not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    if seed is None:
        from bnbook import seed as run_seed

        seed = run_seed(0)
    device = worker_device(rank, dist.get_backend())
    torch.manual_seed(seed)
    if model == "mlp":
        net = mlp((784, 64, 10), norm=BatchNorm1d).to(device)
    else:
        net = cnn((8, 16), norm=BatchNorm2d).to(device)
    if sync:
        net = convert_sync_batchnorm(net)
    ddp = DDP(net, device_ids=None if device.type == "cpu" else [device])
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    data = load_mnist_subset(flatten=model == "mlp", as_torch=True)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    order = batches(len(x_train), world_size * per_worker_batch, seed=seed)
    losses = []
    for _ in range(steps):
        idx = torch.from_numpy(next(order))[rank * per_worker_batch : (rank + 1) * per_worker_batch]
        idx = idx.to(device)
        loss = nn.functional.cross_entropy(ddp(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    _, acc = evaluate(net, x_test, y_test)
    return {
        "loss": losses,
        "test_acc": acc,
        "train_mode_acc": _train_mode_accuracy(
            net, x_test, y_test, rank, world_size, per_worker_batch
        ),
    }


def _train_mode_accuracy(
    net: nn.Module, x: Tensor, y: Tensor, rank: int, world_size: int, per_worker_batch: int
) -> float:
    """Accuracy with batch statistics, as in training: ``x`` in consecutive groups of
    ``world_size · per_worker_batch``, this worker taking its shard of each. Every worker runs the
    same number of forward passes, so synchronised layers meet in their collectives. The running
    statistics move; call it last."""
    group = world_size * per_worker_batch
    correct, seen = 0, 0
    net.train()
    with torch.no_grad():
        for start in range(0, len(x) // group * group, group):
            shard = slice(start + rank * per_worker_batch, start + (rank + 1) * per_worker_batch)
            correct += int((net(x[shard]).argmax(1) == y[shard]).sum())
            seen += per_worker_batch
    net.eval()
    return correct / seen


def timing_worker(
    rank: int,
    world_size: int,
    shape: Sequence[int],
    repeats: int = 30,
    payload_factor: int = 64,
) -> dict[str, list[float]]:
    """Wall-clock seconds, on this rank, of one training forward + backward of a batch-norm layer on
    an input of ``shape``, synchronised (``"sync"``) and local (``"local"``); of the two bare
    collectives the synchronised layer issues (``"collectives"``: an ``all_gather`` of 2C + 1 and
    an ``all_reduce`` of 2C numbers); and of the same two collectives with ``payload_factor`` times
    as many numbers (``"collectives_large"``).

    Returns one sample per round for each of the four: ``repeats`` rounds, each calling the four
    once after a barrier, so that the four see the same machine load in a round and a ratio can be
    taken round by round. Wall time, not CPU time, because what a collective costs is mostly
    waiting for the other worker; other processes on the machine can only add to it, so the
    fastest round (``min``) is the estimate they disturb least. The input is drawn with
    :func:`bnbook.seed` ``(rank)``.
    """
    from bnbook import seed as run_seed
    from bnbook.torch import BatchNorm2d

    device = worker_device(rank, dist.get_backend())
    gen = torch.Generator().manual_seed(run_seed(rank))
    x = torch.randn(*shape, generator=gen).to(device).requires_grad_(True)
    dy = torch.randn(*shape, generator=gen).to(device)
    channels = shape[1]
    layers = {"sync": SyncBatchNorm(channels).to(device), "local": BatchNorm2d(channels).to(device)}
    buffers = {
        name: (
            torch.zeros(k * (2 * channels + 1), device=device),
            torch.zeros(k * 2 * channels, device=device),
        )
        for name, k in (("collectives", 1), ("collectives_large", payload_factor))
    }

    def run(name: str) -> float:
        dist.barrier()
        start = time.perf_counter()
        if name in buffers:
            gather_buf, reduce_buf = buffers[name]
            out = [torch.empty_like(gather_buf) for _ in range(world_size)]
            dist.all_gather(out, gather_buf)
            dist.all_reduce(reduce_buf)
        else:
            layers[name](x).backward(dy)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in (*layers, *buffers)}
    for _ in range(3):  # warm-up
        for name in times:
            run(name)
    for _ in range(repeats):
        for name in times:
            times[name].append(run(name))
    return times


def worker_info(rank: int, world_size: int) -> dict[str, Any]:
    """Where this worker runs: its rank, the process group's backend and its device."""
    return {
        "rank": rank,
        "world_size": world_size,
        "backend": str(dist.get_backend()),
        "device": str(worker_device(rank, dist.get_backend())),
    }


def tasks_worker(
    rank: int, world_size: int, tasks: Sequence[tuple[Callable[..., Any], dict[str, Any]]]
) -> list[Any]:
    """Run several worker functions one after the other in the same process group:
    ``tasks = [(fn, kwargs), ...]`` gives ``[fn(rank, world_size, **kwargs), ...]``. Starting worker
    processes costs seconds (each imports torch), so a chapter launches once and runs all its tasks."""
    results = []
    for fn, kwargs in tasks:
        dist.barrier()
        results.append(fn(rank, world_size, **kwargs))
    return results


def _torchrun_main() -> None:  # pragma: no cover - exercised by hand with torchrun
    """Under ``torchrun``: check the synchronised layer against one process on the whole batch."""
    from bnbook import seed as run_seed

    backend = choose_backend(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        gen = torch.Generator().manual_seed(run_seed(0))
        x = torch.randn(4 * world, 3, 5, 5, generator=gen, dtype=torch.float64)
        grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64)]
        mine = equivalence_worker(rank, world, x, grads)
        ref = nn.BatchNorm2d(3, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
            ref.bias.copy_(torch.linspace(-0.2, 0.2, 3, dtype=torch.float64))
        xr = x.clone().requires_grad_(True)
        ref(xr).backward(grads[0])
        shard = _shard(x.shape[0], rank, None, world)
        err = (mine["dx"][0] - xr.grad[shard]).abs().max().item()
        print(f"rank {rank}/{world} ({backend}): max |dx - dx_single| = {err:.2e}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    _torchrun_main()
