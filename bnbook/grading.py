"""Checks a student can run on their own implementation, with a diagnosis when it is wrong.

Each ``check_*`` function calls the student's function on random inputs of several shapes and on
the edge cases that catch most bugs (a batch of two, a nearly constant channel, a large ε), compares
it with the package's from-scratch reference (:mod:`bnbook.numpy`, :mod:`bnbook.norms`) and, where a
gradient is involved, with finite differences. When the answer is wrong, it does not stop at "wrong":
it recomputes the answer that each common mistake would give, and if the student's output matches
one of them, the message names that mistake::

    GradingError: dγ is off by a factor of m = 8: did you average over the batch instead of summing?

A passing check prints one line and returns None; a failing one raises :class:`GradingError` (an
``AssertionError``, so it also fails a test). The data derive from ``bnbook.seed`` (so
``BNBOOK_SEED`` gives a class another draw) and from the ``seed`` argument.

>>> import numpy as np
>>> def my_forward(x, gamma, beta, eps=1e-5):
...     mu = x.mean(axis=0)
...     var = ((x - mu) ** 2).mean(axis=0)
...     return gamma * (x - mu) / np.sqrt(var + eps) + beta
>>> check_batch_norm_forward(my_forward)
check_batch_norm_forward: 6 cases passed
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from bnbook import seed as run_seed
from bnbook.gradcheck import numerical_gradient

__all__ = [
    "GradingError",
    "check_batch_norm_forward",
    "check_batch_norm_backward",
    "check_running_statistics",
    "check_spatial_batch_norm",
    "check_standardize",
]

EPS = 1e-5
# Dense shapes (m, d): a typical batch, the smallest batch, a single feature.
DENSE_SHAPES = [(16, 5), (2, 3), (9, 1)]


class GradingError(AssertionError):
    """A student's implementation gave a wrong answer; the message says what is probably wrong."""


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([run_seed(0), seed])


def _output(result, name: str) -> np.ndarray:
    """The array a function returned (its first element if it returned ``(y, cache)``)."""
    if isinstance(result, tuple):
        result = result[0]
    if not isinstance(result, np.ndarray):
        raise GradingError(f"{name} must return a NumPy array, got {type(result).__name__}")
    return result


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-7) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=tol, atol=tol))


def _diagnose(got: np.ndarray, candidates: dict[str, np.ndarray], fallback: str) -> str:
    for message, wrong in candidates.items():
        if _close(got, wrong, 1e-6):
            return message
    return fallback


def _dense_case(rng: np.random.Generator, shape: tuple[int, int]):
    m, d = shape
    x = rng.normal(3.0, 2.0, size=shape) * rng.uniform(0.5, 4.0, size=d)
    gamma, beta = rng.normal(1.0, 0.5, size=d), rng.normal(0.0, 1.0, size=d)
    return x, gamma, beta


def _call_unmutated(fn: Callable, name: str, *args, **kwargs):
    """Call ``fn`` on copies and fail if it changed any array argument."""
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    result = fn(*args, **kwargs)
    for i, (before, after) in enumerate(zip(copies, args, strict=True)):
        if isinstance(before, np.ndarray) and not np.array_equal(before, after):
            raise GradingError(
                f"{name} modified its argument number {i + 1} in place; "
                "compute into new arrays and leave the inputs as they were"
            )
    return result


def _report(name: str, cases: int) -> None:
    print(f"{name}: {cases} cases passed")


# --- forward ----------------------------------------------------------------------------------


