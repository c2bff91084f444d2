"""The normalisation family: layer, instance, group, weight normalisation, batch renormalisation,
and the two recent methods the source article names (chapter ``ch-family``).

One idea carries the first four: every activation norm *standardises over some axes* and then
scales and shifts. Batch norm standardises an ``(N, C, H, W)`` tensor over ``(N, H, W)``, layer norm
over ``(C, H, W)``, instance norm over ``(H, W)`` and group norm over ``(C/G, H, W)`` after splitting the
channels into ``G`` groups. So one forward/backward pair, :func:`standardize_forward` /
:func:`standardize_backward`, with the compact backward

.. math::

    \\frac{\\partial \\ell}{\\partial x} = \\frac{1}{\\sqrt{\\sigma^2+\\epsilon}}
    \\Big(g - \\overline{g} - \\hat x\\,\\overline{g\\,\\hat x}\\Big),
    \\qquad g = \\frac{\\partial \\ell}{\\partial \\hat x},

(bars are means over the normalised axes; label ``eq-family-backward``) serves all of them, in NumPy
and as one hand-written ``torch.autograd.Function``.

RMS normalisation (chapter ``ch-beyond``) drops the centring: ``x̂ = x / sqrt(mean(x²) + ε)``, whose
backward is the formula above without its ``−ḡ`` term; :func:`rms_norm_forward` /
:func:`rms_norm_backward` and a second hand-written ``torch.autograd.Function`` implement it.

The PyTorch modules are drop-in twins of ``torch.nn.LayerNorm``, ``RMSNorm``, ``GroupNorm``,
``InstanceNorm1d/2d/3d`` and ``torch.nn.utils.parametrizations.weight_norm`` (same arguments, parameter
and buffer names, and ``state_dict``); ``tests/test_norms.py`` checks them against PyTorch to 1e-9 in
float64. Batch
renormalisation :class:`BatchRenorm2d`, :class:`BatchLayerNorm` and :class:`FullNormSketch` have no
PyTorch counterpart; what each follows, and where it departs from its paper, is in its docstring.

>>> import torch
>>> from bnbook.norms import GroupNorm
>>> x = torch.randn(4, 6, 5, 5)
>>> GroupNorm(num_groups=3, num_channels=6)(x).shape
torch.Size([4, 6, 5, 5])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize

from bnbook._checks import (
    ChannelMismatchError,
    DtypeError,
    check_eps,
    check_grad_shape,
    check_momentum,
    check_num_features,
    shape_str,
)
from bnbook.torch import BatchNormFunction

__all__ = [
    # NumPy
    "StandardizeCache",
    "standardize_forward",
    "standardize_backward",
    "NormCache",
    "layer_norm_forward",
    "layer_norm_backward",
    "RMSNormCache",
    "rms_norm_forward",
    "rms_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm_forward",
    "instance_norm_backward",
    "WeightNormCache",
    "weight_norm_forward",
    "weight_norm_backward",
    # PyTorch
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
    "renorm_limits",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchLayerNorm",
    "FullNormSketch",
    "NORM_AXES",
    "FAMILY_METHODS",
    "StackedHead",
    "family_cnn",
    "train_family",
]

#: Which axes of an (N, C, H, W) tensor each method standardises over (group norm: within a group).
NORM_AXES: dict[str, tuple[str, ...]] = {
    "batch": ("N", "H", "W"),
    "layer": ("C", "H", "W"),
    "instance": ("H", "W"),
    "group": ("C/G", "H", "W"),
}


# ============================================================================================
# NumPy: one standardisation, four norms
# ============================================================================================


def _check_float(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise DtypeError(
            f"{name} must be a floating-point array, got dtype {x.dtype}; convert it explicitly, "
            f"e.g. {name}.astype(np.float64)"
        )
    return x


def _normalize_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    if not axes:
        raise ValueError("axes must name at least one axis to standardise over, got ()")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array with {ndim} dimensions")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axes must not repeat an axis, got {axes}")
    return tuple(sorted(out))


class StandardizeCache(NamedTuple):
    """What :func:`standardize_backward` needs: x̂ and 1/sqrt(σ² + ε) (kept with size-1 axes)."""

    x_hat: np.ndarray  #: the standardised input, same shape as x
    invstd: np.ndarray  #: 1/sqrt(σ² + ε), x's shape with the normalised axes set to 1
    axes: tuple[int, ...]  #: the axes the statistics were taken over


def standardize_forward(
    x: np.ndarray, axes: int | Sequence[int], eps: float = 1e-5
) -> tuple[np.ndarray, StandardizeCache]:
    """Subtract the mean and divide by sqrt(variance + ε), statistics taken over ``axes``.

    Batch norm of an (N, C, H, W) array is ``axes=(0, 2, 3)``, layer norm ``(1, 2, 3)``, instance norm
    ``(2, 3)``; group norm reshapes first (:func:`group_norm_forward`). The variance is the biased one
    (divide by the count), computed in two passes.

    Parameters
    ----------
    x : ndarray, any shape
        Floating-point input.
    axes : int or sequence of int
        Axes to take the mean and variance over.
    eps : float
        ε > 0.

    Returns
    -------
    x_hat : ndarray, same shape as ``x``
    cache : StandardizeCache

    Raises
    ------
    TypeError
        ``x`` is not floating point.
    ValueError
        An axis is out of range or repeated, or ``eps <= 0``.

    >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 3, 5, 5))
    >>> x_hat, cache = standardize_forward(x, axes=(1, 2, 3))   # layer norm: one mean per sample
    >>> x_hat.shape, cache.invstd.shape
    ((4, 3, 5, 5), (4, 1, 1, 1))
    """
    x = _check_float(x, "x")
    axes = _normalize_axes(axes, x.ndim)
    check_eps(eps)
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = np.square(centered).mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = centered * invstd
    return x_hat, StandardizeCache(x_hat=x_hat, invstd=invstd, axes=axes)


def standardize_backward(dx_hat: np.ndarray, cache: StandardizeCache) -> np.ndarray:
    """∂ℓ/∂x from ∂ℓ/∂x̂: ``invstd · (g − mean(g) − x̂ · mean(g · x̂))`` over the cached axes.

    This is the compact backward of chapter ``ch-backprop`` with "the batch" replaced by "the
    normalised axes" (equation ``eq-family-backward``).

    Raises
    ------
    ValueError
        ``dx_hat`` does not have the shape of the forward input.
    """
    dx_hat = check_grad_shape(dx_hat, cache.x_hat.shape, "dx_hat")
    x_hat, axes = cache.x_hat, cache.axes
    mean_g = dx_hat.mean(axis=axes, keepdims=True)
    mean_gx = (dx_hat * x_hat).mean(axis=axes, keepdims=True)
    return cache.invstd * (dx_hat - mean_g - x_hat * mean_gx)


class NormCache(NamedTuple):
    """Cache of the layer/group/instance norm forward passes."""

    std: StandardizeCache  #: the standardisation (of the reshaped input, for group norm)
    x_shape: tuple[int, ...]  #: shape of the input
    weight: np.ndarray | None  #: the scale used (None: no affine scale)
    has_bias: bool
    kind: str  #: "layer" or "group"


def layer_norm_forward(
    x: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, NormCache]:
    """Layer norm: standardise over the trailing ``normalized_shape`` axes of each sample, then
    scale and shift elementwise (the convention of ``torch.nn.functional.layer_norm``).

    Parameters
    ----------
    x : ndarray, shape (*, *normalized_shape)
    normalized_shape : int or sequence of int
        The trailing shape to normalise over; for a conv activation (N, C, H, W) that is (C, H, W).
    weight, bias : ndarray of shape ``normalized_shape``, optional
        Elementwise scale and shift.
    eps : float

    Returns
    -------
    y : ndarray, shape of ``x``
    cache : NormCache

    Raises
    ------
    ValueError
        The trailing shape of ``x`` or the shape of ``weight``/``bias`` is not ``normalized_shape``.

    >>> x = np.random.default_rng(0).normal(size=(4, 3, 5, 5))
    >>> y, cache = layer_norm_forward(x, (3, 5, 5))
    >>> y.shape, np.round(y.reshape(4, -1).mean(axis=1), 12) + 0.0
    ((4, 3, 5, 5), array([0., 0., 0., 0.]))
    """
    x = _check_float(x, "x")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected x with shape [*, "
            f"{', '.join(map(str, shape))}], but got shape {shape_str(x.shape)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and np.shape(p) != shape:
            raise ValueError(
                f"{name} must have shape {shape_str(shape)}, got {shape_str(np.shape(p))}"
            )
    x_hat, std = standardize_forward(x, tuple(range(x.ndim - k, x.ndim)), eps)
    y = x_hat if weight is None else x_hat * weight
    if bias is not None:
        y = y + bias
    cache = NormCache(
        std, x.shape, None if weight is None else np.asarray(weight), bias is not None, "layer"
    )
    return y, cache


def _norm_backward(dy: np.ndarray, cache: NormCache):
    dy = check_grad_shape(dy, cache.x_shape)
    x_hat = cache.std.x_hat.reshape(cache.x_shape)
    if cache.kind == "layer":
        lead = tuple(range(dy.ndim - len(cache.std.axes)))
        p_shape = None
    else:  # per channel: sum over every axis but 1, broadcast along axis 1
        lead = (0, *range(2, dy.ndim))
        p_shape = (1, cache.x_shape[1]) + (1,) * (dy.ndim - 2)
    dweight = (dy * x_hat).sum(axis=lead) if cache.weight is not None else None
    dbias = dy.sum(axis=lead) if cache.has_bias else None
    if cache.weight is None:
        dx_hat = dy
    else:
        w = cache.weight if p_shape is None else cache.weight.reshape(p_shape)
        dx_hat = dy * w
    dx = standardize_backward(dx_hat.reshape(cache.std.x_hat.shape), cache.std)
    return dx.reshape(cache.x_shape), dweight, dbias


def layer_norm_backward(dy: np.ndarray, cache: NormCache):
    """Gradients of layer norm: returns ``(dx, dweight, dbias)`` (``None`` for an absent parameter).

    ``dweight = Σ_samples dy·x̂``, ``dbias = Σ_samples dy``, and ``dx`` is
    :func:`standardize_backward` of ``dy·weight``.
    """
    return _norm_backward(dy, cache)


# --------------------------------------------------------------------------------------------
# RMS normalisation (NumPy): no centring
# --------------------------------------------------------------------------------------------


class RMSNormCache(NamedTuple):
    """What :func:`rms_norm_backward` needs: x̂ = x / rms and 1/rms (kept with size-1 axes)."""

    x_hat: np.ndarray  #: x / sqrt(mean(x²) + ε), same shape as x
    inv_rms: np.ndarray  #: 1 / sqrt(mean(x²) + ε), x's shape with the normalised axes set to 1
    axes: tuple[int, ...]  #: the trailing axes the mean square was taken over
    weight: np.ndarray | None  #: the elementwise scale used (None: none)


def _rms_eps(eps: float | None, dtype) -> float:
    """ε, or its default: the machine epsilon of the dtype the statistics are computed in."""
    if eps is None:
        return float(np.finfo(np.promote_types(dtype, np.float32)).eps)
    check_eps(eps)
    return float(eps)


def rms_norm_forward(
    x: np.ndarray,
    normalized_shape: int | Sequence[int],
    weight: np.ndarray | None = None,
    eps: float | None = None,
) -> tuple[np.ndarray, RMSNormCache]:
    """RMS norm: divide by the root mean square over the trailing ``normalized_shape`` axes, then
    scale elementwise (the convention of ``torch.nn.functional.rms_norm``; no mean, no shift).

    ``y = weight · x / sqrt(mean(x²) + ε)``, equation ``eq-beyond-rms`` of chapter ``ch-beyond``.

    Parameters
    ----------
    x : ndarray, shape (*, *normalized_shape)
    normalized_shape : int or sequence of int
        The trailing shape to normalise over (for a Transformer's tokens, the model width d).
    weight : ndarray of shape ``normalized_shape``, optional
        Elementwise scale.
    eps : float or None
        ε > 0; None takes PyTorch's default, the machine epsilon of ``x``'s floating type
        (of float32 for float16 input).

    Returns
    -------
    y : ndarray, shape of ``x``
    cache : RMSNormCache

    Raises
    ------
    TypeError
        ``x`` is not floating point.
    ValueError
        The trailing shape of ``x`` or the shape of ``weight`` is not ``normalized_shape``, or
        ``eps <= 0``.

    >>> x = np.random.default_rng(0).normal(3.0, 1.0, size=(4, 8))
    >>> y, cache = rms_norm_forward(x, 8)
    >>> y.shape, np.round((y**2).mean(axis=1), 6), bool(abs(y.mean()) > 0.5)   # not centred
    ((4, 8), array([1., 1., 1., 1.]), True)
    """
    x = _check_float(x, "x")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected x with shape [*, "
            f"{', '.join(map(str, shape))}], but got shape {shape_str(x.shape)}"
        )
    if weight is not None and np.shape(weight) != shape:
        raise ValueError(
            f"weight must have shape {shape_str(shape)}, got {shape_str(np.shape(weight))}"
        )
    axes = tuple(range(x.ndim - k, x.ndim))
    inv_rms = 1.0 / np.sqrt(np.square(x).mean(axis=axes, keepdims=True) + _rms_eps(eps, x.dtype))
    x_hat = x * inv_rms
    w = None if weight is None else np.asarray(weight)
    y = x_hat if w is None else x_hat * w
    return y, RMSNormCache(x_hat=x_hat, inv_rms=inv_rms, axes=axes, weight=w)


def rms_norm_backward(dy: np.ndarray, cache: RMSNormCache) -> tuple[np.ndarray, np.ndarray | None]:
    """Gradients of RMS norm: ``(dx, dweight)`` (``dweight`` is None without a weight).

    With ``d = dy·weight`` and means over the normalised axes,
    ``dx = (1/rms) · (d − x̂ · mean(d·x̂))`` (equation ``eq-beyond-rms-backward``): layer norm's
    backward without its ``− mean(d)`` term, because nothing was subtracted. ``dweight`` sums
    ``dy·x̂`` over the leading axes.

    Raises
    ------
    ValueError
        ``dy`` does not have the shape of the forward input.
    """
    dy = check_grad_shape(dy, cache.x_hat.shape)
    x_hat, axes = cache.x_hat, cache.axes
    lead = tuple(range(dy.ndim - len(axes)))
    dweight = None if cache.weight is None else (dy * x_hat).sum(axis=lead)
    d = dy if cache.weight is None else dy * cache.weight
    mean_dx = (d * x_hat).mean(axis=axes, keepdims=True)
    return cache.inv_rms * (d - x_hat * mean_dx), dweight


def group_norm_forward(
    x: np.ndarray,
    num_groups: int,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, NormCache]:
    """Group norm: split the C channels into ``num_groups`` groups and standardise each sample's group
    over its channels and all spatial positions; then a per-channel scale and shift.

    ``num_groups=1`` standardises like layer norm (but with a per-channel affine), ``num_groups=C`` is
    instance norm.

    Parameters
    ----------
    x : ndarray, shape (N, C, *spatial)
    num_groups : int
        G, a divisor of C.
    weight, bias : ndarray of shape (C,), optional
    eps : float

    Returns
    -------
    y : ndarray, shape of ``x``
    cache : NormCache

    Raises
    ------
    ValueError
        ``x`` has fewer than 2 dimensions, G does not divide C, or a parameter is not of shape (C,).

    >>> x = np.random.default_rng(0).normal(size=(2, 6, 4, 4))
    >>> y, cache = group_norm_forward(x, num_groups=3)
    >>> y.shape, cache.std.x_hat.shape
    ((2, 6, 4, 4), (2, 3, 32))
    """
    x = _check_float(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial), got shape {shape_str(x.shape)}")
    n, c = x.shape[:2]
    if (
        isinstance(num_groups, bool)
        or not isinstance(num_groups, (int, np.integer))
        or num_groups < 1
    ):
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels C={c}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and np.shape(p) != (c,):
            raise ChannelMismatchError(
                f"{name} must have shape (C,) = ({c},) to match x of shape {shape_str(x.shape)}, "
                f"got {shape_str(np.shape(p))}"
            )
    grouped = x.reshape(n, num_groups, -1)
    x_hat, std = standardize_forward(grouped, 2, eps)
    p_shape = (1, c) + (1,) * (x.ndim - 2)
    y = x_hat.reshape(x.shape)
    if weight is not None:
        y = y * np.asarray(weight).reshape(p_shape)
    if bias is not None:
        y = y + np.asarray(bias).reshape(p_shape)
    cache = NormCache(
        std, x.shape, None if weight is None else np.asarray(weight), bias is not None, "group"
    )
    return y, cache


def group_norm_backward(dy: np.ndarray, cache: NormCache):
    """Gradients of group norm (or instance norm): ``(dx, dweight, dbias)``, ``None`` if absent."""
    return _norm_backward(dy, cache)


def instance_norm_forward(
    x: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, NormCache]:
    """Instance norm: standardise each sample's channel over its spatial positions (group norm with
    one channel per group), then a per-channel scale and shift. Shapes as in
    :func:`group_norm_forward`.

    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    >>> y, _ = instance_norm_forward(x)
    >>> np.allclose(y.mean(axis=(2, 3)), 0.0)
    True
    """
    x = _check_float(x, "x")
    if x.ndim < 3:
        raise ValueError(
            f"x must have shape (N, C, *spatial) with at least one spatial axis, got {shape_str(x.shape)}"
        )
    return group_norm_forward(x, x.shape[1], weight, bias, eps)


def instance_norm_backward(dy: np.ndarray, cache: NormCache):
    """Gradients of instance norm: ``(dx, dweight, dbias)``."""
    return _norm_backward(dy, cache)


# --------------------------------------------------------------------------------------------
# Weight normalisation (NumPy)
# --------------------------------------------------------------------------------------------


class WeightNormCache(NamedTuple):
    v_hat: np.ndarray  #: v / ‖v‖, same shape as v
    norm: np.ndarray  #: ‖v‖ with keepdims (shape of g)
    g: np.ndarray
    axes: tuple[int, ...]


def _wn_axes(ndim: int, dim: int | None) -> tuple[int, ...]:
    if dim is None or dim == -1:
        return tuple(range(ndim))
    if not 0 <= dim < ndim:
        raise ValueError(f"dim must be None, -1 or in [0, {ndim}), got {dim}")
    return tuple(a for a in range(ndim) if a != dim)


def weight_norm_forward(
    v: np.ndarray, g: np.ndarray, dim: int | None = 0
) -> tuple[np.ndarray, WeightNormCache]:
    """Weight normalisation: ``w = g · v / ‖v‖`` with the norm over every axis but ``dim``.

    Parameters
    ----------
    v : ndarray
        The direction parameter, e.g. a conv weight of shape (C_out, C_in, kh, kw).
    g : ndarray
        The magnitude: shape of ``v`` with every axis but ``dim`` set to 1 (``dim=None`` or ``-1``:
        a scalar), as in ``torch.nn.utils.parametrizations.weight_norm``.
    dim : int or None

    Returns
    -------
    w : ndarray, shape of ``v``
    cache : WeightNormCache

    Raises
    ------
    ValueError
        ``g`` has the wrong shape or ``dim`` is out of range.

    >>> v = np.random.default_rng(0).normal(size=(4, 3, 3, 3))
    >>> w, _ = weight_norm_forward(v, np.full((4, 1, 1, 1), 2.0))
    >>> np.round(np.linalg.norm(w.reshape(4, -1), axis=1), 12)
    array([2., 2., 2., 2.])
    """
    v = _check_float(v, "v")
    g = _check_float(g, "g")
    axes = _wn_axes(v.ndim, dim)
    norm = np.sqrt(np.square(v).sum(axis=axes, keepdims=len(axes) < v.ndim))
    if g.shape != norm.shape:
        raise ValueError(
            f"g must have shape {shape_str(norm.shape)} for dim={dim}, got {shape_str(g.shape)}"
        )
    v_hat = v / norm
    return g * v_hat, WeightNormCache(v_hat=v_hat, norm=norm, g=g, axes=axes)


def weight_norm_backward(dw: np.ndarray, cache: WeightNormCache) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of weight normalisation: ``dg = Σ dw·v̂`` and ``dv = (g/‖v‖)(dw − v̂ dg)``.

    ``dv`` is orthogonal to ``v`` (the component of ``dw`` along ``v`` goes to ``g`` instead): the
    reason a gradient step can only grow ‖v‖.
    """
    dw = np.asarray(dw)
    if dw.shape != cache.v_hat.shape:
        raise ValueError(
            f"dw must have the shape of v {shape_str(cache.v_hat.shape)}, got {shape_str(dw.shape)}"
        )
    keep = len(cache.axes) < dw.ndim
    dg = (dw * cache.v_hat).sum(axis=cache.axes, keepdims=keep)
    dv = (cache.g / cache.norm) * (dw - cache.v_hat * dg)
    return dv, dg


