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

What "drop-in" covers is tested, not claimed: PyTorch's own generic module tests over its
``module_db`` entries for BatchNorm1d/2d/3d (``tests/test_pytorch_modules.py``) and the batch-norm
tests of its ``test_nn.py`` (``tests/test_pytorch_nn.py``) run on the twins and on ``torch.nn``
side by side. The backward is differentiable (Hessians, gradient penalties), works under
``torch.func`` (``vmap``, ``grad``, ``jacrev``, ``jvp``), with batched gradients, in forward-mode
AD and under ``torch.compile(fullgraph=True)``; an empty batch (N = 0) works as in torch. The twins
are ``torch.nn.modules.batchnorm._BatchNorm`` instances for torch's utilities. Not covered:
``torch.jit.script`` (the backward is a Python ``autograd.Function``; the error says so and
suggests ``torch.compile``).

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

import numbers
import operator

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from bnbook._checks import (
    DtypeError,
    check_channels,
    check_training_size,
    shape_str,
)
from bnbook.autograd import (  # noqa: F401 (_memory_format is shared with bnbook.norms)
    _LOW_PRECISION,
    BatchNormFunction,
    _as_rows,
    _autocast_off,
    _batch_norm_function,
    _cast,
    _compute_dtype,
    _from_rows,
    _memory_format,
    _per_channel,
    _rows_layout,
    _whole_tensor,
)

__all__ = [
    "BatchNormFunction",
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
]


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


def _check_eps_for(eps: float, training: bool) -> float:
    """``eps`` as a float: positive in training, non-negative in evaluation (as torch checks it at
    the forward, not in the constructor)."""
    eps = float(eps)
    if training and not eps > 0:
        raise ValueError(
            f"eps must be positive during training (it keeps 1/sqrt(var + eps) finite), got {eps}"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    return eps


def _check_no_forward_grad(input: Tensor, *stats: Tensor | None) -> None:
    """Torch's rule: with a forward-mode tangent on the input, the running statistics (buffers,
    never differentiated) must carry none."""
    if fwAD._current_level < 0:  # no dual level open: no tensor can carry a tangent
        return
    if fwAD.unpack_dual(input).tangent is None:
        return
    for t in stats:
        if t is not None and fwAD.unpack_dual(t).tangent is not None:
            raise RuntimeError(
                "batch_norm is not differentiable wrt running_mean and running_var, they cannot "
                "have forward grad defined"
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
    dβ = Σ dy, to any order and in forward mode (no gradient flows into the statistics, which are
    buffers). The output has the dtype and memory format of ``x``; a half-precision ``x`` is
    computed in float32 and rounded once, whatever the dtype of the statistics and parameters.
    """
    cdt = _compute_dtype(x.dtype)
    # (M, C) rows for dense and channels-last input (the views' backward then gives a channels-last
    # dx too), (N, C, *spatial) broadcasting otherwise
    rows = _rows_layout(x) and not _whole_tensor(x)
    z = _as_rows(x) if rows else x
    view = (-1,) if rows else _per_channel(x)
    scale = torch.rsqrt(var.detach().to(cdt) + eps)
    if weight is not None:
        scale = scale * weight.to(cdt)
    y = (z.to(cdt) - mean.detach().to(cdt).view(view)) * scale.view(view)
    if bias is not None:
        y = y + bias.to(cdt).view(view)
    y = y.to(x.dtype)
    return _from_rows(y, x.shape) if rows else y


def _empty_batch(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The output for a batch with no values (N = 0), as torch gives it: an empty tensor still
    connected to γ and β (whose gradients are then zeros)."""
    view = _per_channel(input)
    y = input.clone()
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y.to(input.dtype)


def _batch_norm_train(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    factor: float,
    eps: float,
) -> Tensor:
    """Training-mode batch norm on checked arguments; updates the running statistics in place."""
    if input.numel() == 0:
        return _empty_batch(input, weight, bias)
    y, mean, var = _batch_norm_function().apply(input, weight, bias, eps)
    _update_running(running_mean, running_var, mean, var, input.numel() // input.shape[1], factor)
    return y


def _update_running(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    factor: float,
) -> None:
    """running ← (1 − factor)·running + factor·batch, in place and in the buffers' dtype.

    ``var`` is the biased batch variance over ``count`` values per channel; the running variance
    receives the unbiased one, var·count/(count − 1). Nothing changes without running statistics
    or for an empty batch (``count == 0``), as in torch. The one update of every layer and
    functional form of the package that keeps running statistics.
    """
    if running_mean is None or running_var is None or count == 0:
        return
    # detached values (no graph, no forward-mode tangent) into buffers that need no gradient:
    # no no_grad() needed; both buffers in one call
    unbiased = var.detach() * (count / max(count - 1, 1))
    stats = (_cast(mean.detach(), running_mean.dtype), _cast(unbiased, running_var.dtype))
    torch._foreach_lerp_((running_mean, running_var), stats, factor)


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

    Equations (1)–(4) (``eq-bn-mean`` … ``eq-bn-scale-shift``, chapter ``ch-transform``) in
    training, the per-channel affine map of chapter ``ch-inference`` in evaluation; the backward is
    :class:`BatchNormFunction`'s (chapter ``ch-backprop``).

    Parameters
    ----------
    input : Tensor, shape (N, C) or (N, C, *spatial)
        Any floating dtype; N = 0 gives an empty output and leaves the running statistics alone.
    running_mean, running_var : Tensor (C,) or None
        In training mode, updated in place when given (``running_var`` with the unbiased variance);
        both or neither. In evaluation mode, the statistics to normalise with (required).
    weight, bias : Tensor (C,) or None
        γ and β.
    training : bool
        Normalise with batch statistics (and update running ones) if True.
    momentum : float
        Weight of the new batch statistic in the running average.
    eps : float
        ε: positive in training, non-negative in evaluation.

    Returns
    -------
    Tensor, same shape, dtype and memory format as ``input``.

    Raises
    ------
    ValueError
        ``input`` with fewer than 2 dimensions, or one value per channel in training; ``eps`` not
        positive (training) or negative (evaluation); only one of ``running_mean`` and
        ``running_var`` given in training.
    RuntimeError
        Missing running statistics in evaluation mode; a per-channel tensor whose length is not C
        (:class:`bnbook._checks.ChannelMismatchError`, also a ValueError); a running statistic
        carrying a forward-mode tangent.
    NotImplementedError
        Non-floating input (:class:`bnbook._checks.DtypeError`, also a TypeError).

    Examples
    --------
    >>> x = torch.randn(8, 3, 4, 4)
    >>> mean, var = torch.zeros(3), torch.ones(3)
    >>> batch_norm(x, mean, var, training=True).shape, bool(mean.abs().sum() > 0)
    (torch.Size([8, 3, 4, 4]), True)
    """
    _check_input(input)
    if training:
        check_training_size(input.shape)
    eps = _check_eps_for(eps, training)
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None:
            check_channels(name, t.numel(), input.shape)
    _check_no_forward_grad(input, running_mean, running_var)
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(
                    f"{name} must be defined in evaluation mode: pass a tensor of shape "
                    f"({input.shape[1]},), or training=True to use batch statistics"
                )
        return _eval_transform(input, running_mean, running_var, weight, bias, eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None: got "
            f"running_mean={'None' if running_mean is None else 'a tensor'}, "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    return _batch_norm_train(input, running_mean, running_var, weight, bias, float(momentum), eps)


def _lenient_num_features(num_features) -> int:
    """``num_features`` as an int: any integer (a NumPy one too) ≥ 0, as torch accepts."""
    if isinstance(num_features, bool) or not hasattr(num_features, "__index__"):
        raise TypeError(
            f"num_features must be an int (the channel count C), got "
            f"{type(num_features).__name__} {num_features!r}"
        )
    value = operator.index(num_features)
    if value < 0:
        raise ValueError(f"num_features must be a non-negative int, got {value}")
    return value


def _lenient_eps(eps) -> None:
    """Any real number (torch checks its sign at the forward: positive in training)."""
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, Tensor)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    if isinstance(eps, Tensor) and eps.numel() != 1:
        raise TypeError(f"eps must be a number or a 1-element tensor, got shape {tuple(eps.shape)}")


def _lenient_momentum(momentum) -> None:
    """None, or a real number in [0, 1]: a Python or NumPy scalar, or a 0-dim tensor."""
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (numbers.Real, Tensor)):
        raise TypeError(
            f"momentum must be None (cumulative average) or a number in [0, 1], got "
            f"{type(momentum).__name__} {momentum!r}"
        )
    if isinstance(momentum, Tensor) and momentum.numel() != 1:
        raise TypeError(
            f"momentum must be a number or a 1-element tensor, got shape {tuple(momentum.shape)}"
        )
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be None (cumulative average) or a number in [0, 1], got {momentum!r}"
        )


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
        num_features = _lenient_num_features(num_features)
        _lenient_eps(eps)
        _lenient_momentum(momentum)
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

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: bnbook's layers compute their "
            "backward in a Python torch.autograd.Function (the hand-derived formula of chapter "
            "ch-backprop), which TorchScript does not support. Use torch.compile(model) to compile "
            "a model holding them (or torch.jit.trace), or torch.nn's own layer for TorchScript."
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
        if self.track_running_stats or self.affine:
            # without γ, β and running statistics nothing fixes the channel count, and torch
            # normalises whatever it receives
            check_channels(
                "running_mean" if self.track_running_stats else "weight",
                self.num_features,
                input.shape,
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
        """:func:`_update_running` on this layer's buffers, in training mode only."""
        if self.training:
            _update_running(self.running_mean, self.running_var, mean, var, count, factor)

    def _forward_running(self, input: Tensor) -> Tensor:
        """Evaluation with the running statistics: one affine map per channel."""
        return _eval_transform(
            input, self.running_mean, self.running_var, self.weight, self.bias, float(self.eps)
        )

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        """Training-mode output; updates the running statistics with weight ``factor``."""
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self._uses_batch_stats():
            check_training_size(input.shape)
            _check_eps_for(self.eps, True)
            _check_no_forward_grad(input, self.running_mean, self.running_var)
            return self._forward_batch(input, self._momentum_factor())
        _check_eps_for(self.eps, False)
        _check_no_forward_grad(input, self.running_mean, self.running_var)
        return self._forward_running(input)


class _BatchNorm(_NormBase, _TorchBatchNorm):
    """Common code of :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d`.

    Also an instance of ``torch.nn.modules.batchnorm._BatchNorm`` (for ``isinstance`` checks in
    torch's utilities: ``SyncBatchNorm.convert_sync_batchnorm``, ``torch.func``'s
    ``replace_all_batch_norm_modules_``, quantization's fusion), but none of its code runs: every
    method it would contribute is defined in :class:`_NormBase`.
    """

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        # Arguments are checked in forward; running statistics are passed only to be updated.
        track = self.training and self.track_running_stats
        return _batch_norm_train(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            factor,
            float(self.eps),
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over a (N, C) or (N, C, L) input; drop-in twin of ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        C (a Python or NumPy integer ≥ 0).
    eps : float
        ε (default 1e-5). Any real number is accepted here, as in torch; the forward requires
        ε > 0 in training and ε ≥ 0 in evaluation.
    momentum : float, 0-dim tensor or None
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
    Input (N, C) or (N, C, L), N ≥ 0; output the same. With ``affine=False`` and
    ``track_running_stats=False`` any C is normalised, as in torch.

    Raises
    ------
    TypeError
        ``num_features``, ``eps`` or ``momentum`` of a non-numeric type.
    ValueError
        Wrong number of dimensions; one value per channel in training; ``eps`` ≤ 0 in training
        (< 0 in evaluation); ``momentum`` outside [0, 1]; negative ``num_features``.
    RuntimeError
        Channel count ≠ ``num_features`` (also a ValueError); a forward-mode tangent on the
        running statistics; ``torch.jit.script`` (not supported: use ``torch.compile``).
    NotImplementedError
        Integer input (:class:`bnbook._checks.DtypeError`, also a TypeError).

    Examples
    --------
    >>> bn = BatchNorm1d(4)
    >>> bn(torch.randn(16, 4)).shape, bn(torch.randn(0, 4, 3)).shape, int(bn.num_batches_tracked)
    (torch.Size([16, 4]), torch.Size([0, 4, 3]), 2)
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
