"""Drop-in twins of ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.functional.batch_norm``.

Written on ``torch.nn.Module`` with the book's own formulas (equations (1)–(4) forward, the compact
closed form backward of chapter ``ch-backprop``) and a hand-written ``torch.autograd.Function``;
nothing here calls torch's batch-norm modules or functions. Constructor arguments, parameter and
buffer names, ``state_dict`` layout, train/eval behaviour, ``momentum=None``, ``affine=False``,
``bias=False``, ``track_running_stats=False`` and ``num_batches_tracked`` all follow PyTorch, so a
state dict loads either way and outputs match to rounding.

Devices, dtypes and layouts follow torch too: the output has the input's dtype and memory format
(channels_last stays channels_last); a float16 or bfloat16 input, under ``torch.autocast`` or not,
is normalised with float32 statistics and arithmetic (batch norm is on no autocast cast list, so
a half input gives a half output and a float32 one a float32 output); γ, β and the running
statistics keep their own dtype. On the CPU, large spatial inputs are processed a block of samples
at a time so that temporaries stay in cache; on other devices, each step is one whole-tensor
operation.

>>> import torch
>>> from bnbook.torch import BatchNorm2d
>>> bn = BatchNorm2d(3)
>>> x = torch.randn(8, 3, 5, 5)
>>> bn(x).shape, int(bn.num_batches_tracked)
(torch.Size([8, 3, 5, 5]), 1)
>>> ref = torch.nn.BatchNorm2d(3)
>>> _ = ref.load_state_dict(bn.state_dict())
>>> bool(torch.allclose(ref.eval()(x), bn.eval()(x), atol=1e-6))
True
>>> x_cl = x.to(memory_format=torch.channels_last)
>>> bn.train()(x_cl).is_contiguous(memory_format=torch.channels_last)
True
>>> with torch.autocast("cpu", dtype=torch.bfloat16):
...     bn(x.bfloat16()).dtype, bn(x).dtype, bn.running_mean.dtype
(torch.bfloat16, torch.float32, torch.float32)
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from bnbook._checks import (
    DtypeError,
    check_channels,
    check_eps,
    check_momentum,
    check_num_features,
    check_training_size,
    shape_str,
)

__all__ = [
    "BatchNormFunction",
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
]


# Half-precision inputs are normalised with float32 statistics and arithmetic, rounded once at the
# end, as torch's kernels do; every other floating dtype computes in its own precision.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` while the twins compute: they choose their own dtypes.

    Under ``torch.autocast`` a matrix product (``torch.linalg.vecdot`` on the CPU, ``torch.mv`` on
    CUDA) would otherwise run in half precision and mix dtypes with the float32 statistics.
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout torch's batch norm gives its output: channels-last in, channels-last out."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=cl):
            return cl
    return torch.contiguous_format


def _rows_layout(x: Tensor) -> bool:
    """Whether ``x`` is best seen as (M, C) rows: one value per sample and channel (dense), or a
    channels-last layout, where a view puts each channel in a column."""
    return x.shape[2:].numel() == 1 or _memory_format(x) != torch.contiguous_format


def _as_ncl(x: Tensor) -> Tensor:
    """(N, C, *spatial) as a contiguous (N, C, L): a view when ``x`` is contiguous."""
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


def _as_rows(x: Tensor) -> Tensor:
    """(N, C, *spatial) as (M, C), one row per position: a view for (N, C) and channels-last input."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _from_rows(rows: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_as_rows`: a channels-last view of shape ``shape``."""
    return rows.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


# On the CPU, spatial inputs are processed a block of samples at a time, about this many elements
# per block (1 MiB of float32), so that temporaries stay in cache instead of costing a full-size
# allocation.
_BLOCK_ELEMENTS = 1 << 18


