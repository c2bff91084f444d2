"""The normalisation family in PyTorch: layer, RMS, group, instance and weight normalisation
(chapters ``ch-family`` and ``ch-beyond``).

Every activation norm here *standardises over some axes* and then scales and shifts (table
:data:`NORM_AXES`); one hand-written ``torch.autograd.Function`` (:func:`standardize`, the compact
backward of equation ``eq-family-backward``) serves layer, group and instance norm, a second one
(:func:`rms_norm`) RMS normalisation. The modules are drop-in twins of ``torch.nn.LayerNorm``,
``RMSNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d`` and
``torch.nn.utils.parametrizations.weight_norm`` (same arguments, parameter and buffer names, and
``state_dict``); ``tests/test_norms.py`` checks them against PyTorch to 1e-9 in float64. Instance
norm keeps running statistics like batch norm, so it is built on :class:`bnbook.torch._NormBase`;
the others keep none and share its input checks (:mod:`bnbook._checks`).

Where the rest of the family lives: the NumPy forward/backward pairs in :mod:`bnbook.norms_numpy`;
batch norm in :mod:`bnbook.torch`; its variants for small batches (ghost batch norm, batch
renormalisation, Batch Layer Normalisation, the Full Normalisation sketch) in
:mod:`bnbook.small_batch`; synchronised batch norm in :mod:`bnbook.distributed`.

>>> import torch
>>> from bnbook.norms import GroupNorm
>>> x = torch.randn(4, 6, 5, 5)
>>> GroupNorm(num_groups=3, num_channels=6)(x).shape
torch.Size([4, 6, 5, 5])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from bnbook._checks import DtypeError, check_channels, check_eps, check_positive_int
from bnbook.norms_numpy import _normalize_axes
from bnbook.torch import _memory_format, _NormBase, _update_running

__all__ = [
    "NORM_AXES",
    "standardize",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "WeightNorm",
    "weight_norm",
]

#: Which axes of an (N, C, H, W) tensor each method standardises over (group norm: within a group).
NORM_AXES: dict[str, tuple[str, ...]] = {
    "batch": ("N", "H", "W"),
    "layer": ("C", "H", "W"),
    "instance": ("H", "W"),
    "group": ("C/G", "H", "W"),
}


class _Standardize(torch.autograd.Function):
    """x̂ = (x − mean) / sqrt(var + ε) over ``dims``, or x / sqrt(mean(x²) + ε) without centring
    (RMS normalisation), with the compact backward written by hand: eq. ``eq-family-backward``,
    and for RMS normalisation the same without its −ḡ term (eq. ``eq-beyond-rms-backward``)."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...], eps: float, center: bool = True) -> Tensor:
        centered = x - x.mean(dim=dims, keepdim=True) if center else x
        invstd = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + eps)
        x_hat = centered * invstd
        ctx.save_for_backward(x_hat, invstd)
        ctx.dims, ctx.center = dims, center
        return x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_hat, invstd = ctx.saved_tensors
        g = grad - grad.mean(dim=ctx.dims, keepdim=True) if ctx.center else grad
        mean_gx = (grad * x_hat).mean(dim=ctx.dims, keepdim=True)
        return invstd * (g - x_hat * mean_gx), None, None, None


