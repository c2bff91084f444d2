"""Batch norm across devices: the synchronised layer and the combination of statistics it rests on
(chapter ``ch-distributed``).

With data parallelism each of k workers sees b samples, and plain batch norm normalises with the
statistics of those b samples only. :class:`SyncBatchNorm` normalises with the statistics of all
k·b samples instead, so k workers compute exactly what one process computes on the concatenated
batch. Per training step and per layer it communicates

* forward: each worker's per-channel count, mean and M2 = Σ(x − μ)² — one ``all_gather`` of 2C + 1
  numbers per worker, combined on every worker with Chan's parallel formula (:func:`chan_combine`,
  label ``eq-distributed-chan``), never as a raw sum of squares, which cancels catastrophically;
* backward: the two per-channel sums Σ dy and Σ dy·x̂ — one ``all_reduce`` of 2C numbers.

It runs on CPUs with the ``gloo`` backend (where ``torch.nn.SyncBatchNorm`` refuses to train) and on
GPUs with ``nccl``, one GPU per worker. It is a :class:`bnbook.torch._BatchNorm`: constructor,
parameters, buffers, ``state_dict``, checks, the momentum rule and the running-statistics update are
the base's; outside training, or when no process group is initialised, it *is*
:class:`bnbook.torch.BatchNorm2d`'s computation. Any input (N, C, *) with at least two dimensions
works, and a worker's shard may be empty (N = 0).

Starting the processes is :mod:`bnbook.launch`'s job; what the chapter's processes run is in
:mod:`bnbook.distributed_workers`.

>>> import torch
>>> from bnbook.distributed import SyncBatchNorm, convert_sync_batchnorm
>>> net = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
>>> type(net[1]).__name__, net[1](torch.randn(2, 4, 5, 5)).shape   # no process group: plain BN
('SyncBatchNorm', torch.Size([2, 4, 5, 5]))
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnbook._checks import check_training_size
from bnbook.torch import _BatchNorm

__all__ = [
    "local_stats",
    "chan_combine",
    "combine_stats",
    "SyncBatchNormFunction",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "bytes_per_step",
]

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
        check_training_size((int(n), channels))  # n values per channel over all workers
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

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        # torch.nn.SyncBatchNorm's positional order puts process_group sixth, before device
        if len(args) > 4:
            args, process_group = args[:4] + args[5:], args[4]
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super()._forward_batch(input, factor)  # one process: plain batch norm
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        y, mean, var, count = SyncBatchNormFunction.apply(
            input, self.weight, self.bias, float(self.eps), group
        )
        self._update_running_stats(mean, var, int(count[0]), factor)
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