def _forward_mistakes(x, gamma, beta, eps) -> dict[str, np.ndarray]:
    m = x.shape[0]
    mu, var = x.mean(axis=0), x.var(axis=0)
    x_hat = (x - mu) / np.sqrt(var + eps)
    row_mu, row_var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    mistakes = {
        "normalised each example (row) over its features; batch norm normalises each feature "
        "(column) over the batch: take the mean and variance over axis 0": gamma
        * (x - row_mu)
        / np.sqrt(row_var + eps)
        + beta,
        "γ and β are not applied: the output must be γ·x̂ + β (eq. (2.4))": x_hat,
        "γ and β are swapped: γ scales x̂ and β shifts it": beta * x_hat + gamma,
        "ε belongs inside the square root, √(σ² + ε), not added to the standard deviation": gamma
        * (x - mu)
        / (np.sqrt(var) + eps)
        + beta,
        "the variance is not centred: σ² is the mean of (x − μ)², not of x²": gamma
        * (x - mu)
        / np.sqrt((x**2).mean(axis=0) + eps)
        + beta,
    }
    if m > 1:
        unbiased = var * m / (m - 1)
        key = (
            "the variance divides by m − 1: training normalises with the biased variance "
            "(divide by m); m − 1 appears only in the running variance"
        )
        mistakes[key] = gamma * (x - mu) / np.sqrt(unbiased + eps) + beta
    return mistakes


def check_batch_norm_forward(fn: Callable, *, seed: int = 0) -> None:
    """Check ``fn(x, gamma, beta, eps=1e-5)``: training-mode batch norm of an (m, d) array.

    ``fn`` may return ``y`` or ``(y, cache)``. Checked: random batches of shapes (16, 5), (2, 3) and
    (9, 1) against :func:`bnbook.numpy.batch_norm_forward`; a batch of two (every x̂ is ±1 up to ε,
    source eq. (3)); a constant feature (the output is β); a large ε; inputs left unchanged.

    Raises
    ------
    GradingError
        With the most likely mistake when the output matches a known wrong answer.
    """
    from bnbook.numpy import batch_norm_forward

    name = "check_batch_norm_forward"
    rng = _rng(seed)
    cases = [(*_dense_case(rng, shape), EPS) for shape in DENSE_SHAPES]
    x, gamma, beta = _dense_case(rng, (12, 4))
    x[:, 1] = 0.7  # a constant feature: x̂ = 0, so y = β
    cases.append((x, gamma, beta, EPS))
    cases.append((*_dense_case(rng, (10, 3)), 0.5))  # ε not negligible
    x, gamma, beta = _dense_case(rng, (2, 4))
    cases.append((x, np.ones(4), np.zeros(4), EPS))  # m = 2: ±1
    for x, gamma, beta, eps in cases:
        got = _output(_call_unmutated(fn, name, x, gamma, beta, eps=eps), name)
        want, _ = batch_norm_forward(x, gamma, beta, eps=eps)
        if got.shape != want.shape:
            raise GradingError(f"output has shape {got.shape}, expected {want.shape} (same as x)")
        if not _close(got, want):
            where = f"on a batch of shape {x.shape} with ε = {eps:g}"
            fallback = (
                f"output differs from batch norm {where}: largest difference "
                f"{np.abs(got - want).max():.3g}"
            )
            raise GradingError(
                f"{_diagnose(got, _forward_mistakes(x, gamma, beta, eps), fallback)}"
            )
    _report(name, len(cases))


# --- backward ---------------------------------------------------------------------------------


def _backward_mistakes(x, gamma, dy, eps) -> dict[str, dict[str, np.ndarray]]:
    """What dx, dγ, dβ look like after each common mistake."""
    m = x.shape[0]
    mu, var = x.mean(axis=0), x.var(axis=0)
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mu) * invstd
    dbeta, dgamma = dy.sum(axis=0), (dy * x_hat).sum(axis=0)
    g = gamma * invstd
    return {
        "dx": {
            "dx treats μ and σ² as constants: x also reaches the output through μ_𝓑 and σ²_𝓑, "
            "which contribute −mean(∂𝓛/∂x̂) and −x̂·mean(∂𝓛/∂x̂ · x̂)": g * dy,
            "dx is missing the path through σ²_𝓑 (the term −x̂·mean(∂𝓛/∂x̂ · x̂))": g
            * (dy - dy.mean(axis=0)),
            "dx is missing the path through μ_𝓑 (the term −mean(∂𝓛/∂x̂))": g
            * (dy - x_hat * (dy * x_hat).mean(axis=0)),
            "dx forgets the factor γ: ∂𝓛/∂x̂ = γ·∂𝓛/∂y": invstd
            * (dy - dbeta / m - x_hat * dgamma / m),
            f"dx is off by a factor of m = {m}: the mean and variance terms are averages (1/m)": g
            * (m * dy - dbeta - x_hat * dgamma),
        },
        "dgamma": {
            f"dγ is off by a factor of m = {m}: did you average over the batch instead of "
            "summing?": dgamma / m,
            "dγ must be Σ ∂𝓛/∂y · x̂ (the normalised input), not · x": (dy * x).sum(axis=0),
        },
        "dbeta": {
            f"dβ is off by a factor of m = {m}: did you average over the batch instead of "
            "summing?": dbeta / m,
        },
    }


