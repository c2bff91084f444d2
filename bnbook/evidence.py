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


def glue(
    items: Mapping[str, str | int] | None = None, /, *, prefix: str = "", **values: str | int
) -> None:
    """Glue formatted numbers for the prose's ``{glue:text}`` roles (nothing is displayed).

    Pairs come as a mapping, as keyword arguments, or both. With ``prefix``, every key becomes
    ``f"{prefix}-{key}"``, and a keyword's underscores become hyphens, so a chapter's hidden cell
    stays short::

        glue(prefix="inference", acc=spread(acc, ".1%"), n_train=len(x))
        # glues "inference-acc" and "inference-n-train"

    Values are strings, formatted by the chapter (rounding is part of the claim), or ints, which
    are exact and print with thousands separators (``12,000``). Where myst-nb is not installed (a
    reader's own runtime), there is nothing to glue into, and nothing happens.

    Raises
    ------
    TypeError
        If a value is neither ``str`` nor ``int`` (a float must be formatted first; a bool is
        refused).

    >>> glue({"a-b": "1.0"}, prefix="ch", n_seeds=5)   # glues "ch-a-b" and "ch-n-seeds"
    >>> glue(prefix="ch", acc=0.91)
    Traceback (most recent call last):
    TypeError: glue takes formatted strings or ints; these keys are not: {'acc': 'float'}
    """
    pairs = {**(items or {}), **{k.replace("_", "-"): v for k, v in values.items()}}
    bad = {
        k: type(v).__name__
        for k, v in pairs.items()
        if isinstance(v, bool) or not isinstance(v, (str, int))
    }
    if bad:
        raise TypeError(f"glue takes formatted strings or ints; these keys are not: {bad}")
    try:
        from myst_nb import glue as _glue
    except ImportError:  # a reader's runtime (Colab, say): gluing only serves the HTML book
        return
    for key, value in pairs.items():
        text = f"{value:,}" if isinstance(value, int) else value
        _glue(f"{prefix}-{key}" if prefix else key, text, display=False)


def glue_figure(key: str, figure) -> None:
    """Glue a matplotlib ``figure`` under ``key`` for a ``{glue:figure}`` elsewhere in the book.

    Like :func:`glue`, nothing happens where myst-nb is not installed.
    """
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return
    _glue(key, figure, display=False)
