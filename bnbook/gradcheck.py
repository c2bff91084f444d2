"""Checking one implementation against another: gradients by central differences, and gaps.

* :func:`numerical_gradient` and :func:`relative_error`: an analytic gradient against central
  differences; :func:`pair_errors` runs the check for a NumPy ``forward``/``backward`` pair
  (chapters ``ch-backprop``, ``ch-beyond``).
* :func:`max_gap` and :func:`module_gaps`: two implementations of the same layer (the package's
  against torch's, torch's against Keras's), compared on outputs, input gradients, parameter
  gradients and evaluation-mode outputs.

>>> import numpy as np
>>> from bnbook.gradcheck import numerical_gradient, relative_error
>>> x = np.array([1.0, 2.0, 3.0])
>>> g = numerical_gradient(lambda x: (x ** 2).sum(), x)
>>> relative_error(g, 2 * x) < 1e-8
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["numerical_gradient", "relative_error", "pair_errors", "max_gap", "module_gaps"]


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


def pair_errors(
    forward: Callable[..., tuple],
    backward: Callable[..., tuple],
    args: Sequence[np.ndarray],
    dout: np.ndarray,
    h: float = 1e-6,
    wrt: Sequence[int] | None = None,
) -> list[float]:
    """Relative errors of a NumPy ``forward``/``backward`` pair against central differences.

    ``forward(*args)`` returns ``(out, cache)`` and ``backward(dout, cache)`` the gradients with
    respect to each of ``args``, in order (the CS231n shape of :mod:`bnbook.numpy`).

    Parameters
    ----------
    forward, backward : callable
    args : sequence of ndarray
        Converted to float64.
    dout : ndarray
        The upstream gradient, shaped like ``forward``'s output.
    h : float
        Step of the central differences.
    wrt : sequence of int or None
        Indices of the arguments to check (None: all); ``backward`` may return None for others.

    Returns
    -------
    list of float
        :func:`relative_error` of each checked analytic gradient against
        :func:`numerical_gradient`, in the order of ``wrt``.

    Examples
    --------
    >>> from bnbook.numpy import batch_norm_backward, batch_norm_forward
    >>> rng = np.random.default_rng(0)
    >>> x, g, b, dy = rng.normal(size=(8, 3)), rng.normal(size=3), rng.normal(size=3), rng.normal(size=(8, 3))
    >>> max(pair_errors(batch_norm_forward, batch_norm_backward, (x, g, b), dy)) < 1e-7
    True
    """
    args = [np.asarray(a, dtype=np.float64) for a in args]
    _, cache = forward(*args)
    analytic = backward(dout, cache)
    errors = []
    for k in range(len(args)) if wrt is None else wrt:
        arg = args[k]

        def output(v: np.ndarray, k: int = k) -> np.ndarray:
            return forward(*args[:k], v, *args[k + 1 :])[0]

        errors.append(relative_error(analytic[k], numerical_gradient(output, arg, dout, h)))
    return errors


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device
        return a.detach().cpu().numpy()
    return np.asarray(a)


def max_gap(a, b) -> float:
    """Largest ``|a − b|`` over all elements, for NumPy arrays or tensors (on any device).

    >>> max_gap(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    0.5
    """
    a, b = _numpy(a), _numpy(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def module_gaps(ours, theirs, x, dy=None, *, eval_mode: bool = False) -> dict[str, float]:
    """Largest differences between two torch modules given the same input and upstream gradient.

    Both run on ``x`` (each on its own copy that requires a gradient) in their current mode; the
    outputs are back-propagated with ``dy`` (default: a draw of ``torch.randn_like``, so the check
    covers every output element with a different weight).

    Parameters
    ----------
    ours, theirs : nn.Module
        With parameters in the same order and of the same shapes (or none).
    x : Tensor
    dy : Tensor or None
    eval_mode : bool
        Also compare the outputs in evaluation mode (the modules' modes are restored).

    Returns
    -------
    dict
        ``"output"``, ``"input grad"``, ``"param grads"`` (0 without parameters), and
        ``"eval output"`` if ``eval_mode``.

    Examples
    --------
    >>> import torch
    >>> from bnbook.torch import BatchNorm1d
    >>> gaps = module_gaps(BatchNorm1d(3), torch.nn.BatchNorm1d(3), torch.randn(8, 3), eval_mode=True)
    >>> max(gaps.values()) < 1e-5, sorted(gaps)
    (True, ['eval output', 'input grad', 'output', 'param grads'])
    """
    import torch  # noqa: PLC0415 (NumPy-only users of this module need no torch)

    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    dy = torch.randn_like(y1) if dy is None else dy
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    pairs = zip(ours.parameters(), theirs.parameters(), strict=True)
    gaps = {
        "output": max_gap(y1, y2),
        "input grad": max_gap(x1.grad, x2.grad),
        "param grads": max((max_gap(p.grad, q.grad) for p, q in pairs), default=0.0),
    }
    if eval_mode:
        modes = ours.training, theirs.training
        with torch.no_grad():
            gaps["eval output"] = max_gap(ours.eval()(x), theirs.eval()(x))
        ours.train(modes[0]), theirs.train(modes[1])
    return gaps
