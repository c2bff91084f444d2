"""Batch norm across devices: a synchronised batch-norm layer and a small local launcher
(chapter ``ch-distributed``).

With data parallelism each of k workers sees b samples, and plain batch norm normalises with the
statistics of those b samples only. :class:`SyncBatchNorm` normalises with the statistics of all
k·b samples instead, so k workers compute exactly what one process computes on the concatenated
batch. Per training step and per layer it communicates

* forward: each worker's per-channel count, mean and M2 = Σ(x − μ)² — one ``all_gather`` of 2C + 1
  numbers per worker, combined on every worker with Chan's parallel formula (label
  ``eq-distributed-chan``), never as a raw sum of squares, which cancels catastrophically;
* backward: the two per-channel sums Σ dy and Σ dy·x̂ — one ``all_reduce`` of 2C numbers.

It runs on CPUs with the ``gloo`` backend (where ``torch.nn.SyncBatchNorm`` refuses to train) and on
GPUs with ``nccl``, one GPU per worker (:func:`choose_backend`). Constructor, parameters, buffers, ``state_dict`` and the momentum conventions are
those of ``torch.nn.BatchNorm*d``, inherited from :mod:`bnbook.torch`; outside training, or when no
process group is initialised, it *is* :class:`bnbook.torch.BatchNorm2d`'s computation.

:func:`launch` starts k local worker processes joined by a process group on 127.0.0.1 and returns
what each worker function returned; the worker functions of chapter ``ch-distributed`` live here
because spawned processes must be able to import them. With several GPUs, the same check runs under
``torchrun``: ``torchrun --standalone --nproc-per-node=2 -m bnbook.distributed``.

>>> import torch
>>> from bnbook.distributed import SyncBatchNorm, convert_sync_batchnorm
>>> net = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
>>> type(net[1]).__name__, net[1](torch.randn(2, 4, 5, 5)).shape   # no process group: plain BN
('SyncBatchNorm', torch.Size([2, 4, 5, 5]))
"""

from __future__ import annotations

import math
import os
import pickle
import queue as queue_module
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnbook._checks import DtypeError, check_channels, shape_str
from bnbook.torch import _BatchNorm

__all__ = [
    "local_stats",
    "chan_combine",
    "combine_stats",
    "SyncBatchNormFunction",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "bytes_per_step",
    "choose_backend",
    "launch",
    "LOOPBACK",
    "equivalence_worker",
    "train_worker",
    "timing_worker",
    "tasks_worker",
    "worker_info",
]

#: Every process group of this module listens on the loopback interface only.
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------------------------
# Chan's parallel formula
# --------------------------------------------------------------------------------------------