def _blocks(t: Tensor) -> list[slice]:
    """Slices over the batch axis, each about ``_BLOCK_ELEMENTS`` elements, on the CPU.

    A single block elsewhere: on a GPU every operation is a kernel launch, and a loop over small
    blocks launched many tiny kernels (32–140× slower than cuDNN). A single block under
    ``torch.compile`` too: the compiler fuses whole-tensor operations itself, and a Python loop
    over blocks would be unrolled into the graph.
    """
    n, c, length = t.shape
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return [slice(0, n)]
    step = max(1, _BLOCK_ELEMENTS // (c * length))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _channel_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-channel sum of an (N, C, L) tensor, L > 1, accumulated in ``dtype`` (default t's).

    On the CPU, a matrix–vector product with a ones vector over the contiguous last axis, then a sum
    over N: several times faster than ``t.sum(dim=(0, 2))``. Elsewhere, and for a half-precision
    ``t`` summed in float32, the plain reduction.
    """
    n, c, length = t.shape
    if t.device.type == "cpu" and dtype in (None, t.dtype):
        return torch.mv(t.reshape(n * c, length), t.new_ones(length)).view(n, c).sum(0)
    return t.sum(dim=(0, 2), dtype=dtype)


def _spatial_stats(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of an (N, C, L) tensor in two passes.

    Never E[x²] − E[x]²: μ first, then the mean square of x − μ, a block at a time. The residual
    Σ(x − μ), zero in exact arithmetic, measures the rounding error of μ; it corrects both μ and σ²
    (the corrected two-pass algorithm of Chan, Golub and LeVeque). Both come in float32 for a
    half-precision ``x3`` (x − μ is then float32 by type promotion).
    """
    m = x3.shape[0] * x3.shape[2]
    mean = _channel_sum(x3, _compute_dtype(x3.dtype)) / m  # (1)
    residual = torch.zeros_like(mean)
    sum_sq = torch.zeros_like(mean)
    for block in _blocks(x3):
        centered = x3[block] - mean[:, None]
        residual += _channel_sum(centered)
        sum_sq += torch.linalg.vecdot(centered, centered).sum(0)
    var = ((sum_sq - residual * residual / m) / m).clamp_(min=0)  # (2), biased
    return mean + residual / m, var


def _centered_affine(
    out: Tensor,
    x3: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor | None = None,
    dy3: Tensor | None = None,
    k: Tensor | None = None,
) -> None:
    """out = (x − μ)·scale + shift [+ k·dy], per channel, a block at a time (all (N, C, L)).

    In place in ``out`` when it has the compute dtype; for a half-precision ``out`` each block is
    computed in float32 and rounded once.
    """
    for block in _blocks(x3):
        target = out[block]
        direct = target.dtype == mean.dtype
        t = torch.sub(x3[block], mean[:, None], out=target if direct else None)
        t.mul_(scale[:, None])
        if shift is not None:
            t.add_(shift[:, None])
        if dy3 is not None:
            t.addcmul_(dy3[block], k[:, None])
        if not direct:
            target.copy_(t)


def _rows_forward(x2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Forward over (M, C) rows: y (dtype of ``x2``) and x̂, μ, 1/σ, σ² (the compute dtype)."""
    # (1), accumulated in float64: a float32 sum of values far from zero loses digits
    mean = x2.mean(0, dtype=torch.float64).to(_compute_dtype(x2.dtype))
    centered = x2 - mean  # the compute dtype, by type promotion
    var = (centered * centered).mean(0)  # (2): two passes, biased
    invstd = torch.rsqrt(var + eps)
    x_hat = centered.mul_(invstd)  # (3), in place: the centred copy is ours
    if weight is not None:
        y = torch.addcmul(bias, x_hat, weight) if bias is not None else x_hat * weight
    else:
        y = x_hat + bias if bias is not None else x_hat.clone()
    return y.to(x2.dtype), x_hat, mean, invstd, var


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with batch statistics, forward and hand-derived backward.

    ``y, mean, var = BatchNormFunction.apply(x, weight, bias, eps)`` with ``x`` of shape
    (N, C, *spatial), ``weight``/``bias`` of shape (C,) or None; ``mean`` and ``var`` (biased) are
    returned, as non-differentiable outputs, for the running-statistics update.

    Backward (chapter ``ch-backprop``), with σ = sqrt(σ²_B + ε) and m values per channel::

        dx = γ/(m σ) (m dy − Σ dy − x̂ Σ dy x̂),   dγ = Σ dy x̂,   dβ = Σ dy

    A dense input (one value per sample and channel), and a channels-last one seen as (N·H·W, C)
    rows, saves x̂; a contiguous spatial input saves x and recomputes x − μ block by block, which moves less memory than a
    full-size x̂ would. ``y`` and ``dx`` keep the dtype and memory format of ``x``; a float16 or
    bfloat16 ``x`` is normalised with float32 statistics and arithmetic (``mean`` and ``var`` are
    float32), as in torch. Autocast is off inside: the function chooses its own dtypes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        ctx.rows = _rows_layout(x)
        with _autocast_off(x.device.type):
            if ctx.rows:
                y2, x_hat, mean, invstd, var = _rows_forward(_as_rows(x), weight, bias, eps)
                y = _from_rows(y2, x.shape)
                ctx.save_for_backward(x_hat, mean, invstd, weight)
            else:
                x3 = _as_ncl(x)
                mean, var = _spatial_stats(x3)
                invstd = torch.rsqrt(var + eps)
                # (3) and (4): y = (x − μ)·a + β, a = γ/σ per channel; x − μ first keeps float32
                # accurate.
                scale = invstd if weight is None else invstd * weight
                y3 = torch.empty_like(x3)
                _centered_affine(y3, x3, mean, scale, bias)
                y = y3.view(x.shape)
                ctx.save_for_backward(x3, mean, invstd, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        saved, mean, invstd, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        k = invstd if weight is None else weight * invstd
        dx = None
        with _autocast_off(dy.device.type):
            if ctx.rows:
                x_hat, dy2 = saved, _as_rows(dy).to(mean.dtype)
                m = dy2.shape[0]
                sum_dy = dy2.sum(0)
                sum_dy_xhat = torch.linalg.vecdot(dy2.t(), x_hat.t())
                if need_dx:
                    # dx = k·dy − (k Σdy x̂ / m)·x̂ − k Σdy / m: two passes over one new tensor
                    dx = torch.addcmul(-k * sum_dy / m, x_hat, -k * sum_dy_xhat / m)
                    dx = _from_rows(dx.addcmul_(dy2, k).to(ctx.x_dtype), ctx.shape)
            else:
                x3, dy3 = saved, _as_ncl(dy)
                m = dy3.shape[0] * dy3.shape[2]
                sum_dy = _channel_sum(dy3, mean.dtype)
                sum_dy_xc = torch.zeros_like(mean)
                for block in _blocks(x3):
                    centered = x3[block] - mean[:, None]
                    sum_dy_xc += torch.linalg.vecdot(dy3[block].to(mean.dtype), centered).sum(0)
                sum_dy_xhat = sum_dy_xc * invstd
                if need_dx:
                    # dx = k·dy + j·(x − μ) + h, per channel j = −k σ⁻¹ Σdy x̂ / m, h = −k Σdy / m
                    j = -k * invstd * sum_dy_xhat / m
                    h = -k * sum_dy / m
                    dx = torch.empty_like(x3)
                    _centered_affine(dx, x3, mean, j, h, dy3, k)
                    dx = dx.view(ctx.shape)
        dw = sum_dy_xhat.to(weight.dtype) if (need_dw and weight is not None) else None
        db = sum_dy.to(ctx.bias_dtype) if (need_db and ctx.bias_dtype is not None) else None
        return dx, dw, db, None


def _check_input(input: Tensor, name: str = "input") -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise DtypeError(
            f"{name} must be a floating-point tensor, got dtype {input.dtype}; convert it "
            f"explicitly, e.g. {name}.float()"
        )
    if input.dim() < 2:
        raise ValueError(
            f"{name} must have shape (N, C) or (N, C, *spatial), got {input.dim()}D input of shape "
            f"{shape_str(input.shape)}"
        )


def _eval_transform(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """y = (x − μ) γ / sqrt(σ² + ε) + β with fixed statistics: one affine map per channel.

    Written with differentiable tensor operations, so autograd gives dx = γ/σ · dy, dγ = Σ dy x̂,
    dβ = Σ dy (and no gradient flows into the statistics, which are buffers). The output has the
    dtype and memory format of ``x``.
    """
    if x.dtype in _LOW_PRECISION:  # float32 arithmetic, rounded once, as torch does
        mean, var = mean.float(), var.float()
    # (M, C) rows for dense and channels-last input (the views' backward then gives a channels-last
    # dx too), (N, C, *spatial) broadcasting otherwise
    rows = _rows_layout(x)
    z = _as_rows(x) if rows else x.contiguous()
    per_channel = (-1,) if rows else (-1,) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var.detach() + eps)
    if weight is not None:
        scale = scale * weight
    y = (z - mean.detach().view(per_channel)) * scale.view(per_channel)
    if bias is not None:
        y = y + bias.view(per_channel)
    y = y.to(x.dtype)
    return _from_rows(y, x.shape) if rows else y


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization, with the signature and results of ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    input : Tensor, shape (N, C) or (N, C, *spatial)
    running_mean, running_var : Tensor (C,) or None
        In training mode, updated in place when given (``running_var`` with the unbiased variance);
        in evaluation mode, the statistics to normalise with (required).
    weight, bias : Tensor (C,) or None
        γ and β.
    training : bool
        Normalise with batch statistics (and update running ones) if True.
    momentum : float
        Weight of the new batch statistic in the running average.
    eps : float
        ε > 0.

    Returns
    -------
    Tensor, same shape as ``input``.

    Raises
    ------
    ValueError
        ``input`` with fewer than 2 dimensions, or one value per channel in training; ``eps`` not
        positive.
    RuntimeError
        Missing running statistics in evaluation mode; a per-channel tensor whose length is not C
        (:class:`bnbook._checks.ChannelMismatchError`, also a ValueError).
    TypeError
        Non-floating input (:class:`bnbook._checks.DtypeError`, also a RuntimeError).
    """
    _check_input(input)
    if training:
        check_training_size(input.shape)
    check_eps(eps)
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None:
            check_channels(name, t.numel(), input.shape)
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(
                    f"{name} must be defined in evaluation mode: pass a tensor of shape "
                    f"({input.shape[1]},), or training=True to use batch statistics"
                )
        return _eval_transform(input, running_mean, running_var, weight, bias, eps)

    y, mean, var = BatchNormFunction.apply(input, weight, bias, float(eps))
    if running_mean is not None or running_var is not None:
        m = input.numel() // input.shape[1]
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                unbiased = var * (m / (m - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y


class _NormBase(nn.Module):
    """What every per-channel normalisation layer of the package shares, written once.

    The constructor (torch's positional arguments, then ``bias`` keyword-only), the parameters γ
    (``weight``) and β (``bias``), the buffers ``running_mean``, ``running_var`` (unbiased) and
    ``num_batches_tracked``, ``reset_running_stats``/``reset_parameters``, ``extra_repr``,
    state-dict versioning, input checks, the momentum rule (``momentum=None`` is the cumulative
    average) and the in-place running-statistics update. Names and layout follow
    ``torch.nn.BatchNorm*d``, so a state dict loads either way.

    A variant overrides only :meth:`_forward_batch`: how training-mode statistics are computed and
    applied. Evaluation with running statistics (:meth:`_forward_running`) is the same affine map
    for every variant. Exceptions follow one policy (:mod:`bnbook._checks`): ValueError for a
    wrong rank or too few values per channel, :class:`~bnbook._checks.ChannelMismatchError` (a
    ValueError and a RuntimeError) for a wrong channel count,
    :class:`~bnbook._checks.DtypeError` for a non-floating input.
    """

    _version = 2
    _input_dims: tuple[int, ...] = ()  # allowed input ranks; () means any rank ≥ 2
    _shape_hint = "(N, C, *)"
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        check_num_features(num_features)
        check_eps(eps)
        check_momentum(momentum)
        factory = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)  # not torch's _NormBase: parameters and buffers are made here
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, γ to 1 and β to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # State dicts saved before num_batches_tracked existed (version < 2) load with a count of 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked is not None
                and self.num_batches_tracked.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        nn.Module._load_from_state_dict(
            self,
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if self._input_dims and input.dim() not in self._input_dims:
            expected = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(
                f"expected {expected} input (got {input.dim()}D input): {type(self).__name__}'s "
                f"input must have shape {self._shape_hint} with C = {self.num_features}, "
                f"got {shape_str(input.shape)}"
            )
        _check_input(input)
        check_channels(
            "running_mean" if self.track_running_stats else "weight", self.num_features, input.shape
        )

    def _uses_batch_stats(self) -> bool:
        """Batch statistics in training mode, and in eval mode without running statistics."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def _momentum_factor(self) -> float:
        """This training step's weight of the new batch statistics; counts the step.

        ``momentum``, or 1/t for ``momentum=None`` (the cumulative average over t steps); 0 when
        running statistics are not tracked.
        """
        if not (
            self.training and self.track_running_stats and self.num_batches_tracked is not None
        ):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return float(self.momentum)

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int, factor: float) -> None:
        """running ← (1 − factor)·running + factor·batch, in place and in the buffers' dtype.

        ``var`` is the biased batch variance over ``count`` values per channel; the running
        variance receives the unbiased one, var·count/(count − 1). Nothing changes for an empty
        batch (``count == 0``), as in torch.
        """
        if count == 0 or not self.training or self.running_mean is None:
            return
        with torch.no_grad():
            self.running_mean.mul_(1 - factor).add_(
                mean.detach().to(self.running_mean.dtype), alpha=factor
            )
            unbiased = var.detach() * (count / max(count - 1, 1))
            self.running_var.mul_(1 - factor).add_(
                unbiased.to(self.running_var.dtype), alpha=factor
            )

    def _forward_running(self, input: Tensor) -> Tensor:
        """Evaluation with the running statistics: one affine map per channel."""
        return _eval_transform(
            input, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        """Training-mode output; updates the running statistics with weight ``factor``."""
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self._uses_batch_stats():
            return self._forward_batch(input, self._momentum_factor())
        return self._forward_running(input)


class _BatchNorm(_NormBase, _TorchBatchNorm):
    """Common code of :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d`.

    Also an instance of ``torch.nn.modules.batchnorm._BatchNorm`` (for ``isinstance`` checks in
    torch's utilities: ``SyncBatchNorm.convert_sync_batchnorm``, ``torch.func``'s
    ``replace_all_batch_norm_modules_``, quantization's fusion), but none of its code runs: every
    method it would contribute is defined in :class:`_NormBase`.
    """

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        # Running statistics are passed only to be updated.
        track = self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            True,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over a (N, C) or (N, C, L) input; drop-in twin of ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        C.
    eps : float
        ε > 0 (default 1e-5).
    momentum : float or None
        Weight of the new batch statistic in the running average, in [0, 1]; None for the
        cumulative average (default 0.1).
    affine : bool
        Learn γ (``weight``) and β (``bias``) (default True).
    track_running_stats : bool
        Keep ``running_mean``, ``running_var`` (unbiased) and ``num_batches_tracked``; if False,
        batch statistics are used in training and evaluation (default True).
    device, dtype
        Of parameters and buffers.
    bias : bool, keyword-only
        Learn β (default True); as in ``torch.nn``.

    Shape
    -----
    Input (N, C) or (N, C, L); output the same.

    Raises
    ------
    ValueError
        Wrong number of dimensions; one value per channel in training; bad ``eps``/``momentum``.
    RuntimeError
        Channel count ≠ ``num_features`` (also a ValueError).
    """

    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over a (N, C, H, W) input, per channel over (N, H, W); twin of ``torch.nn.BatchNorm2d``.

    Arguments, errors and behaviour as :class:`BatchNorm1d`.
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    """Batch norm over a (N, C, D, H, W) input, per channel over (N, D, H, W); twin of
    ``torch.nn.BatchNorm3d``.

    Arguments, errors and behaviour as :class:`BatchNorm1d`.
    """

    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"