# ============================================================================================
# PyTorch: one autograd Function, four modules
# ============================================================================================


class _Standardize(torch.autograd.Function):
    """x̂ = (x − mean) / sqrt(var + ε) over ``dims``, with the compact backward written by hand."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=dims, keepdim=True)
        invstd = torch.rsqrt(var + eps)
        x_hat = centered * invstd
        ctx.save_for_backward(x_hat, invstd)
        ctx.dims = dims
        return x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_hat, invstd = ctx.saved_tensors
        dims = ctx.dims
        mean_g = grad.mean(dim=dims, keepdim=True)
        mean_gx = (grad * x_hat).mean(dim=dims, keepdim=True)
        return invstd * (grad - mean_g - x_hat * mean_gx), None, None


def _check_tensor(x: Tensor, name: str = "input") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DtypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def standardize(x: Tensor, dims: int | Sequence[int], eps: float = 1e-5) -> Tensor:
    """PyTorch twin of :func:`standardize_forward` (returns x̂ only; differentiable).

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
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size{list(input.shape)}"
        )
    y = standardize(input, tuple(range(input.dim() - k, input.dim())), eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _RMSNormalize(torch.autograd.Function):
    """x̂ = x / sqrt(mean(x²) + ε) over ``dims``, with the backward of eq. ``eq-beyond-rms-backward``
    written by hand."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
        inv_rms = torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + eps)
        x_hat = x * inv_rms
        ctx.save_for_backward(x_hat, inv_rms)
        ctx.dims = dims
        return x_hat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_hat, inv_rms = ctx.saved_tensors
        mean_gx = (grad * x_hat).mean(dim=ctx.dims, keepdim=True)
        return inv_rms * (grad - x_hat * mean_gx), None, None


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Twin of ``torch.nn.functional.rms_norm``: ``weight · x / sqrt(mean(x²) + ε)`` over the
    trailing ``normalized_shape`` dims, differentiable through :class:`_RMSNormalize`.

    As in PyTorch, float16 and bfloat16 input is normalised and scaled in float32 and cast back
    once, the output has the input's dtype, and ``eps=None`` means the machine epsilon of that
    computation type (``torch.finfo``).

    >>> rms_norm(torch.randn(2, 5, 16), (16,)).shape
    torch.Size([2, 5, 16])
    """
    _check_tensor(input)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k :]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size{list(input.shape)}"
        )
    compute = torch.promote_types(input.dtype, torch.float32)
    if eps is None:
        eps = torch.finfo(compute).eps
    check_eps(eps)
    dims = tuple(range(input.dim() - k, input.dim()))
    y = _RMSNormalize.apply(input.to(compute), dims, float(eps))
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
    y = standardize(input.reshape(n, num_groups, -1), 2, eps).reshape(input.shape)
    if weight is not None:
        y = y * _per_channel(weight, input.dim())
    if bias is not None:
        y = y + _per_channel(bias, input.dim())
    return y


