"""The normalisation family in NumPy: one standardisation, several norms (chapters ``ch-family``
and ``ch-beyond``).

Every activation norm *standardises over some axes* and then scales and shifts. Batch norm
standardises an ``(N, C, H, W)`` array over ``(N, H, W)``, layer norm over ``(C, H, W)``, instance norm
over ``(H, W)`` and group norm over ``(C/G, H, W)`` after splitting the channels into ``G`` groups. So
one forward/backward pair, :func:`standardize_forward` / :func:`standardize_backward`, with the
compact backward

.. math::

    \\frac{\\partial \\ell}{\\partial x} = \\frac{1}{\\sqrt{\\sigma^2+\\epsilon}}
    \\Big(g - \\overline{g} - \\hat x\\,\\overline{g\\,\\hat x}\\Big),
    \\qquad g = \\frac{\\partial \\ell}{\\partial \\hat x},

(bars are means over the normalised axes; label ``eq-family-backward``) serves all of them. RMS
normalisation (chapter ``ch-beyond``) drops the centring: ``x̂ = x / sqrt(mean(x²) + ε)``, whose
backward is the formula above without its ``−ḡ`` term. Weight normalisation reparametrises a weight
as ``g · v / ‖v‖``. Each forward returns ``(out, cache)`` and each backward takes ``(dout, cache)``,
in the shape of CS231n's ``layers.py``; inputs are never modified. The PyTorch modules of the same
family are in :mod:`bnbook.norms`.

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(4, 6, 5, 5))
>>> y, cache = group_norm_forward(x, 3)
>>> y.shape, cache.std.invstd.shape
((4, 6, 5, 5), (4, 3, 1))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from bnbook._checks import (
    ChannelMismatchError,
    DtypeError,
    check_eps,
    check_grad_shape,
    shape_str,
)

__all__ = [
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
]


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


def _trailing_shape(x: np.ndarray, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple, checked to be the trailing shape of ``x``."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected x with shape [*, "
            f"{', '.join(map(str, shape))}], but got shape {shape_str(x.shape)}"
        )
    return shape


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
    shape = _trailing_shape(x, normalized_shape)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and np.shape(p) != shape:
            raise ValueError(
                f"{name} must have shape {shape_str(shape)}, got {shape_str(np.shape(p))}"
            )
    x_hat, std = standardize_forward(x, tuple(range(x.ndim - len(shape), x.ndim)), eps)
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
    shape = _trailing_shape(x, normalized_shape)
    if weight is not None and np.shape(weight) != shape:
        raise ValueError(
            f"weight must have shape {shape_str(shape)}, got {shape_str(np.shape(weight))}"
        )
    axes = tuple(range(x.ndim - len(shape), x.ndim))
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
    y, cache
        As :func:`layer_norm_forward`.

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
