"""Argument checks shared by the NumPy and PyTorch implementations.

Messages name the argument, the expected shape and the one received; exception types follow
PyTorch's, so code written against ``torch.nn`` catches the same errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class ChannelMismatchError(ValueError, RuntimeError):
    """A tensor's channel count does not match ``num_features`` (or another per-channel tensor).

    PyTorch raises ``RuntimeError`` here ("running_mean should contain 4 elements not 3"); it is also a
    ``ValueError`` because the argument's value is wrong. Catching either works.
    """


class DtypeError(TypeError, NotImplementedError):
    """Input of a non-floating dtype. PyTorch raises ``NotImplementedError`` (a ``RuntimeError``)
    deep in its kernels ("batch_norm" not implemented for 'Long'); this is raised up front, is
    both, and is also a ``TypeError``. Nothing is silently cast."""


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


def check_grad_shape(grad, forward_shape: Sequence[int], name: str = "dy"):
    """``grad`` as an array, or a ValueError if it lacks the shape of the forward input."""
    import numpy as np

    grad = np.asarray(grad)
    if grad.shape != tuple(forward_shape):
        raise ValueError(
            f"{name} must have the shape of the forward input {shape_str(forward_shape)}, "
            f"got {shape_str(grad.shape)}"
        )
    return grad


def check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"eps must be positive (a number that keeps 1/sqrt(var + eps) finite), got {eps!r}"
        )


def check_momentum(momentum: float | None) -> None:
    if momentum is None:
        return
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"momentum must be None (cumulative average) or a number in [0, 1], got {momentum!r}"
        )


def check_num_features(num_features: int) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")


def check_training_size(shape: Sequence[int]) -> None:
    """Raise PyTorch's ValueError when training would normalise a single value per channel."""
    # a loop, not a generator expression: torch.compile traces this without a graph break
    values = int(shape[0])
    for size in shape[2:]:
        values *= int(size)
    if values == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{shape_str(shape)}: the input must have shape (N, C, *spatial) with N * prod(spatial) > 1 "
            "(a batch of one sample without spatial dimensions has no variance to normalise by)"
        )


def check_channels(name: str, size: int, input_shape: Sequence[int], what: str = "input") -> None:
    channels = int(input_shape[1])
    if size != channels:
        raise ChannelMismatchError(
            f"{name} should contain {channels} elements not {size}: the {what} has shape "
            f"{shape_str(input_shape)}, so dim 1 holds {channels} channels, but {name} has {size}"
        )


def check_positive_int(name: str, value, *, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``minimum``.

    >>> check_positive_int("ghost_batch_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: ghost_batch_size must be an int >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