def _running_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """torch's exponential-average factor: ``momentum``, or 1/t (cumulative average) if None."""
    if momentum is not None:
        return float(momentum)
    return 1.0 / float(num_batches_tracked)


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
    """
    _check_tensor(input)
    n, c = input.shape[:2]
    spatial = tuple(range(2, input.dim()))
    if use_input_stats:
        per_instance = math.prod(input.shape[2:])
        if per_instance == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {list(input.shape)}"
            )
        y = standardize(input, spatial, eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                mean = input.mean(dim=spatial)
                var = ((input - mean[(...,) + (None,) * len(spatial)]) ** 2).sum(dim=spatial)
                var = var / (per_instance - 1)
                running_mean.mul_(1 - momentum).add_(
                    mean.mean(0).to(running_mean.dtype), alpha=momentum
                )
                running_var.mul_(1 - momentum).add_(
                    var.mean(0).to(running_var.dtype), alpha=momentum
                )
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError(
                "Expected running_mean and running_var to be defined when use_input_stats is false"
            )
        shape = (1, c) + (1,) * len(spatial)
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        y = y * _per_channel(weight, input.dim())
    if bias is not None:
        y = y + _per_channel(bias, input.dim())
    return y


class LayerNorm(nn.Module):
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
        super().__init__()
        check_eps(eps)
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, **kw))
            self.bias = nn.Parameter(torch.zeros(shape, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class RMSNorm(nn.Module):
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
        super().__init__()
        if eps is not None:
            check_eps(eps)
        shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        """Set ``weight`` back to ones (as PyTorch's ``reset_parameters``)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


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

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() >= 2 and input.shape[1] != self.num_channels:
            raise ChannelMismatchError(
                f"input must have {self.num_channels} channels at dim 1, got shape {shape_str(input.shape)}"
            )
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class _InstanceNorm(nn.Module):
    """Shared body of :class:`InstanceNorm1d`/``2d``/``3d`` (PyTorch's ``_InstanceNorm``)."""

    _spatial_dims = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_num_features(num_features)
        check_eps(eps)
        check_momentum(momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **kw))
            self.register_buffer("running_var", torch.ones(num_features, **kw))
            # Registered like PyTorch's (so state_dicts match) but, as in PyTorch, never incremented.
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, input: Tensor) -> Tensor:
        _check_tensor(input)
        d = self._spatial_dims
        if input.dim() not in (d + 1, d + 2):
            raise ValueError(
                f"expected {d + 1}D (unbatched) or {d + 2}D (batched) input, got {input.dim()}D input "
                f"of shape {shape_str(input.shape)}"
            )
        unbatched = input.dim() == d + 1
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.num_features and self.affine:
            raise ValueError(
                f"expected input's size at dim={0 if unbatched else 1} to match num_features "
                f"({self.num_features}), but got: {x.shape[1]}."
            )
        y = instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class InstanceNorm1d(_InstanceNorm):
    """Twin of ``torch.nn.InstanceNorm1d``: input (N, C, L) or (C, L)."""

    _spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """Twin of ``torch.nn.InstanceNorm2d``: input (N, C, H, W) or (C, H, W).

    Defaults as PyTorch's: ``affine=False``, ``track_running_stats=False``. With running statistics,
    training updates them with the batch average of the per-instance statistics (unbiased variance)
    and evaluation uses them; ``momentum=None`` means *no* update (PyTorch passes 0.0), unlike batch
    norm's cumulative average.

    >>> InstanceNorm2d(3)(torch.randn(2, 3, 5, 5)).shape
    torch.Size([2, 3, 5, 5])
    """

    _spatial_dims = 2