def check_batch_norm_backward(forward: Callable, backward: Callable, *, seed: int = 0) -> None:
    """Check ``backward(dy, cache) -> (dx, dgamma, dbeta)`` with ``forward(x, gamma, beta, eps)``.

    ``forward`` returns ``(y, cache)`` in the student's own cache format. Checked against
    :func:`bnbook.numpy.batch_norm_backward` and, for dx, against finite differences of the
    student's forward, on shapes (16, 5), (2, 3) and (9, 1) and with a large ε.

    Raises
    ------
    GradingError
        With the most likely mistake when a gradient matches a known wrong answer.
    """
    from bnbook.numpy import batch_norm_backward, batch_norm_forward

    name = "check_batch_norm_backward"
    rng = _rng(seed + 1)
    cases = [(*_dense_case(rng, shape), EPS) for shape in DENSE_SHAPES]
    cases.append((*_dense_case(rng, (6, 2)), 0.5))
    for x, gamma, beta, eps in cases:
        result = forward(x, gamma, beta, eps=eps)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise GradingError("forward must return (y, cache): backward needs the cache")
        y, cache = result
        want_y, ref_cache = batch_norm_forward(x, gamma, beta, eps=eps)
        if not _close(np.asarray(y), want_y):
            raise GradingError(
                "the forward pass is wrong; run check_batch_norm_forward on it first"
            )
        dy = rng.normal(size=x.shape)
        grads = _call_unmutated(backward, name, dy, cache)
        if not (isinstance(grads, tuple) and len(grads) == 3):
            raise GradingError("backward must return the tuple (dx, dgamma, dbeta)")
        want = dict(zip(("dx", "dgamma", "dbeta"), batch_norm_backward(dy, ref_cache), strict=True))
        mistakes = _backward_mistakes(x, gamma, dy, eps)
        for key, got in zip(("dx", "dgamma", "dbeta"), grads, strict=True):
            got = np.asarray(got)
            if got.shape != want[key].shape:
                raise GradingError(f"{key} has shape {got.shape}, expected {want[key].shape}")
            if not _close(got, want[key], 1e-6):
                fallback = (
                    f"{key} is wrong on a batch of shape {x.shape}: largest difference "
                    f"{np.abs(got - want[key]).max():.3g}"
                )
                raise GradingError(_diagnose(got, mistakes[key], fallback))

        # dx against finite differences of the student's own forward: the formula, not the package
        def student_y(z, gamma=gamma, beta=beta, eps=eps):
            return _output(forward(z, gamma, beta, eps=eps), "forward")

        numeric = numerical_gradient(student_y, x, dout=dy)
        if not _close(np.asarray(grads[0]), numeric, 1e-5):
            raise GradingError("dx disagrees with finite differences of your forward pass")
    _report(name, len(cases))


# --- running statistics -----------------------------------------------------------------------


