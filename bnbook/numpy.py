"""Batch normalization from scratch in NumPy: the forward/backward pair and a stateful layer.

The forward pass is equations (1)–(4) of the source article (labels ``eq-bn-mean`` … ``eq-bn-scale-shift``,
derived in chapter ``ch-transform``); the backward pass is the compact closed form derived in chapter
``ch-backprop``:

.. math::

    \\frac{\\partial \\ell}{\\partial x_i} = \\frac{\\gamma}{m\\sqrt{\\sigma_B^2+\\epsilon}}
    \\Big(m\\,\\frac{\\partial \\ell}{\\partial y_i} - \\sum_j \\frac{\\partial \\ell}{\\partial y_j}
    - \\hat x_i \\sum_j \\frac{\\partial \\ell}{\\partial y_j}\\hat x_j\\Big).

Statistics are per channel (axis 1) over every other axis, so ``x`` may be ``(N, C)`` (a dense layer)
or ``(N, C, *spatial)`` (a convolution: the effective mini-batch is ``m = N * prod(spatial)``).

The code is written for speed as well as clarity: per-channel sums go through BLAS matrix–vector
products, and large tensors are processed a block of samples at a time so that temporaries stay in
cache. The variance is computed in two passes (never as ``E[x^2] - E[x]^2``, which cancels
catastrophically in floating point).

>>> import numpy as np
>>> from bnbook.numpy import batch_norm_forward, batch_norm_backward
>>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 4, 5, 5))
>>> y, cache = batch_norm_forward(x, gamma=np.ones(4), beta=np.zeros(4))
>>> y.shape, np.round(y.mean(axis=(0, 2, 3)), 6) + 0.0
((8, 4, 5, 5), array([0., 0., 0., 0.]))
>>> dx, dgamma, dbeta = batch_norm_backward(np.ones_like(y), cache)
>>> dx.shape, dgamma.shape, dbeta.shape
((8, 4, 5, 5), (4,), (4,))
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from bnbook._checks import (
    ChannelMismatchError,
    DtypeError,
    check_eps,
    check_grad_shape,
    check_momentum,
    check_num_features,
    check_training_size,
    shape_str,
)

__all__ = [
    "BNCache",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_inference",
    "BatchNorm",
]

# Process this many elements per block: big enough to amortise Python overhead, small enough
# (1 MiB of float32) that a block's temporaries stay in the L2/L3 cache.
_BLOCK_ELEMENTS = 1 << 18

# The algorithm is chosen by the length L of a channel's run of contiguous values (prod(spatial)).
# From this length on, one channel of one sample is a long row, summed per row through BLAS
# ("rows" layout). Below it (dense inputs, 7x7 or 14x14 maps) rows are short and a per-row loop
# costs more than it computes, so each sample is seen as one row of C*L values ("columns").
_LONG_ROW = 2048

# NumPy's loops over two arrays of one shape run about twice as fast as over an array and a (C, 1)
# column broadcast along its rows. So the rows layout lays each per-channel coefficient out like one
# sample, (C, L), when that row is small enough to stay in cache beside a block (at most this many
# values) and there are enough samples to repay building it; otherwise it broadcasts the column.
_COEFFICIENT_ROW_MAX = 1 << 18
_COEFFICIENT_ROW_MIN_SAMPLES = 4


class BNCache(NamedTuple):
    """What the backward pass needs from the forward pass.

    The input is kept by reference (not copied, to save memory traffic): do not modify ``x`` in
    place between the forward and the backward pass.
    """

    x: np.ndarray  #: the input, shape (N, C, *spatial)
    mean: np.ndarray  #: per-channel batch mean μ_B, shape (C,)
    var: np.ndarray  #: per-channel biased batch variance σ²_B, shape (C,)
    invstd: np.ndarray  #: 1 / sqrt(σ²_B + ε), shape (C,)
    gamma: np.ndarray  #: the scale γ used, shape (C,)
    eps: float

    @property
    def x_hat(self) -> np.ndarray:
        """The normalised input x̂ (equation 3), recomputed on demand."""
        x3, _ = _as_ncl(self.x)
        return ((x3 - self.mean[:, None]) * self.invstd[:, None]).reshape(self.x.shape)

    @property
    def m(self) -> int:
        """Values per channel that the statistics were computed over: N · prod(spatial)."""
        return self.x.size // self.x.shape[1]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_x(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise DtypeError(
            f"{name} must be a floating-point array, got dtype {x.dtype}; convert it explicitly, "
            f"e.g. {name}.astype(np.float32)"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (N, C) or (N, C, *spatial) with at least 2 dimensions, "
            f"got {x.ndim}D array of shape {shape_str(x.shape)}"
        )
    return x


def _check_param(p, name: str, x: np.ndarray) -> np.ndarray:
    p = np.asarray(p)
    channels = x.shape[1]
    if p.shape != (channels,):
        raise ChannelMismatchError(
            f"{name} must have shape (C,) = ({channels},) to match x of shape {shape_str(x.shape)}, "
            f"got shape {shape_str(p.shape)}"
        )
    return p.astype(x.dtype, copy=False)


def _as_ncl(x: np.ndarray) -> tuple[np.ndarray, int]:
    """View ``x`` (N, C, *spatial) as (N, C, L); copies only if ``x`` is not C-contiguous."""
    n, c = x.shape[:2]
    length = math.prod(x.shape[2:])
    return np.ascontiguousarray(x).reshape(n, c, length), length


def _blocks(n: int, per_sample: int):
    """Slices over the batch axis, each holding about ``_BLOCK_ELEMENTS`` elements."""
    step = max(1, _BLOCK_ELEMENTS // max(per_sample, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _channel_sum(x3: np.ndarray) -> np.ndarray:
    """Per-channel sum of an (N, C, L) array, through BLAS (much faster than ``sum(axis=(0, 2))``)."""
    n, c, length = x3.shape
    if length == 1:
        return x3[:, :, 0].sum(axis=0)
    ones = np.ones(length, dtype=x3.dtype)
    return (x3.reshape(n * c, length) @ ones).reshape(n, c).sum(axis=0)


def _empty_batch(x: np.ndarray, gamma, beta, eps: float) -> tuple[np.ndarray, BNCache]:
    """An input with no values per channel (N = 0, or an empty spatial axis), as torch does it.

    The output is empty; there are no statistics to compute, so the cache holds μ = 0 and σ² = 0
    (never NaN) and the backward pass returns zero gradients for γ and β.
    """
    zeros = np.zeros(x.shape[1], dtype=x.dtype)
    invstd = np.full(x.shape[1], 1.0 / math.sqrt(eps), dtype=x.dtype)
    cache = BNCache(x=x, mean=zeros, var=zeros.copy(), invstd=invstd, gamma=gamma, eps=eps)
    return np.empty_like(x, order="C"), cache


# --------------------------------------------------------------------------------------------
# The functional pair
# --------------------------------------------------------------------------------------------


def batch_norm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, BNCache]:
    """Normalise ``x`` with its own batch statistics, then scale and shift (training mode).

    Parameters
    ----------
    x : ndarray, shape (N, C) or (N, C, *spatial)
        Floating-point input; statistics are per channel (axis 1) over every other axis. An
        empty batch (N = 0) gives an empty output, as in PyTorch.
    gamma, beta : ndarray, shape (C,)
        Scale γ and shift β (equation 4).
    eps : float
        ε > 0 added to the variance (equation 3).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
        γ x̂ + β.
    cache : BNCache
        What :func:`batch_norm_backward` needs.

    Raises
    ------
    TypeError
        ``x`` is not a floating-point array (:class:`bnbook._checks.DtypeError`).
    ValueError
        ``x`` has fewer than 2 dimensions, one value per channel, a ``gamma``/``beta`` whose shape is
        not ``(C,)``, or ``eps <= 0``.

    Notes
    -----
    Both algorithms are the corrected two-pass method: the mean from one pass, then the sums of
    x − μ and of (x − μ)² from a second (the first sum, zero in exact arithmetic, corrects the
    rounding error of the mean). They differ in how memory is walked, chosen by the length L of a
    channel's contiguous run: for long runs, one row per channel and sample, summed row by row;
    for short runs and dense inputs, rows of r whole samples, summed column by column. Either way
    each per-channel coefficient of the elementwise passes is repeated along its channel, laid out
    like one sample (a column broadcast along the rows instead, where that would be very large or
    fewer than four samples would repay building it), x − μ is written into the output and
    reduced while it is in cache, and no array the size of the input is allocated but the output.

    References
    ----------
    Equations (1)–(4) of the source article; chapter ``ch-transform``.
    """
    x = _check_x(x)
    gamma = _check_param(gamma, "gamma", x)
    beta = _check_param(beta, "beta", x)
    check_eps(eps)
    check_training_size(x.shape)
    if x.size == 0:
        return _empty_batch(x, gamma, beta, float(eps))
    x3, length = _as_ncl(x)
    if length >= _LONG_ROW:
        return _rows_forward(x, x3, gamma, beta, float(eps))
    return _columns_forward(x, x3, gamma, beta, float(eps))


def batch_norm_backward(
    dy: np.ndarray, cache: BNCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the loss with respect to ``x``, ``gamma`` and ``beta``, given ∂ℓ/∂y.

    Uses the compact closed form (chapter ``ch-backprop``): two per-channel reductions, then one
    elementwise pass,

    ``dx = γ/(m σ) · (m·dy − Σ dy − x̂ · Σ dy·x̂)``,   ``dγ = Σ dy·x̂``,   ``dβ = Σ dy``.

    Parameters
    ----------
    dy : ndarray, same shape as the forward input
        Upstream gradient ∂ℓ/∂y.
    cache : BNCache
        From :func:`batch_norm_forward`.

    Returns
    -------
    dx : ndarray, same shape as ``dy``
    dgamma, dbeta : ndarray, shape (C,)

    Raises
    ------
    ValueError
        ``dy`` does not have the shape of the forward input.
    """
    x = cache.x
    dy = check_grad_shape(dy, x.shape)
    dy = dy.astype(x.dtype, copy=False)
    if x.size == 0:
        zeros = np.zeros(x.shape[1], dtype=x.dtype)
        return np.empty_like(x, order="C"), zeros, zeros.copy()
    x3, length = _as_ncl(x)
    dy3, _ = _as_ncl(dy)
    if length >= _LONG_ROW:
        return _rows_backward(dy3, x3, cache)
    return _columns_backward(dy3, x3, cache)