class InstanceNorm3d(_InstanceNorm):
    """Twin of ``torch.nn.InstanceNorm3d``: input (N, C, D, H, W) or (C, D, H, W)."""

    _spatial_dims = 3


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


# --------------------------------------------------------------------------------------------
# Batch renormalisation
# --------------------------------------------------------------------------------------------


def renorm_limits(
    step: int,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 0,
    r_ramp_steps: int = 0,
    d_ramp_steps: int = 0,
) -> tuple[float, float]:
    """The clipping limits (r_max(t), d_max(t)) of batch renormalisation at training step ``step``.

    Ioffe (2017) trains "with batchnorm alone" first — r clipped to [1, 1] and d to [0, 0] — and then
    gradually relaxes the limits. Here: (1, 0) for ``step < warmup_steps``, then a linear ramp that
    reaches ``r_max`` after ``r_ramp_steps`` more steps and ``d_max`` after ``d_ramp_steps`` (the
    paper says "gradually"; linear is this book's choice).

    >>> [renorm_limits(t, warmup_steps=10, r_ramp_steps=20, d_ramp_steps=10) for t in (0, 10, 20, 30)]
    [(1.0, 0.0), (1.0, 0.0), (2.0, 5.0), (3.0, 5.0)]
    """
    if r_max < 1 or d_max < 0:
        raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
    if step < warmup_steps:
        return 1.0, 0.0
    t = step - warmup_steps
    r_frac = 1.0 if r_ramp_steps <= 0 else min(1.0, t / r_ramp_steps)
    d_frac = 1.0 if d_ramp_steps <= 0 else min(1.0, t / d_ramp_steps)
    return 1.0 + (r_max - 1.0) * r_frac, d_max * d_frac


