"""The book's plot style and the few plotting helpers every chapter shares.

Colours are the Okabe–Ito palette, which stays distinguishable under the common forms of colour
blindness; lines also differ in style where a figure depends on telling them apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["PALETTE", "BN_COLOR", "PLAIN_COLOR", "apply_style", "band"]

#: Okabe & Ito (2008), "Color Universal Design": black first, then the seven colours.
PALETTE: list[str] = [
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
]
#: The colour of "with batch norm" curves throughout the book, and of "without".
BN_COLOR = PALETTE[0]
PLAIN_COLOR = PALETTE[1]


def apply_style() -> None:
    """Set matplotlib's defaults for the book: PNG figures, readable fonts, the palette, a light grid."""
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "legend.fontsize": 10,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": cycler(color=PALETTE),
            "lines.linewidth": 2.0,
            "image.cmap": "viridis",
            "svg.hashsalt": "bnbook",
        }
    )
    try:  # inline figures as PNG only: SVG carries random ids that break output comparison
        from matplotlib_inline.backend_inline import set_matplotlib_formats

        set_matplotlib_formats("png")
    except ImportError:  # pragma: no cover - outside IPython
        pass


def band(
    ax,
    x: Sequence[float] | np.ndarray,
    runs: Sequence[Sequence[float]] | np.ndarray,
    *,
    label: str,
    color: str | None = None,
    linestyle: str = "-",
    alpha: float = 0.2,
):
    """Plot the mean over seeds as a line and the min–max range over seeds as a shaded band.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    x : array_like, shape (T,)
        Positions along the horizontal axis.
    runs : array_like, shape (S, T)
        One row per seed.
    label, color, linestyle : str
        Legend label, line colour and style. The label gets the number of seeds appended.

    Returns
    -------
    matplotlib.lines.Line2D
        The mean line.
    """
    runs = np.asarray(runs, dtype=float)
    x = np.asarray(x, dtype=float)
    if runs.ndim != 2 or runs.shape[1] != x.shape[0]:
        raise ValueError(
            f"runs must have shape (seeds, {x.shape[0]}) to match x, got {tuple(runs.shape)}"
        )
    mean = runs.mean(axis=0)
    (line,) = ax.plot(
        x, mean, color=color, linestyle=linestyle, label=f"{label} (mean of {runs.shape[0]} seeds)"
    )
    ax.fill_between(
        x, runs.min(axis=0), runs.max(axis=0), color=line.get_color(), alpha=alpha, lw=0
    )
    return line
