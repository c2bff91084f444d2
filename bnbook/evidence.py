"""Reporting a measured number the way the book does: a draw over seeds, summarised and glued.

A measurement repeated over seeds is a sample, not a number. :func:`spread` turns it into the one
string the prose quotes, the mean with the lowest and highest draw beside it, and :func:`glue`
hands a chapter's strings to myst-nb in one call, so a hidden cell holds the claim's ``assert`` and
little else (:func:`glue_figure` does the same for a figure). Both do nothing in a runtime without
myst-nb, such as a reader's Colab session: gluing serves only the HTML book.

>>> spread([0.91, 0.903, 0.916], ".3f")
'0.910 [0.903–0.916]'
>>> spread([0.5, 0.75], ".0%")
'62% [50%–75%]'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["spread", "glue", "glue_figure"]


def spread(values: Iterable[float], spec: str = ".3g") -> str:
    """``"mean [min–max]"`` of ``values``, each formatted with the format spec ``spec``.

    Parameters
    ----------
    values : iterable of float
        One measurement per seed (at least one; NaN is not allowed).
    spec : str
        A format spec such as ``".2f"`` or ``".0%"``, applied to the mean and to both ends.

    Returns
    -------
    str
        For example ``"0.910 [0.903–0.916]"``; a single value prints without a range.

    Raises
    ------
    ValueError
        If ``values`` is empty or holds a NaN.
    """
    arr = np.asarray(list(values), dtype=np.float64).ravel()
    if arr.size == 0 or np.isnan(arr).any():
        raise ValueError(f"values must be a non-empty sample without NaN, got {arr.tolist()!r}")
    mean = format(arr.mean(), spec)
    if arr.size == 1:
        return mean
    return f"{mean} [{format(arr.min(), spec)}–{format(arr.max(), spec)}]"


def glue(items: Mapping[str, str]) -> None:
    """Glue every ``key: text`` pair for the prose's ``{glue:text}`` roles (nothing is displayed).

    Only strings are accepted: a chapter formats each number itself (rounding is part of the claim).
    Where myst-nb is not installed (a reader's own runtime), there is nothing to glue into, and
    nothing happens.

    Raises
    ------
    TypeError
        If a value is not a ``str``.
    """
    bad = {k: type(v).__name__ for k, v in items.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"glue takes formatted strings; these keys are not str: {bad}")
    try:
        from myst_nb import glue as _glue
    except ImportError:  # a reader's runtime (Colab, say): gluing only serves the HTML book
        return
    for key, text in items.items():
        _glue(key, text, display=False)


def glue_figure(key: str, figure) -> None:
    """Glue a matplotlib ``figure`` under ``key`` for a ``{glue:figure}`` elsewhere in the book.

    Like :func:`glue`, nothing happens where myst-nb is not installed.
    """
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(key, figure, display=False)