def check_running_statistics(fn: Callable, *, seed: int = 0) -> None:
    """Check ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)``.

    PyTorch's convention, eq. (5.1) of ch-inference: ``new = (1 − momentum)·old + momentum·batch``,
    with the *unbiased* batch variance for ``running_var``. Checked from the initial state (0, 1),
    from a random state, with momentum 0.1, 0.5 and 1, and on a batch of two.

    Raises
    ------
    GradingError
        With the most likely mistake (Keras's momentum convention, the biased variance, ...).
    """
    name = "check_running_statistics"
    rng = _rng(seed + 2)
    cases = []
    for (m, d), momentum in zip([(16, 4), (2, 3), (9, 2)], [0.1, 0.5, 1.0], strict=True):
        x = rng.normal(2.0, 3.0, size=(m, d))
        cases.append((np.zeros(d), np.ones(d), x, momentum))
        cases.append((rng.normal(size=d), rng.uniform(0.5, 2.0, size=d), x, momentum))
    for mean0, var0, x, a in cases:
        m = x.shape[0]
        mu, var = x.mean(axis=0), x.var(axis=0)
        unbiased = var * m / (m - 1)
        result = _call_unmutated(fn, name, mean0, var0, x, a)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise GradingError("return the tuple (new_mean, new_var)")
        new_mean, new_var = (np.asarray(r, dtype=np.float64) for r in result)
        want_mean, want_var = (1 - a) * mean0 + a * mu, (1 - a) * var0 + a * unbiased
        if not _close(new_mean, want_mean):
            raise GradingError(
                _diagnose(
                    new_mean,
                    {
                        "momentum is the weight of the new batch statistic in PyTorch's "
                        "convention: (1 − momentum)·old + momentum·batch (Keras uses the "
                        "opposite)": a * mean0 + (1 - a) * mu,
                        "the running mean is not averaged: keep (1 − momentum) of the old "
                        "value": mu,
                    },
                    f"running mean wrong with momentum {a}: expected {want_mean}, got {new_mean}",
                )
            )
        if not _close(new_var, want_var):
            raise GradingError(
                _diagnose(
                    new_var,
                    {
                        f"running_var takes the unbiased batch variance, m/(m − 1)·σ² (here "
                        f"m = {m}), while the batch itself is normalised with the biased one": (
                            1 - a
                        )
                        * var0
                        + a * var,
                        "momentum is the weight of the new batch statistic in PyTorch's "
                        "convention: (1 − momentum)·old + momentum·batch": a * var0
                        + (1 - a) * unbiased,
                        "running_var must average variances, not standard deviations": (1 - a)
                        * var0
                        + a * np.sqrt(unbiased),
                    },
                    f"running variance wrong with momentum {a}: expected {want_var}, got {new_var}",
                )
            )
    _report(name, len(cases))


# --- spatial batch norm -----------------------------------------------------------------------


def check_spatial_batch_norm(fn: Callable, *, seed: int = 0) -> None:
    """Check ``fn(x, gamma, beta, eps=1e-5)`` on (N, C, H, W) arrays: one (γ, β) pair per channel.

    Each channel is normalised over its N·H·W values (ch-conv). Checked against
    :func:`bnbook.numpy.batch_norm_forward` on shapes (4, 3, 5, 5), (2, 2, 3, 4) and (1, 3, 4, 4)
    (a batch of one still has H·W values per channel), and inputs left unchanged.

    Raises
    ------
    GradingError
        With the most likely mistake (per-position statistics, per-image statistics, a reshape
        that mixes channels, ...).
    """
    from bnbook.numpy import batch_norm_forward

    name = "check_spatial_batch_norm"
    rng = _rng(seed + 3)
    shapes = [(4, 3, 5, 5), (2, 2, 3, 4), (1, 3, 4, 4)]
    for shape in shapes:
        c = shape[1]
        x = rng.normal(1.0, 2.0, size=shape) * rng.uniform(0.5, 3.0, size=(1, c, 1, 1))
        gamma, beta = rng.normal(1.0, 0.5, size=c), rng.normal(size=c)
        got = _output(_call_unmutated(fn, name, x, gamma, beta, eps=EPS), name)
        want, _ = batch_norm_forward(x, gamma, beta, eps=EPS)
        if got.shape != want.shape:
            raise GradingError(f"output has shape {got.shape}, expected {want.shape} (same as x)")
        if _close(got, want):
            continue
        g4, b4 = gamma.reshape(1, c, 1, 1), beta.reshape(1, c, 1, 1)

        def over(axes, x=x, g4=g4, b4=b4):
            mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
            return g4 * (x - mu) / np.sqrt(var + EPS) + b4

        n, _, h, w = shape
        mixed = batch_norm_forward(x.reshape(-1, c), gamma, beta, eps=EPS)[0].reshape(shape)
        mistakes = {
            "statistics per position: each channel must be normalised over all of its N·H·W "
            "values, not over the batch at each pixel": over((0,)),
            "statistics per image (that is instance norm): batch norm pools the whole batch, "
            "over axes (0, 2, 3)": over((2, 3)),
            "statistics over the channels (that is layer norm): batch norm keeps the channel "
            "axis, 1, and reduces over (0, 2, 3)": over((1, 2, 3)),
            "x.reshape(-1, C) of an (N, C, H, W) array mixes channels: move the channel axis "
            "last first (x.transpose(0, 2, 3, 1).reshape(-1, C)), then move it back": mixed,
        }
        fallback = (
            f"output differs on shape {shape}: largest difference {np.abs(got - want).max():.3g}"
        )
        raise GradingError(_diagnose(got, mistakes, fallback))
    _report(name, len(shapes))