def _trailing_dims(input: Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """The dims of ``input`` that ``normalized_shape`` names (its last ones), checked as torch does."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size{list(input.shape)}"
        )
    return tuple(range(input.dim() - k, input.dim()))


def _check_tensor(x: Tensor, name: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DtypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def standardize(x: Tensor, dims: int | Sequence[int], eps: float = 1e-5) -> Tensor:
    """PyTorch twin of :func:`bnbook.norms_numpy.standardize_forward` (returns x̂ only; differentiable).

    >>> standardize(torch.randn(4, 3, 5, 5), dims=(0, 2, 3)).shape   # batch norm's x̂
    torch.Size([4, 3, 5, 5])
    """
    _check_tensor(x)
    check_eps(eps)
    dims = _normalize_axes(dims, x.dim())
    return _Standardize.apply(x, dims, float(eps))


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Twin of ``torch.nn.functional.layer_norm``."""
    _check_tensor(input)
    y = standardize(input, _trailing_dims(input, normalized_shape), eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Twin of ``torch.nn.functional.rms_norm``: ``weight · x / sqrt(mean(x²) + ε)`` over the
    trailing ``normalized_shape`` dims, differentiable through the hand-written backward of :func:`standardize` without centring.

    As in PyTorch, float16 and bfloat16 input is normalised and scaled in float32 and cast back
    once, the output has the input's dtype, and ``eps=None`` means the machine epsilon of that
    computation type (``torch.finfo``).

    >>> rms_norm(torch.randn(2, 5, 16), (16,)).shape
    torch.Size([2, 5, 16])
    """
    _check_tensor(input)
    dims = _trailing_dims(input, normalized_shape)
    compute = torch.promote_types(input.dtype, torch.float32)
    if eps is None:
        eps = torch.finfo(compute).eps
    check_eps(eps)
    y = _Standardize.apply(input.to(compute), dims, float(eps), False)
    if weight is not None:  # scaled before the cast back, as PyTorch's fused kernel does
        y = y * weight.to(compute)
    return y.to(input.dtype)


def _per_channel(p: Tensor, ndim: int) -> Tensor:
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Twin of ``torch.nn.functional.group_norm`` for input (N, C, *)."""
    _check_tensor(input)
    if input.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}"
        )
    n, c = input.shape[:2]
    if c % num_groups:
        raise RuntimeError(
            f"Expected number of channels in input to be divisible by num_groups, but got input of "
            f"shape {list(input.shape)} and num_groups={num_groups}"
        )
    # the size is spelled out: -1 is ambiguous for an empty batch (N = 0)
    grouped = input.reshape(n, num_groups, math.prod(input.shape[1:]) // num_groups)
    y = standardize(grouped, 2, eps).reshape(input.shape)
    y = y.contiguous(memory_format=_memory_format(input))  # channels-last stays so
    if weight is not None:
        y = y * _per_channel(weight, input.dim())
    if bias is not None:
        y = y + _per_channel(bias, input.dim())
    return y


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Twin of ``torch.nn.functional.instance_norm`` for input (N, C, *spatial).

    With ``use_input_stats`` each (sample, channel) is standardised over its spatial positions and, if
    running buffers are given, they move towards the *batch average* of the per-instance mean and
    unbiased variance (in place, as PyTorch does). Otherwise the running statistics are used.

    >>> instance_norm(torch.randn(2, 3, 5, 5)).shape
    torch.Size([2, 3, 5, 5])
    """
    _check_tensor(input)
    spatial = tuple(range(2, input.dim()))
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise RuntimeError(
                "Expected running_mean and running_var to be defined when use_input_stats is false"
            )
        y = (input - _per_channel(running_mean, input.dim())) * torch.rsqrt(
            _per_channel(running_var, input.dim()) + eps
        )
    else:
        per_instance = math.prod(input.shape[2:])
        if per_instance == 1 and input.shape[0] > 0:
            raise ValueError(
                "Expected more than 1 spatial element when training, got input size "
                f"{list(input.shape)}"
            )
        y = standardize(input, spatial, eps)
        with torch.no_grad():
            mean = input.mean(dim=spatial)
            var = (input - mean[(...,) + (None,) * len(spatial)]).square().mean(dim=spatial)
            count = per_instance if input.shape[0] > 0 else 0
            _update_running(running_mean, running_var, mean.mean(0), var.mean(0), count, momentum)
    if weight is not None:
        y = y * _per_channel(weight, input.dim())
    if bias is not None:
        y = y + _per_channel(bias, input.dim())
    return y


def _reset_affine(module: nn.Module) -> None:
    """``weight`` to ones and ``bias`` to zeros, where the module has them."""
    if getattr(module, "weight", None) is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class _TrailingNorm(nn.Module):
    """What :class:`LayerNorm` and :class:`RMSNorm` share: a normalised trailing shape, an
    elementwise ``weight`` (ones) and, for layer norm, ``bias`` (zeros), as in ``torch.nn``."""

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype) -> None:
        super().__init__()
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.ones(shape, **kw)) if elementwise_affine else None
        self.register_parameter("weight", weight)
        if bias is not None:  # layer norm: β, or None in its place; RMS norm has none
            beta = nn.Parameter(torch.zeros(shape, **kw)) if bias and elementwise_affine else None
            self.register_parameter("bias", beta)

    def reset_parameters(self) -> None:
        """``weight`` to ones and ``bias`` to zeros (as PyTorch's ``reset_parameters``)."""
        _reset_affine(self)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class LayerNorm(_TrailingNorm):
    """Drop-in twin of ``torch.nn.LayerNorm`` built on :func:`standardize`.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        Trailing shape to normalise over.
    eps : float
    elementwise_affine : bool
        Learn ``weight`` (ones) and ``bias`` (zeros) of shape ``normalized_shape``.
    bias : bool
        Learn the bias (only if ``elementwise_affine``).

    Shape
    -----
    Input ``(*, *normalized_shape)``; output the same.

    >>> LayerNorm((3, 5, 5))(torch.randn(4, 3, 5, 5)).shape
    torch.Size([4, 3, 5, 5])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(_TrailingNorm):
    """Drop-in twin of ``torch.nn.RMSNorm`` built on :func:`rms_norm` (chapter ``ch-beyond``).

    Parameters
    ----------
    normalized_shape : int or sequence of int
        Trailing shape to normalise over.
    eps : float or None
        ε > 0; None (the default, as in PyTorch) takes ``torch.finfo`` of the computation dtype
        at every call.
    elementwise_affine : bool
        Learn ``weight`` (ones) of shape ``normalized_shape``. There is no bias.

    Shape
    -----
    Input ``(*, *normalized_shape)``; output the same.

    Raises
    ------
    ValueError
        ``eps`` is given and not a positive number.

    >>> RMSNorm(16)(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if eps is not None:
            check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, None, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


class GroupNorm(nn.Module):
    """Drop-in twin of ``torch.nn.GroupNorm``.

    Parameters
    ----------
    num_groups : int
        G, a divisor of ``num_channels``.
    num_channels : int
    eps : float
    affine : bool
        Learn a per-channel ``weight`` and ``bias``.

    Shape
    -----
    Input ``(N, C, *)``; output the same.

    Raises
    ------
    ValueError
        ``num_groups`` does not divide ``num_channels``.

    >>> GroupNorm(2, 4)(torch.randn(3, 4, 6, 6)).shape
    torch.Size([3, 4, 6, 6])
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_eps(eps)
        check_positive_int("num_groups", num_groups)
        check_positive_int("num_channels", num_channels)
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels must be divisible by num_groups, got num_channels={num_channels} and "
                f"num_groups={num_groups}"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **kw))
            self.bias = nn.Parameter(torch.zeros(num_channels, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """``weight`` to ones and ``bias`` to zeros (as PyTorch's ``reset_parameters``)."""
        _reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.dim() >= 2:
            check_channels(
                "weight" if self.affine else "num_channels", self.num_channels, input.shape
            )
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class _InstanceNorm(_NormBase):
    """Shared body of :class:`InstanceNorm1d`/``2d``/``3d`` (PyTorch's ``_InstanceNorm``).

    The base's constructor with torch's defaults for instance norm (``affine=False``,
    ``track_running_stats=False``), its buffers, state dict and checks; training normalises each
    (sample, channel) over its positions (:func:`instance_norm`). Two departures from batch norm,
    both PyTorch's: ``num_batches_tracked`` is registered but never counted, and
    ``momentum=None`` means *no* update (PyTorch passes 0.0), not the cumulative average. An
    unbatched input (C, *spatial) is normalised as a batch of one.
    """

    _spatial_dims = 2

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        # torch's positional order (eps, momentum, affine, track_running_stats, device, dtype),
        # with instance norm's defaults for the two flags
        for position, name in ((2, "affine"), (3, "track_running_stats")):
            if len(args) <= position:
                kwargs.setdefault(name, False)
        super().__init__(num_features, *args, **kwargs)

    def _momentum_factor(self) -> float:
        if not (self.training and self.track_running_stats):
            return 0.0
        return float(self.momentum or 0.0)

    def _forward_batch(self, input: Tensor, factor: float) -> Tensor:
        running = (self.running_mean, self.running_var) if factor else (None, None)
        return instance_norm(input, *running, self.weight, self.bias, True, factor, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.dim() == self._spatial_dims + 1:
            return super().forward(input.unsqueeze(0)).squeeze(0)
        return super().forward(input)


class InstanceNorm1d(_InstanceNorm):
    """Twin of ``torch.nn.InstanceNorm1d``: input (N, C, L) or (C, L)."""

    _spatial_dims = 1
    _input_dims = (3,)
    _shape_hint = "(N, C, L) or (C, L)"


class InstanceNorm2d(_InstanceNorm):
    """Twin of ``torch.nn.InstanceNorm2d``: input (N, C, H, W) or (C, H, W).

    Defaults as PyTorch's: ``affine=False``, ``track_running_stats=False``. With running statistics,
    training updates them with the batch average of the per-instance statistics (unbiased variance)
    and evaluation uses them (the base's affine map, so it folds like batch norm).

    >>> InstanceNorm2d(3)(torch.randn(2, 3, 5, 5)).shape
    torch.Size([2, 3, 5, 5])
    """

    _spatial_dims = 2
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W) or (C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    """Twin of ``torch.nn.InstanceNorm3d``: input (N, C, D, H, W) or (C, D, H, W)."""

    _spatial_dims = 3
    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W) or (C, D, H, W)"


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Weight normalisation (PyTorch)
# --------------------------------------------------------------------------------------------


class WeightNorm(nn.Module):
    """The parametrisation ``w = g · v / ‖v‖`` (norm over every dim but ``dim``), written with plain
    tensor operations; twin of the module behind ``torch.nn.utils.parametrizations.weight_norm``."""

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        self.dim = -1 if dim is None else dim

    def _norm(self, v: Tensor) -> Tensor:
        if self.dim == -1:
            return v.norm()
        dims = tuple(a for a in range(v.dim()) if a != self.dim)
        return (v * v).sum(dim=dims, keepdim=True).sqrt()

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        return weight_v * (weight_g / self._norm(weight_v))

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(weight), weight


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``g · v / ‖v‖``, exactly like
    ``torch.nn.utils.parametrizations.weight_norm`` (same ``state_dict`` keys
    ``parametrizations.<name>.original0`` = g and ``original1`` = v).

    Parameters
    ----------
    module : nn.Module
    name : str
        The parameter to reparametrise.
    dim : int or None
        The dim kept by the norm (0: one magnitude per output unit); None: one scalar for the tensor.

    Returns
    -------
    nn.Module
        ``module``, modified in place.

    >>> conv = weight_norm(nn.Conv2d(1, 4, 3))
    >>> conv.parametrizations.weight.original0.shape
    torch.Size([4, 1, 1, 1])
    """
    parametrize.register_parametrization(module, name, WeightNorm(dim), unsafe=True)
    return module