def _statistics(mean, residual, sum_sq, m: int, gamma, beta, eps: float, dtype):
    """From the sums of the two passes: μ, σ², 1/sqrt(σ² + ε), and the per-channel a and b of
    ``y = (x − μ₁)·a + b``, where μ₁ is the first-pass mean the sums are centred on.

    The sum of x − μ₁ (``residual``), zero in exact arithmetic, corrects both the variance and
    the mean for the rounding error of μ₁ (the corrected two-pass algorithm).
    """
    var = np.maximum((sum_sq - residual * residual / m) / m, 0)  # (2), biased
    invstd = 1.0 / np.sqrt(var + eps)  # the 1/sqrt(σ² + ε) of (3)
    scale = gamma * invstd  # (3) and (4) as one multiply-add per element
    shift = beta - residual / m * scale  # with μ's correction folded into the shift
    mean = mean + residual / m
    return mean, var, invstd, scale.astype(dtype, copy=False), shift.astype(dtype, copy=False)


def _input_gradient_coefficients(cache: BNCache, sum_dy, sum_dy_xc, m: int):
    """dγ, dβ and the per-channel k, c₁, c₂ of ``dx = k (dy + c₁ (x − μ) + c₂)``.

    With k = γσ⁻¹, c₁ = −σ⁻¹ dγ / m and c₂ = −dβ / m this is the compact form above; written
    with k outside, the last pass is four in-place operations and needs no temporary.
    """
    dbeta = sum_dy
    dgamma = sum_dy_xc * cache.invstd
    k = cache.gamma * cache.invstd
    c1 = -cache.invstd * dgamma / m
    c2 = -dbeta / m
    return dgamma, dbeta, k, c1, c2