def chan_combine(
    count_a: Tensor, mean_a: Tensor, m2_a: Tensor, count_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and M2 = Σ(x − μ)² of the union of two groups, from each group's own
    (Chan, Golub & LeVeque): with n = n_a + n_b and δ = μ_b − μ_a,

    ``μ = μ_a + δ · n_b / n``,   ``M2 = M2_a + M2_b + δ² · n_a · n_b / n``.

    Works elementwise (per channel); an empty group (count 0) leaves the other unchanged.

    >>> import torch
    >>> x = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0], dtype=torch.float64)
    >>> a, b = x[:3], x[3:]
    >>> n_a, n_b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    >>> n, mean, m2 = chan_combine(n_a, a.mean(), ((a - a.mean()) ** 2).sum(),
    ...                            n_b, b.mean(), ((b - b.mean()) ** 2).sum())
    >>> round(float(mean), 9), round(float(m2 / n), 9), round(float(x.var(unbiased=False)), 9)
    (5.4, 17.84, 17.84)
    """
    count = count_a + count_b
    safe = torch.where(count > 0, count, torch.ones_like(count))
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / safe)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / safe)
    return count, mean, m2


def combine_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fold :func:`chan_combine` over k groups: rows of ``counts`` (k,) or (k, C), ``means`` and
    ``m2s`` (k, C). Every worker folds the same gathered rows in the same order, so every worker gets
    bit-identical statistics."""
    count, mean, m2 = counts[0], means[0], m2s[0]
    for i in range(1, means.shape[0]):
        count, mean, m2 = chan_combine(count, mean, m2, counts[i], means[i], m2s[i])
    return count, mean, m2


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _as_ncl(x: Tensor) -> Tensor:
    # the length is spelled out: a view with -1 is ambiguous for an empty shard (N = 0)
    return x.contiguous().view(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def local_stats(x3: Tensor) -> tuple[int, Tensor, Tensor]:
    """This worker's per-channel count, mean and M2 = Σ(x − μ)² of an (N, C, L) tensor, in two
    passes (the mean first, then the squares of the deviations from it)."""
    count = x3.shape[0] * x3.shape[2]
    if count == 0:  # an empty shard still takes part in the collectives
        zeros = x3.new_zeros(x3.shape[1])
        return 0, zeros, zeros.clone()
    mean = x3.mean(dim=(0, 2))
    centered = x3 - mean[:, None]
    return count, mean, torch.einsum("ncl,ncl->c", centered, centered)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with statistics over the batches of every worker in ``group``.

    ``y, mean, var, count = SyncBatchNormFunction.apply(x, weight, bias, eps, group)`` with ``x`` of
    shape (N, C, *spatial) (N may differ between workers, and may be 0); ``mean``, ``var`` (biased)
    and ``count`` are the global per-channel statistics, returned as non-differentiable outputs for
    the running-statistics update.

    Backward: each worker's Σ dy and Σ dy·x̂ are summed over all workers (one ``all_reduce``), then

        dx = γ/(n σ) (n dy − Σ_all dy − x̂ Σ_all dy x̂)

    with n the global count; dγ = Σ_local dy x̂ and dβ = Σ_local dy stay local (a data-parallel
    wrapper such as ``DistributedDataParallel`` then reduces them like every other gradient).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group):
        x3 = _as_ncl(x)
        channels = x3.shape[1]
        local_count, mean_l, m2_l = local_stats(x3)
        # One message per worker: [count, mean_1..C, M2_1..C]; gathered, then combined (Chan).
        local = torch.cat([x3.new_full((1,), float(local_count)), mean_l, m2_l])
        gathered = [torch.empty_like(local) for _ in range(_group_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)
        count, mean, m2 = combine_stats(
            stats[:, 0], stats[:, 1 : channels + 1], stats[:, channels + 1 :]
        )
        n = float(count)
        if n <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got a total of "
                f"{int(n)} over all workers (this worker's input: {shape_str(x.shape)})"
            )
        var = m2 / n
        invstd = torch.rsqrt(var + eps)
        x_hat = (x3 - mean[:, None]) * invstd[:, None]
        if weight is not None:
            y = x_hat * weight[:, None]
        else:
            y = x_hat.clone()
        if bias is not None:
            y = y + bias[:, None]
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.has_bias = bias is not None
        ctx.count = n
        ctx.group = group
        ctx.input_shape = x.shape
        count_t = torch.full_like(mean, n)
        ctx.mark_non_differentiable(mean, var, count_t)
        return y.view(x.shape), mean, var, count_t

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean, _dvar, _dcount):
        x_hat, invstd, weight = ctx.saved_tensors
        dy3 = _as_ncl(dy)
        channels = x_hat.shape[1]
        sum_dy = dy3.sum(dim=(0, 2))
        sum_dy_xhat = torch.einsum("ncl,ncl->c", dy3, x_hat)
        dw = sum_dy_xhat.clone() if (ctx.needs_input_grad[1] and weight is not None) else None
        db = sum_dy.clone() if (ctx.needs_input_grad[2] and ctx.has_bias) else None
        dx = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.group)
            g_sum_dy, g_sum_dy_xhat = both[:channels], both[channels:]
            n = ctx.count
            k = invstd if weight is None else weight * invstd
            dx = (
                dy3 * k[:, None]
                - x_hat * (k * g_sum_dy_xhat / n)[:, None]
                - (k * g_sum_dy / n)[:, None]
            )
            dx = dx.view(ctx.input_shape)
        return dx, dw, db, None, None


# --------------------------------------------------------------------------------------------
# The module and the converter
# --------------------------------------------------------------------------------------------


