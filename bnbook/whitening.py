"""What whitening costs, against batch norm: operation counts and the ZCA transform itself.

Chapter ``ch-why`` asks why a network does not whiten every layer's inputs instead of normalising
each feature. :func:`whitening_flops` and :func:`batch_norm_flops` count the floating-point
operations of full (ZCA) whitening and of per-feature batch normalisation of an ``(m, d)``
mini-batch; :func:`zca_whiten` is the differentiable whitening itself, for timing it.

>>> whitening_flops(60, 100).total > 100 * batch_norm_flops(60, 100).total
True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from bnbook._checks import check_positive_int

__all__ = ["FlopCount", "whitening_flops", "batch_norm_flops", "zca_whiten"]


class FlopCount(NamedTuple):
    """Floating-point operations (a multiply-add counts as 2) of one normalisation, by stage."""

    statistics: int  #: mean and (co)variance of the mini-batch
    factorisation: int  #: turning the (co)variance into the normalising matrix / scale
    apply: int  #: normalising the m × d mini-batch (and γ, β for batch norm)

    @property
    def total(self) -> int:
        return self.statistics + self.factorisation + self.apply


def _sizes(m: int, d: int) -> tuple[int, int]:
    """(m, d) as Python ints (NumPy integers accepted), each checked to be at least 1."""
    m, d = (int(v) if isinstance(v, np.integer) else v for v in (m, d))
    check_positive_int("m", m)
    check_positive_int("d", d)
    return m, d


def whitening_flops(m: int, d: int) -> FlopCount:
    """Operations to ZCA-whiten an (m, d) mini-batch: ``(x − μ) Σ^{-1/2}``.

    Counted as: mean ``m·d`` additions; covariance ``(x − μ)ᵀ(x − μ)``, ``m·d`` subtractions then
    ``m·d²`` multiply-adds (both triangles, as a GEMM computes them); symmetric eigendecomposition
    with eigenvectors ≈ ``9 d³`` (the standard estimate for the symmetric QR algorithm; Golub and
    Van Loan, *Matrix Computations*, 4th ed., Sec. 8.3); ``Σ^{-1/2} = U diag(λ^{-1/2}) Uᵀ``,
    ``d³`` multiply-adds (+ ``2d`` for the square roots); applying it, ``m·d²`` multiply-adds.

    Parameters
    ----------
    m, d : int
        Mini-batch size and number of features.

    Returns
    -------
    FlopCount
        ``statistics = m·d + m·d + 2·m·d²``, ``factorisation = 9·d³ + 2·d³ + 2·d``,
        ``apply = 2·m·d²``.

    Examples
    --------
    >>> whitening_flops(60, 100)
    FlopCount(statistics=1212000, factorisation=11000200, apply=1200000)
    """
    m, d = _sizes(m, d)
    return FlopCount(
        statistics=2 * m * d + 2 * m * d * d,
        factorisation=9 * d**3 + 2 * d**3 + 2 * d,
        apply=2 * m * d * d,
    )


def batch_norm_flops(m: int, d: int) -> FlopCount:
    """Operations of batch normalisation, equations (1)–(4), of an (m, d) mini-batch.

    Counted as: mean ``m·d``; variance, ``m·d`` subtractions and ``m·d`` multiply-adds;
    per-feature scale ``γ/sqrt(σ² + ε)``, ``3·d``; applying ``(x − μ)·scale + β``, ``3·m·d``.

    Parameters and result as in :func:`whitening_flops`: ``statistics = 4·m·d``,
    ``factorisation = 3·d``, ``apply = 3·m·d``.

    Examples
    --------
    >>> batch_norm_flops(60, 100)
    FlopCount(statistics=24000, factorisation=300, apply=18000)
    """
    m, d = _sizes(m, d)
    return FlopCount(statistics=4 * m * d, factorisation=3 * d, apply=3 * m * d)


def zca_whiten(x: Tensor, eps: float = 1e-5) -> Tensor:
    """ZCA-whiten a mini-batch: ``(x − μ) (Σ + εI)^{-1/2}``, differentiable (through ``eigh``).

    The output's covariance (with the biased 1/m convention of equation (2)) is the identity when
    ``m > d`` and ε → 0. With ``m ≤ d`` the sample covariance has rank at most ``m − 1`` and only ε
    keeps the inverse square root finite.

    Parameters
    ----------
    x : Tensor, shape (m, d)
        Floating point; m ≥ 2.
    eps : float
        Added to the covariance's diagonal; > 0.

    Returns
    -------
    Tensor, shape (m, d)

    Raises
    ------
    ValueError
        ``x`` not 2-D, fewer than 2 rows, or ``eps <= 0``.

    Examples
    --------
    >>> x = torch.randn(500, 3, dtype=torch.float64) @ torch.tensor([[2.0, 1, 0], [0, 1, 0], [0, 0, 3]],
    ...                                                            dtype=torch.float64)
    >>> w = zca_whiten(x, eps=1e-12)
    >>> w.shape, torch.allclose(w.T @ w / 500, torch.eye(3, dtype=torch.float64), atol=1e-8)
    (torch.Size([500, 3]), True)
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (m, d) with m >= 2, got {shape}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / x.shape[0]
    cov = cov + eps * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    inv_sqrt = (eigvecs * eigvals.rsqrt()) @ eigvecs.T
    return centred @ inv_sqrt