def _input_gradient(dx, dy, k, c1, c2, blocks) -> None:
    """The last pass: dx ← k (dy + c₁ (x − μ) + c₂) in place, where dx holds x − μ."""
    for block in blocks:
        out = dx[block]
        out *= c1
        out += dy[block]
        out += c2
        out *= k


# ------------------------------------------------------------------ long rows: per channel


def _rows_forward(x, x3, gamma, beta, eps) -> tuple[np.ndarray, BNCache]:
    """Per-channel rows of length L ≥ ``_LONG_ROW``: sums through BLAS (``rows @ ones``).

    x − μ is written straight into the output, a block of samples at a time, and reduced while
    the block is still in cache; the output is then scaled and shifted in place.
    """
    n, c, length = x3.shape
    m = n * length
    mean = _channel_sum(x3) / m  # (1)
    mean_row = _sample_row(mean, n, length, x3.dtype)
    y = np.empty_like(x3)
    residual = np.zeros(c, dtype=x3.dtype)
    sum_sq = np.zeros(c, dtype=x3.dtype)
    for block in _blocks(n, c * length):
        centered = np.subtract(x3[block], mean_row, out=y[block])
        residual += _channel_sum(centered)
        sum_sq += np.vecdot(centered, centered).sum(axis=0)
    mean, var, invstd, scale, shift = _statistics(
        mean, residual, sum_sq, m, gamma, beta, eps, x3.dtype
    )
    # (3) and (4) applied to the x − μ already in y (subtracting μ before scaling keeps
    # float32 accurate far from zero)
    scale_row, shift_row = (_sample_row(a, n, length, x3.dtype) for a in (scale, shift))
    for block in _blocks(n, c * length):
        out = y[block]
        out *= scale_row
        out += shift_row
    cache = BNCache(x=x, mean=mean, var=var, invstd=invstd, gamma=gamma, eps=eps)
    return y.reshape(x.shape), cache