class SyncBatchNorm(_BatchNorm):
    """Synchronised batch norm over (N, C, *) input; constructor, buffers and ``state_dict`` of
    ``torch.nn.SyncBatchNorm`` / ``BatchNorm*d``.

    In training mode, when a process group is initialised, the statistics are those of the union of
    every worker's batch (:class:`SyncBatchNormFunction`) and the running statistics are updated with
    them (unbiased variance with the global count; ``momentum=None`` is the cumulative average), so
    every worker keeps identical running statistics. Otherwise — evaluation mode, or no process group
    — the layer computes exactly :class:`bnbook.torch.BatchNorm2d`'s result and communicates nothing.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, device, dtype, bias
        As in :class:`bnbook.torch.BatchNorm1d`.
    process_group : ProcessGroup or None
        The workers to synchronise over; None: the default (whole) group.

    Shape
    -----
    Input (N, C, *) with at least 2 dimensions, any number of them; output the same. N may differ
    between workers, and may be 0 on some of them (an empty shard still joins the collectives).

    Raises
    ------
    ValueError
        Fewer than 2 dimensions; one value per channel over all workers in training.
    RuntimeError
        Channel count ≠ ``num_features`` (:class:`bnbook._checks.ChannelMismatchError`).
    """

    _shape_hint = "(N, C, *)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        # like torch.nn.SyncBatchNorm: any (N, C, *) input with at least two dimensions
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if not input.is_floating_point():
            raise DtypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
        if input.dim() < 2:
            raise ValueError(
                f"expected at least 2D input (got {input.dim()}D input): SyncBatchNorm's input must "
                f"have shape {self._shape_hint} with C = {self.num_features}, got "
                f"{shape_str(input.shape)}"
            )
        check_channels(
            "running_mean" if self.track_running_stats else "weight", self.num_features, input.shape
        )

    def _synchronise(self) -> bool:
        return self.training and dist.is_available() and dist.is_initialized()

    def forward(self, input: Tensor) -> Tensor:
        if not self._synchronise():
            return super().forward(input)
        self._check_input_dim(input)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        y, mean, var, count = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, float(self.eps), group
        )
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            n = float(count[0])
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(
                    mean.to(self.running_mean.dtype), alpha=factor
                )
                unbiased = (var * (n / (n - 1))).to(self.running_var.dtype)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Same as :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch-norm layer in ``module`` (``torch.nn.BatchNorm*d``, ``torch.nn.SyncBatchNorm``
    or :mod:`bnbook.torch`'s) by a :class:`SyncBatchNorm` holding the same parameters, buffers and
    train/eval mode, like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    Parameters
    ----------
    module : nn.Module
    process_group : ProcessGroup or None

    Returns
    -------
    nn.Module
        ``module`` with its children converted in place, or a new :class:`SyncBatchNorm` if
        ``module`` itself is a batch-norm layer.
    """
    out = module
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm)) and not isinstance(
        module, SyncBatchNorm
    ):
        ref = module.weight if module.weight is not None else module.running_mean
        out = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
            bias=module.bias is not None or not module.affine,
        )
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.weight.requires_grad_(module.weight.requires_grad)
                if module.bias is not None:
                    out.bias.copy_(module.bias)
                    out.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def bytes_per_step(channels: int, world_size: int, itemsize: int = 4) -> dict[str, int]:
    """Payload of one :class:`SyncBatchNorm` layer in one training step, per worker.

    Returns the bytes each worker *contributes* to the forward ``all_gather`` (count, C means,
    C M2 values) and to the backward ``all_reduce`` (2C sums), and the bytes each worker *receives*
    in the gather (from the other k − 1 workers). What crosses a link also depends on the backend's
    algorithm (a ring all-reduce moves about 2(k − 1)/k times the buffer per worker).

    >>> bytes_per_step(16, 2)
    {'forward_sent': 132, 'forward_received': 132, 'backward_reduced': 128}
    """
    forward = (2 * channels + 1) * itemsize
    return {
        "forward_sent": forward,
        "forward_received": forward * (world_size - 1),
        "backward_reduced": 2 * channels * itemsize,
    }


# --------------------------------------------------------------------------------------------
# Launching local workers
# --------------------------------------------------------------------------------------------


BACKENDS = ("gloo", "nccl")


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_backend(world_size: int, backend: str | None = None) -> str:
    """The process-group backend for ``world_size`` workers on this machine.

    NCCL drives one GPU per process and refuses two processes on the same GPU ("Duplicate GPU
    detected"), so ``None`` gives ``"nccl"`` only when there are at least ``world_size`` GPUs, and
    ``"gloo"`` otherwise, with every worker on the CPU (gloo runs any number of CPU workers).

    Parameters
    ----------
    world_size : int
        Number of worker processes on this machine.
    backend : {"gloo", "nccl"} or None
        None: choose as above. A name is checked and returned.

    Returns
    -------
    str
        ``"gloo"`` or ``"nccl"``.

    Raises
    ------
    ValueError
        An unknown backend, or ``"nccl"`` with fewer GPUs than workers (the message gives both).

    >>> choose_backend(2, "gloo")
    'gloo'
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    gpus = _gpu_count()
    if backend is None:
        return "nccl" if world_size <= gpus else "gloo"
    if backend == "nccl" and world_size > gpus:
        raise ValueError(
            f"backend='nccl' needs one GPU per worker, but world_size={world_size} workers were "
            f"asked for and {gpus} GPU(s) are available; use backend='gloo' (or None) to run the "
            "workers on the CPU"
        )
    return backend


def _worker_device(rank: int, backend: str) -> torch.device:
    if backend == "nccl":  # one GPU per worker (choose_backend made sure there are enough)
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _entry(rank, world_size, port, backend, timeout, fn, args, results) -> None:
    """Body of each spawned process: join the group, run ``fn``, always leave the group."""
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(_worker_device(rank, backend))
        store = dist.TCPStore(
            LOOPBACK, port, world_size + 1, is_master=False, timeout=timedelta(seconds=timeout)
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: torch's queue reducers would pass tensors through shared memory that
        # disappears when this process exits.
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report any failure to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    *,
    backend: str | None = None,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a process group.

    The processes are started with the ``spawn`` method (so ``fn`` must be importable: a module-level
    function of an installed module, not one defined in a notebook) and rendezvous through a
    ``TCPStore`` that this process serves on 127.0.0.1 on a port the operating system picks. Whatever
    happens — a worker raises, the time runs out, the caller is interrupted — every worker is joined
    (terminated if need be), each worker leaves its process group, and the store's port is closed.

    Parameters
    ----------
    fn : callable
        ``fn(rank, world_size, *args)``; its return value must be picklable (e.g. CPU tensors).
    world_size : int
        Number of processes, k ≥ 1.
    args : sequence
        Extra arguments, pickled to every worker.
    backend : {"gloo", "nccl"} or None
        None: :func:`choose_backend` picks ``nccl`` when there is one GPU per worker, else
        ``gloo`` with every worker on the CPU.
    timeout : float
        Seconds for the whole run.

    Returns
    -------
    list
        ``fn``'s return value on each rank, in rank order.

    Raises
    ------
    ValueError
        ``world_size`` < 1, an unknown backend, or ``nccl`` with fewer GPUs than workers (raised
        before any process starts).
    RuntimeError
        A worker raised (the message holds its traceback) or died.
    TimeoutError
        The workers did not all finish within ``timeout`` seconds.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = choose_backend(world_size, backend)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = dist.TCPStore(
        LOOPBACK,
        0,
        world_size + 1,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout),
    )
    procs = [
        ctx.Process(
            target=_entry,
            args=(rank, world_size, store.port, backend, timeout, fn, tuple(args), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    outputs: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.05)
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a worker process died with exit code {dead[0].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size - len(outputs)} of {world_size} workers did not finish "
                        f"within {timeout} s"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"worker {rank} raised:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join()
        results.close()
        results.join_thread()
        del store  # closes the listening socket
    return [outputs[r] for r in range(world_size)]


# --------------------------------------------------------------------------------------------
# The chapter's workers (importable, so that spawned processes can run them)
# --------------------------------------------------------------------------------------------


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
    device = _worker_device(rank, dist.get_backend())
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
    device = _worker_device(rank, dist.get_backend())
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
) -> dict[str, float]:
    """Median seconds, on this rank, of one training forward + backward of a batch-norm layer on an
    input of ``shape``, synchronised (``"sync"``) and local (``"local"``); of the two bare
    collectives the synchronised layer issues (``"collectives"``: an ``all_gather`` of 2C + 1 and
    an ``all_reduce`` of 2C numbers); and of the same two collectives with ``payload_factor`` times
    as many numbers (``"collectives_large"``). The four are interleaved, so that all see the same
    machine load; the input is drawn with :func:`bnbook.seed` ``(rank)``."""
    from bnbook import seed as run_seed
    from bnbook.torch import BatchNorm2d

    device = _worker_device(rank, dist.get_backend())
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
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def worker_info(rank: int, world_size: int) -> dict[str, Any]:
    """Where this worker runs: its rank, the process group's backend and its device."""
    return {
        "rank": rank,
        "world_size": world_size,
        "backend": str(dist.get_backend()),
        "device": str(_worker_device(rank, dist.get_backend())),
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