# --- the standardisation of the family ----------------------------------------------------------

FAMILY_AXES: dict[str, tuple[int, ...]] = {
    "batch": (0, 2, 3),
    "layer": (1, 2, 3),
    "instance": (2, 3),
}


def check_standardize(fn: Callable, *, seed: int = 0) -> None:
    """Check ``fn(x, axes, eps=1e-5) -> x_hat``: subtract the mean, divide by √(variance + ε).

    The statistics are taken over ``axes`` (ch-family): batch norm (0, 2, 3), layer norm (1, 2, 3),
    instance norm (2, 3), and group norm after a reshape to (N, G, C/G·H·W) with axes 2. Checked
    against :func:`bnbook.norms_numpy.standardize_forward` on (N, C, H, W) arrays, including N = 1.

    Raises
    ------
    GradingError
        With the most likely mistake (unbiased variance, statistics not broadcast back, ε outside).
    """
    from bnbook.norms_numpy import standardize_forward

    name = "check_standardize"
    rng = _rng(seed + 4)
    cases: list[tuple[np.ndarray, Sequence[int], str]] = []
    for shape in [(4, 6, 3, 3), (1, 4, 2, 5)]:
        x = rng.normal(2.0, 3.0, size=shape)
        cases += [(x, axes, kind) for kind, axes in FAMILY_AXES.items()]
        cases.append((x.reshape(shape[0], 2, -1), (2,), "group (2 groups)"))
    for x, axes, kind in cases:
        if kind == "batch" and x.shape[0] == 1:
            continue  # one image: batch norm's statistics are instance norm's
        try:
            got = _output(_call_unmutated(fn, name, x, axes, eps=EPS), name)
        except ValueError as err:
            raise GradingError(
                f"{kind} norm (axes {axes}) raised {err}: are the statistics kept with "
                "keepdims=True so that they broadcast back over x?"
            ) from err
        want, _ = standardize_forward(x, axes, eps=EPS)
        if got.shape != x.shape:
            raise GradingError(f"{kind} norm: output has shape {got.shape}, expected {x.shape}")
        if _close(got, want):
            continue
        mu = x.mean(axis=axes, keepdims=True)
        count = int(np.prod([x.shape[a] for a in axes]))
        var = x.var(axis=axes, keepdims=True)
        mistakes = {
            "the variance divides by the count minus one: standardisation uses the biased "
            "variance (np.var's default, ddof=0)": (x - mu)
            / np.sqrt(var * count / (count - 1) + EPS)
            if count > 1
            else want,
            "ε belongs inside the square root, √(σ² + ε)": (x - mu) / (np.sqrt(var) + EPS),
            "the variance is not centred: it is the mean of (x − μ)², not of x²": (x - mu)
            / np.sqrt((x**2).mean(axis=axes, keepdims=True) + EPS),
        }
        fallback = (
            f"{kind} norm (axes {axes}) differs on shape {x.shape}: largest difference "
            f"{np.abs(got - want).max():.3g}"
        )
        raise GradingError(_diagnose(got, mistakes, fallback))
    _report(name, len(cases))