def _rows_backward(dy3, x3, cache: BNCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, c, length = x3.shape
    m = n * length
    mean = _sample_row(cache.mean, n, length, x3.dtype)
    # Per-channel Σ dy and Σ dy·(x − μ), a block at a time, with x − μ written into the
    # output (it is needed again below); Σ dy·x̂ = σ⁻¹ · Σ dy·(x − μ).
    dx = np.empty_like(x3)
    sum_dy = np.zeros(c, dtype=x3.dtype)
    sum_dy_xc = np.zeros(c, dtype=x3.dtype)
    for block in _blocks(n, c * length):
        sum_dy += _channel_sum(dy3[block])
        centered = np.subtract(x3[block], mean, out=dx[block])
        sum_dy_xc += np.vecdot(dy3[block], centered).sum(axis=0)
    dgamma, dbeta, k, c1, c2 = _input_gradient_coefficients(cache, sum_dy, sum_dy_xc, m)
    k, c1, c2 = (_sample_row(a, n, length, x3.dtype) for a in (k, c1, c2))
    _input_gradient(dx, dy3, k, c1, c2, _blocks(n, c * length))
    return dx.reshape(cache.x.shape), dgamma, dbeta


def _sample_row(coefficient: np.ndarray, n: int, length: int, dtype) -> np.ndarray:
    """A per-channel (C,) vector laid out like one of ``n`` samples, (C, L), or as a (C, 1) column
    to broadcast (see ``_COEFFICIENT_ROW_MAX``)."""
    small = coefficient.size * length <= _COEFFICIENT_ROW_MAX
    if not (small and n >= _COEFFICIENT_ROW_MIN_SAMPLES):
        return coefficient.astype(dtype, copy=False)[:, None]
    return _repeat(coefficient, 1, length, dtype).reshape(coefficient.size, length)


# --------------------------------------------------------- short rows: per sample, C·L wide


# NumPy's loops with a per-column coefficient row run at full speed only on wide rows: a dense
# (N, C) table is viewed as (N/r, r·C), r samples per row, with the coefficients repeated r times.
_WIDE_ROW = 1 << 14


@functools.lru_cache(maxsize=256)
def _samples_per_row(n: int, per_sample: int) -> int:
    """The r of the table (N/r, r·C·L): the smallest divisor of N that gives a wide row."""
    least = -(-_WIDE_ROW // per_sample)  # ceil
    if least <= 1 or n * per_sample < 4 * _WIDE_ROW:  # wide already, or too small to matter
        return 1
    if least >= n:
        return n
    divisors = (d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i))
    return min(d for d in divisors if d >= least)


def _columns(a3: np.ndarray, r: int) -> np.ndarray:
    """(N, C, L) as an (N/r, r·C·L) table: r samples per row."""
    return a3.reshape(a3.shape[0] // r, -1)


def _repeat(coefficient: np.ndarray, r: int, length: int, dtype) -> np.ndarray:
    """A per-channel (C,) vector laid out like one row of the table: (r·C·L,)."""
    if r == length == 1:
        return coefficient.astype(dtype, copy=False)
    row = np.empty((r, coefficient.size, length), dtype=dtype)
    row[...] = coefficient[:, None]
    return row.reshape(-1)


def _fold(row: np.ndarray, r: int, length: int) -> np.ndarray:
    """Per-channel sums of a row laid out like the table's: (r·C·L,) to (C,)."""
    if r > 1:
        row = np.add.reduce(row.reshape(r, -1), axis=0)
    if length > 1:
        row = row.reshape(-1, length) @ np.ones(length, dtype=row.dtype)
    return row


def _columns_forward(x, x3, gamma, beta, eps) -> tuple[np.ndarray, BNCache]:
    """Short rows (L < ``_LONG_ROW``): column sums of an (N/r, r·C·L) table as ``ones @ table``.

    The same passes as :func:`_rows_forward`; each per-channel sum is a matrix-vector product
    over the rows of the table followed by a fold of the columns of a channel.
    """
    n, c, length = x3.shape
    r = _samples_per_row(n, c * length)
    x2 = _columns(x3, r)
    dtype, m, width = x2.dtype, n * length, x2.shape[1]
    ones = np.ones(x2.shape[0], dtype=dtype)
    mean = _fold(ones @ x2, r, length) / m  # (1)
    mean_row = _repeat(mean, r, length, dtype)
    y = np.empty_like(x2)
    residual = np.zeros(width, dtype=dtype)
    sum_sq = np.zeros(width, dtype=dtype)
    for block in _blocks(x2.shape[0], width):
        centered = np.subtract(x2[block], mean_row, out=y[block])  # x − μ
        residual += ones[block] @ centered
        sum_sq += np.einsum("ij,ij->j", centered, centered)
    residual, sum_sq = _fold(residual, r, length), _fold(sum_sq, r, length)
    mean, var, invstd, scale, shift = _statistics(
        mean, residual, sum_sq, m, gamma, beta, eps, dtype
    )
    scale_row, shift_row = (_repeat(a, r, length, dtype) for a in (scale, shift))
    for block in _blocks(x2.shape[0], width):
        out = y[block]
        out *= scale_row  # (3) and (4)
        out += shift_row
    cache = BNCache(x=x, mean=mean, var=var, invstd=invstd, gamma=gamma, eps=eps)
    return y.reshape(x.shape), cache


def _columns_backward(dy3, x3, cache: BNCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, c, length = x3.shape
    r = _samples_per_row(n, c * length)
    x2, dy2 = _columns(x3, r), _columns(dy3, r)
    dtype, m, width = dy2.dtype, n * length, dy2.shape[1]
    ones = np.ones(dy2.shape[0], dtype=dtype)
    mean_row = _repeat(cache.mean, r, length, dtype)
    dx = np.empty_like(dy2)
    sum_dy = np.zeros(width, dtype=dtype)
    sum_dy_xc = np.zeros(width, dtype=dtype)
    for block in _blocks(dy2.shape[0], width):
        centered = np.subtract(x2[block], mean_row, out=dx[block])  # x − μ, needed below
        sum_dy += ones[block] @ dy2[block]
        sum_dy_xc += np.einsum("ij,ij->j", dy2[block], centered)
    sum_dy, sum_dy_xc = _fold(sum_dy, r, length), _fold(sum_dy_xc, r, length)
    dgamma, dbeta, k, c1, c2 = _input_gradient_coefficients(cache, sum_dy, sum_dy_xc, m)
    k, c1, c2 = (_repeat(a, r, length, dtype) for a in (k, c1, c2))
    _input_gradient(dx, dy2, k, c1, c2, _blocks(dy2.shape[0], width))
    return dx.reshape(cache.x.shape), dgamma, dbeta


def batch_norm_inference(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = 1e-5,
) -> np.ndarray:
    """Inference-mode batch norm: one fixed affine map per channel, y = γ (x − μ) / sqrt(σ² + ε) + β.

    Shapes as in :func:`batch_norm_forward`; ``running_mean`` and ``running_var`` have shape (C,).
    """
    x = _check_x(x)
    gamma = _check_param(gamma, "gamma", x)
    beta = _check_param(beta, "beta", x)
    running_mean = _check_param(running_mean, "running_mean", x)
    running_var = _check_param(running_var, "running_var", x)
    check_eps(eps)
    scale = gamma / np.sqrt(running_var + eps)
    shift = beta - scale * running_mean
    x3, _ = _as_ncl(x)
    return (x3 * scale[:, None] + shift[:, None]).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# The stateful layer
# --------------------------------------------------------------------------------------------


class BatchNorm:
    """A NumPy batch-norm layer with running statistics, mirroring ``torch.nn.BatchNorm*d``.

    Same arguments, attribute names and conventions as PyTorch: ``momentum`` is the weight of the *new*
    batch statistic (``running = (1 − momentum) · running + momentum · batch``), ``momentum=None``
    gives the cumulative average, ``running_var`` is the *unbiased* variance while training normalises
    with the biased one, and ``training`` (set by :meth:`train` / :meth:`eval`) selects batch or running
    statistics.

    Parameters
    ----------
    num_features : int
        C, the number of channels (axis 1 of the input).
    eps : float
        ε > 0.
    momentum : float or None
        In [0, 1], or None for a cumulative moving average.
    affine : bool
        Learn γ (``weight``) and β (``bias``); otherwise γ = 1, β = 0.
    track_running_stats : bool
        Keep ``running_mean``/``running_var``; if False, batch statistics are used in both modes.
    dtype : numpy dtype
        Dtype of parameters and buffers.

    Attributes
    ----------
    weight, bias : ndarray (C,) or None
    running_mean, running_var : ndarray (C,) or None
    num_batches_tracked : int or None
    grad_weight, grad_bias : ndarray (C,) or None
        Set by :meth:`backward`.

    >>> layer = BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(size=(16, 3, 4, 4))
    >>> layer(x).shape, layer.num_batches_tracked
    ((16, 3, 4, 4), 1)
    >>> layer.backward(np.ones_like(x)).shape
    (16, 3, 4, 4)
    >>> layer.eval()(x[:1]).shape
    (1, 3, 4, 4)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype=np.float64,
    ) -> None:
        check_num_features(num_features)
        check_eps(eps)
        check_momentum(momentum)
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.dtype = np.dtype(dtype)
        self.weight = np.ones(num_features, self.dtype) if affine else None
        self.bias = np.zeros(num_features, self.dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features, self.dtype)
            self.running_var = np.ones(num_features, self.dtype)
            self.num_batches_tracked: int | None = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self.training = True
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._cache: BNCache | None = None

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats})"
        )

    def train(self, mode: bool = True) -> BatchNorm:
        """Use batch statistics (and update the running ones) if ``mode``; returns ``self``."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Use the running statistics; returns ``self``."""
        return self.train(False)

    def _gamma_beta(self) -> tuple[np.ndarray, np.ndarray]:
        if self.affine:
            return self.weight, self.bias
        return np.ones(self.num_features, self.dtype), np.zeros(self.num_features, self.dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalise ``x`` of shape (N, C, *spatial); in training mode also update running statistics."""
        x = _check_x(x)
        if x.shape[1] != self.num_features:
            raise ChannelMismatchError(
                f"x must have shape (N, {self.num_features}, *spatial) for num_features="
                f"{self.num_features}, got {shape_str(x.shape)}"
            )
        gamma, beta = self._gamma_beta()
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            y, cache = batch_norm_forward(x, gamma, beta, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(cache)
        else:
            mean = self.running_mean.astype(x.dtype)
            var = self.running_var.astype(x.dtype)
            invstd = 1.0 / np.sqrt(var + self.eps)
            cache = BNCache(x, mean, var, invstd, gamma.astype(x.dtype), self.eps)
            y = batch_norm_inference(x, gamma, beta, mean, var, self.eps)
        self._cache = cache
        self._batch_stats = use_batch_stats
        return y

    __call__ = forward

    def _update_running_stats(self, cache: BNCache) -> None:
        """The momentum rule, applied in place: the arrays keep their identity and dtype.

        Like PyTorch, an empty batch counts as a batch (``num_batches_tracked`` grows) but leaves
        the running statistics unchanged: it has no statistics to contribute.
        """
        self.num_batches_tracked += 1
        if cache.x.size == 0:
            return
        m = cache.m
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        unbiased = cache.var * (m / (m - 1))  # m > 1: checked by the forward pass
        for running, batch in ((self.running_mean, cache.mean), (self.running_var, unbiased)):
            running *= 1 - factor
            running += (factor * batch).astype(running.dtype, copy=False)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Return ∂ℓ/∂x for the last :meth:`forward`; store ∂ℓ/∂γ and ∂ℓ/∂β in ``grad_weight``/``grad_bias``.

        In training mode the statistics depend on x and the full closed form applies; with running
        statistics the layer is a fixed affine map and ∂ℓ/∂x = γ σ⁻¹ ∂ℓ/∂y.
        """
        if self._cache is None:
            raise RuntimeError("backward() called before forward()")
        cache = self._cache
        if self._batch_stats:
            dx, dgamma, dbeta = batch_norm_backward(dy, cache)
        else:
            dy = check_grad_shape(dy, cache.x.shape)
            dy3, _ = _as_ncl(dy)
            x_hat3, _ = _as_ncl(cache.x_hat)
            dbeta = _channel_sum(dy3)
            dgamma = np.vecdot(dy3, x_hat3).sum(axis=0)
            dx = (dy3 * (cache.gamma * cache.invstd)[:, None]).reshape(dy.shape)
        if self.affine:
            self.grad_weight, self.grad_bias = dgamma, dbeta
        return dx