class _PerChannelNorm(nn.Module):
    """Parameters and buffers shaped like ``torch.nn.BatchNorm*d`` (weight, bias, running_mean,
    running_var, num_batches_tracked), so a ``state_dict`` loads into PyTorch's batch norm."""

    _min_dim = 2

    def __init__(
        self, num_features: int, eps: float, momentum: float | None, affine: bool, device, dtype
    ):
        super().__init__()
        check_num_features(num_features)
        check_eps(eps)
        check_momentum(momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def _check_input(self, input: Tensor) -> None:
        _check_tensor(input)
        if input.dim() < 2:
            raise ValueError(
                f"expected input of shape (N, C, *), got shape {shape_str(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ChannelMismatchError(
                f"input must have num_features={self.num_features} channels at dim 1, got shape "
                f"{shape_str(input.shape)}"
            )

    def _shape(self, input: Tensor) -> tuple[int, ...]:
        return (1, self.num_features) + (1,) * (input.dim() - 2)

    def _affine(self, x_hat: Tensor) -> Tensor:
        if not self.affine:
            return x_hat
        return x_hat * self.weight.reshape(self._shape(x_hat)) + self.bias.reshape(
            self._shape(x_hat)
        )

    def _eval_x_hat(self, input: Tensor) -> Tensor:
        s = self._shape(input)
        return (input - self.running_mean.reshape(s)) * torch.rsqrt(
            self.running_var.reshape(s) + self.eps
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )


def _batch_dims(input: Tensor) -> tuple[int, ...]:
    return (0, *range(2, input.dim()))


class _BatchRenorm(_PerChannelNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        r_ramp_steps: int = 0,
        d_ramp_steps: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype)
        renorm_limits(0, r_max=r_max, d_max=d_max)  # validates
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_ramp_steps, self.d_ramp_steps = (
            warmup_steps,
            r_ramp_steps,
            d_ramp_steps,
        )

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) at the current step (``num_batches_tracked``)."""
        return renorm_limits(
            int(self.num_batches_tracked),
            r_max=self.r_max,
            d_max=self.d_max,
            warmup_steps=self.warmup_steps,
            r_ramp_steps=self.r_ramp_steps,
            d_ramp_steps=self.d_ramp_steps,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if not self.training:
            return self._affine(self._eval_x_hat(input))
        m = input.numel() // self.num_features
        if m <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {list(input.shape)}"
            )
        s = self._shape(input)
        # batch norm's x̂ and batch statistics, from the book's batch-norm Function (chapter ch-backprop)
        x_hat_b, mean_b, var_b = BatchNormFunction.apply(input, None, None, float(self.eps))
        with (
            torch.no_grad()
        ):  # r and d are constants for the gradient: "stop_gradient" in the paper
            sigma_b = torch.sqrt(var_b + self.eps)
            sigma = torch.sqrt(self.running_var + self.eps)
            r_lim, d_lim = self.current_limits()
            r = (sigma_b / sigma).clamp(1.0 / r_lim, r_lim)
            d = ((mean_b - self.running_mean) / sigma).clamp(-d_lim, d_lim)
            self.last_r, self.last_d = r.clone(), d.clone()
            self.num_batches_tracked.add_(1)
            f = _running_factor(self.momentum, self.num_batches_tracked)
            self.running_mean.mul_(1 - f).add_(mean_b, alpha=f)
            self.running_var.mul_(1 - f).add_(var_b * (m / (m - 1)), alpha=f)
        return self._affine(x_hat_b * r.reshape(s) + d.reshape(s))


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalisation for (N, C) or (N, C, L) input; see :class:`BatchRenorm2d`."""


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalisation (Ioffe, 2017) with the buffers and conventions of ``torch.nn.BatchNorm2d``.

    Training normalises with the batch statistics and then corrects towards the running ones,

    ``x̂ = (x − μ_B)/σ_B · r + d``,  ``r = clip(σ_B/σ, 1/r_max, r_max)``,
    ``d = clip((μ_B − μ)/σ, −d_max, d_max)``,

    with r and d treated as constants by the backward pass (``torch.no_grad``; the paper's
    ``stop_gradient``), so the gradient is batch norm's scaled by r. Here σ_B = sqrt(σ²_B + ε) and
    σ = sqrt(running_var + ε). Evaluation is batch norm's inference map with the running statistics.

    Where this departs from the paper, on purpose: the running statistics are PyTorch's — a running
    mean and a running *unbiased variance* (momentum convention of ``BatchNorm2d``) from which σ is
    derived — where the paper keeps a moving σ directly. So a ``state_dict`` loads into
    ``torch.nn.BatchNorm2d`` for inference, and with r_max = 1, d_max = 0 the layer *is* batch norm
    (forward, gradients and running statistics; tested to 1e-9).

    Parameters
    ----------
    num_features, eps, momentum, affine
        As in ``torch.nn.BatchNorm2d`` (running statistics are always tracked).
    r_max, d_max : float
        Final clipping limits (the paper's experiments: 3 and 5).
    warmup_steps, r_ramp_steps, d_ramp_steps : int
        The relaxation schedule (:func:`renorm_limits`), counted in ``num_batches_tracked``.

    Shape
    -----
    Input (N, C, H, W) (any (N, C, *) works); output the same.

    >>> layer = BatchRenorm2d(4, warmup_steps=100)
    >>> layer(torch.randn(8, 4, 5, 5)).shape, layer.current_limits()
    (torch.Size([8, 4, 5, 5]), (1.0, 0.0))
    """


# --------------------------------------------------------------------------------------------
# Batch Layer Normalisation (Ziaee & Çano, 2022)
# --------------------------------------------------------------------------------------------


class BatchLayerNorm(_PerChannelNorm):
    """Batch Layer Normalisation: a mix of batch- and layer-normalised values weighted by the inverse
    mini-batch size m (Ziaee & Çano, 2022),

    ``y = γ · [ (1/m) · x̂_layer + (1 − 1/m) · x̂_batch ] + β``.

    ``x̂_batch`` is batch norm's (per channel over (N, *spatial); running statistics in evaluation,
    PyTorch's momentum convention); ``x̂_layer`` is layer norm's (per sample over (C, *spatial); the same
    in training and evaluation). So m = 1 gives layer norm and large m approaches batch norm.

    m is the *training* mini-batch size, fixed at construction as in the authors' code, so the mix is
    the same in training and evaluation.

    What this follows and where it departs (chapter ``ch-family``): the abstract of the paper and the
    authors' public Keras layer (github.com/A2Amir/Batch-Layer-Normalization, ``bln_layer``). That code
    additionally (a) shifts the two weights by 10⁻⁴ (1/m − 10⁻⁴ and 1 − 1/m − 10⁻⁴), (b) divides the mix
    by sqrt(d) with d the number of features, (c) uses ε = 10⁻³, (d) computes the batch statistics per
    feature *position* (over N only) and the feature statistics over the channel axis only, and (e)
    estimates population statistics as an average over an epoch, with four train/test combinations
    chosen by hyper-parameter search. This module keeps the mixing rule and uses the book's batch and
    layer norm for the two parts; it omits (a)–(e). The paper's own equations could not be checked.

    Parameters
    ----------
    num_features : int
        C.
    batch_size : int
        m, the training mini-batch size (≥ 1).
    eps, momentum, affine
        As in ``torch.nn.BatchNorm2d``.
    layer_groups : int
        The layer-normalised part standardises each sample within this many groups of channels
        (1: over all of (C, *spatial), i.e. layer norm; used to run independent networks side by
        side in one tensor, :func:`family_cnn`).

    >>> BatchLayerNorm(4, batch_size=8)(torch.randn(8, 4, 5, 5)).shape
    torch.Size([8, 4, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        layer_groups: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive int (the training m), got {batch_size!r}"
            )
        if num_features % layer_groups:
            raise ValueError(f"layer_groups={layer_groups} must divide num_features={num_features}")
        self.batch_size = batch_size
        self.layer_groups = layer_groups

    @property
    def layer_weight(self) -> float:
        """The weight 1/m of the layer-normalised part."""
        return 1.0 / self.batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        n = input.shape[0]
        x_hat_l = standardize(input.reshape(n, self.layer_groups, -1), 2, self.eps).view(
            input.shape
        )
        w = self.layer_weight
        if self.training and w < 1.0:
            m = input.numel() // self.num_features
            if m <= 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got input size "
                    f"{list(input.shape)}"
                )
            x_hat_b, mean_b, var_b = BatchNormFunction.apply(input, None, None, float(self.eps))
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = _running_factor(self.momentum, self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean_b, alpha=f)
                self.running_var.mul_(1 - f).add_(var_b * (m / (m - 1)), alpha=f)
        elif w < 1.0:
            x_hat_b = self._eval_x_hat(input)
        else:  # m = 1: pure layer norm, no batch statistics at all
            return self._affine(x_hat_l)
        return self._affine(w * x_hat_l + (1.0 - w) * x_hat_b)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch_size={self.batch_size}"


# --------------------------------------------------------------------------------------------
# A sketch in the spirit of Full Normalisation (Lian & Liu, 2019)
# --------------------------------------------------------------------------------------------


class FullNormSketch(_PerChannelNorm):
    """The book's sketch of the idea behind Full Normalisation — *not* the authors' algorithm.

    Lian & Liu (2019) show that batch norm minimises a different objective from the one that
    normalises with statistics of the whole dataset, and refine it with compositional optimisation.
    The full-data objective has the form ``E_ξ[ f(E_ζ[g(ζ)], ξ) ]`` (the statistics are an expectation
    *inside* the loss); stochastic compositional methods estimate the inner expectation by a running
    average updated with each batch. This layer does exactly that and nothing more:

    ``μ_t = μ_{t−1} + α (μ_B − μ_{t−1})``,
    ``v_t = (1 − α) v_{t−1} + α σ²_B + α (1 − α) (μ_B − μ_{t−1})²``

    (the weighted form of Chan's formula for combining two groups' mean and variance), normalises the
    batch with ``(μ_t, v_t)``, and lets the gradient flow through the current batch's share (μ_B, σ²_B)
    only; the history is a constant. The first batch initialises the estimates; evaluation normalises
    with them (stored as ``running_mean`` and ``running_var``, the latter a biased variance). With
    α = 1 the layer is batch norm in training.

    The paper's own update rules (step sizes, what is differentiated) could not be checked for this
    book; use this class to explore the objective, not to reproduce the paper's numbers.

    Parameters
    ----------
    num_features : int
    alpha : float in (0, 1]
        Weight of the new batch in the estimates.
    eps, affine
        As in ``torch.nn.BatchNorm2d``.

    >>> FullNormSketch(4, alpha=0.1)(torch.randn(8, 4, 5, 5)).shape
    torch.Size([8, 4, 5, 5])
    """

    def __init__(
        self,
        num_features: int,
        alpha: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, None, affine, device, dtype)
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if not self.training:
            return self._affine(self._eval_x_hat(input))
        dims = _batch_dims(input)
        s = self._shape(input)
        mean_b = input.mean(dim=dims)
        var_b = ((input - mean_b.reshape(s)) ** 2).mean(dim=dims)
        a = 1.0 if int(self.num_batches_tracked) == 0 else self.alpha
        prev_mean, prev_var = self.running_mean.detach(), self.running_var.detach()
        delta = mean_b - prev_mean
        mean_t = prev_mean + a * delta
        var_t = (1 - a) * prev_var + a * var_b + a * (1 - a) * delta**2
        with torch.no_grad():
            self.running_mean.copy_(mean_t)
            self.running_var.copy_(var_t)
            self.num_batches_tracked.add_(1)
        x_hat = (input - mean_t.reshape(s)) * torch.rsqrt(var_t.reshape(s) + self.eps)
        return self._affine(x_hat)

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha={self.alpha}, eps={self.eps}, affine={self.affine}"


# ============================================================================================
# The comparison of chapter ch-family: one small CNN, every method, several seeds at once
# ============================================================================================

#: The methods :func:`family_cnn` knows, in the order the chapter plots them.
FAMILY_METHODS: tuple[str, ...] = (
    "batch",
    "renorm",
    "batch-layer",
    "full-sketch",
    "layer",
    "group",
    "instance",
    "weight",
)


class StackedHead(nn.Module):
    """``seeds`` independent linear classifiers: (N, seeds·F) features → (N, seeds, out) logits."""

    def __init__(self, seeds: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.seeds, self.in_features = seeds, in_features
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per network
        self.weight = nn.Parameter(
            torch.empty(seeds, in_features, out_features).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(seeds, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], self.seeds, self.in_features)
        return torch.einsum("nsf,sfk->nsk", h, self.weight) + self.bias


def _family_norm(method: str, channels: int, seeds: int, batch_size: int, groups: int, steps: int):
    total = seeds * channels
    if method == "batch":
        from bnbook.torch import BatchNorm2d

        return BatchNorm2d(total)
    if (
        method == "renorm"
    ):  # batch norm for the first 20% of the steps, then relax over the next 30%
        warm, ramp = max(1, steps // 5), max(1, (3 * steps) // 10)
        return BatchRenorm2d(total, warmup_steps=warm, r_ramp_steps=ramp, d_ramp_steps=ramp)
    if method == "batch-layer":
        return BatchLayerNorm(total, batch_size=batch_size, layer_groups=seeds)
    if method == "full-sketch":
        return FullNormSketch(total, alpha=0.1)
    if method == "layer":  # over (C, H, W) of each network, with a per-channel scale and shift
        return GroupNorm(seeds, total)
    if method == "group":
        return GroupNorm(seeds * groups, total)
    if method == "instance":
        return InstanceNorm2d(total, affine=True)
    raise ValueError(f"method must be one of {FAMILY_METHODS}, got {method!r}")


def family_cnn(
    method: str,
    *,
    seeds: int = 1,
    batch_size: int = 32,
    channels: tuple[int, int] = (8, 16),
    groups: int = 4,
    steps: int = 60,
) -> nn.Sequential:
    """The small CNN of the chapter's comparison, for 14 × 14 images, ``seeds`` networks side by side.

    One network is ``Conv 4×4/2 (1→c₁) → norm → ReLU → Conv 3×3/2 (c₁→c₂) → norm → ReLU → Linear``
    (14 × 14 → 6 × 6 → 2 × 2 pixels). ``seeds`` independent copies share one set of tensors: channel
    block s of every layer belongs to network s (grouped convolutions; every norm acts within a
    network: per channel, or per sample within a block of channels), so one pass trains them all.
    Input (N, seeds, 14, 14): channel s holds network s's images; output (N, seeds, 10).

    ``method`` is one of :data:`FAMILY_METHODS`: ``"weight"`` is weight normalisation of both
    convolutions and no activation norm; ``"layer"`` normalises over (C, H, W) with a per-channel
    scale (group norm with one group); ``"group"`` uses ``groups`` groups.
    """
    if method not in FAMILY_METHODS:
        raise ValueError(f"method must be one of {FAMILY_METHODS}, got {method!r}")
    c1, c2 = channels
    layers: list[nn.Module] = []
    for cin, cout, k in ((1, c1, 4), (c1, c2, 3)):
        conv = nn.Conv2d(
            seeds * cin, seeds * cout, k, stride=2, groups=seeds, bias=method == "weight"
        )
        if method == "weight":
            layers.append(weight_norm(conv))
        else:
            layers += [conv, _family_norm(method, cout, seeds, batch_size, groups, steps)]
        layers.append(nn.ReLU())
    layers.append(StackedHead(seeds, c2 * 4, 10))
    return nn.Sequential(*layers)


def train_family(
    method: str,
    batch_size: int,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 60,
    lr: float = 3e-3,
) -> np.ndarray:
    """Train one :func:`family_cnn` per seed (all at once) with Adam; return each one's test accuracy.

    Network s starts from its own slice of one random initialisation (``torch.manual_seed(seeds[0])``)
    and draws its mini-batches with :func:`bnbook.train.batches` (seed ``seeds[s]``). The loss is the
    sum of the networks' mean cross-entropies, so each network's gradient is that of its own loss,
    and Adam updates every element independently.

    Parameters
    ----------
    x_train, x_test : Tensor (n, 1, 14, 14)
    y_train, y_test : Tensor (n,)
    """
    from bnbook.train import batches

    s = len(seeds)
    torch.manual_seed(seeds[0])
    net = family_cnn(method, seeds=s, batch_size=batch_size, steps=steps)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    orders = [batches(len(x_train), batch_size, seed=seed) for seed in seeds]
    net.train()
    for _ in range(steps):
        idx = torch.stack([torch.from_numpy(next(o)) for o in orders], dim=1)  # (b, s)
        x = x_train[idx, 0]  # (b, s, 14, 14)
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, 10), y_train[idx].reshape(-1), reduction="sum")
        opt.zero_grad(set_to_none=True)
        (loss / batch_size).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(x_test.expand(-1, s, -1, -1)).argmax(-1)  # (n, s)
    return (pred == y_test[:, None]).double().mean(0).numpy()
