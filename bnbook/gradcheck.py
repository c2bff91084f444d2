"""Numerical gradients by central differences, and the relative error to compare them with.

>>> import numpy as np
>>> from bnbook.gradcheck import numerical_gradient, relative_error
>>> x = np.array([1.0, 2.0, 3.0])
>>> g = numerical_gradient(lambda x: (x ** 2).sum(), x)
>>> relative_error(g, 2 * x) < 1e-8
True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["numerical_gradient", "relative_error"]


def numerical_gradient(
    f: Callable[[np.ndarray], np.ndarray | float],
    x: np.ndarray,
    dout: np.ndarray | None = None,
    h: float = 1e-6,
) -> np.ndarray:
    """Gradient of ``sum(f(x) * dout)`` with respect to ``x``, by central differences.

    For each element, ``(g(x + h e_i) − g(x − h e_i)) / 2h`` where ``g(x) = Σ f(x)·dout``; the error is
    O(h²) from truncation plus O(ε_machine / h) from rounding, so use float64 and h ≈ 1e-5–1e-6.

    Parameters
    ----------
    f : callable
        ``f(x)`` returns an array (or a scalar). It must not keep a reference to ``x``: it is called
        on a perturbed copy.
    x : ndarray, float64
        Where to differentiate. Not modified.
    dout : ndarray or None
        Upstream gradient, the shape of ``f(x)``; None means ``f`` returns a scalar (or ones).
    h : float
        Step.

    Returns
    -------
    ndarray, shape of ``x``
    """
    x = np.array(x, dtype=np.float64)  # a private copy: the caller's array is never touched
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)

    def g() -> float:
        out = np.asarray(f(x), dtype=np.float64)
        return float((out * (1.0 if dout is None else dout)).sum())

    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = g()
        flat[i] = old - h
        minus = g()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """``max |a − b| / max(|a| + |b|)`` over all elements (0 when both are 0).

    Scale-free, unlike an absolute difference: around 1e-7 or below for a correct analytic gradient
    against a float64 central difference, around 1e-2 or more for a wrong one.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    scale = max(float(np.max(np.abs(a) + np.abs(b), initial=0.0)), floor)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale
