"""Diagrams drawn from data: the computational graph of batch norm in training mode.

A diagram here is a list of nodes (a box with a label and a short note beside it) and a list of
edges (an arrow labelled with the local derivative of its head with respect to its tail). The
coordinates and labels live in this module, so that a chapter draws the figure with one call:

>>> import matplotlib
>>> matplotlib.use("Agg")
>>> import matplotlib.pyplot as plt
>>> fig, ax = plt.subplots(figsize=(13, 5.6))
>>> ax = batch_norm_graph(ax)
>>> len(BN_GRAPH_NODES), len(BN_GRAPH_EDGES), len(ax.patches)
(8, 10, 18)
>>> plt.close(fig)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from bnbook.plotting import PALETTE

__all__ = [
    "Node",
    "Edge",
    "BN_GRAPH_NODES",
    "BN_GRAPH_EDGES",
    "BN_GRAPH_PATHS",
    "draw_graph",
    "batch_norm_graph",
]


class Node(NamedTuple):
    """A box at ``(x, y)`` showing ``label``, with ``note`` written on side ``where`` of it."""

    x: float
    y: float
    label: str
    note: str
    where: str  # "above", "below", "left" or "right"


class Edge(NamedTuple):
    """An arrow from node ``tail`` to node ``head``, labelled with ∂head/∂tail.

    ``path`` names the colour (a key of the ``colors`` mapping given to :func:`draw_graph`); the
    label sits at fraction ``t`` along the arrow, moved by ``offset`` (data units).
    """

    tail: str
    head: str
    label: str
    path: str
    t: float
    offset: tuple[float, float]


_SQRT_VAR = r"\sqrt{\sigma_{\mathcal{B}}^2+\epsilon}"

#: The nodes of equations (2.1)–(2.4) for one channel and one example i (ch-transform's numbers).
BN_GRAPH_NODES: dict[str, Node] = {
    "x": Node(0.0, 0.0, r"$x_i$", "input", "above"),
    "mu": Node(4.0, 3.4, r"$\mu_{\mathcal{B}}$", "eq. (2.1)", "left"),
    "var": Node(9.0, 3.4, r"$\sigma_{\mathcal{B}}^2$", "eq. (2.2)", "right"),
    "xhat": Node(12.5, 0.0, r"$\hat x_i$", "eq. (2.3)", "below"),
    "y": Node(16.0, 0.0, r"$y_i$", "eq. (2.4)", "above"),
    "gamma": Node(14.5, -2.9, r"$\gamma$", "parameter", "below"),
    "beta": Node(17.5, -2.9, r"$\beta$", "parameter", "below"),
    "loss": Node(20.0, 0.0, r"$\mathcal{L}$", "loss", "above"),
}

#: The arrows, each with its local derivative; ``path`` is one of :data:`BN_GRAPH_PATHS`.
BN_GRAPH_EDGES: list[Edge] = [
    Edge("x", "mu", r"$\dfrac{1}{m}$", "mean", 0.5, (-0.55, 0.3)),
    Edge("x", "var", r"$\dfrac{2(x_i-\mu_{\mathcal{B}})}{m}$", "var", 0.36, (0.55, -0.72)),
    Edge(
        "mu", "var", r"$-\dfrac{2}{m}\sum_j (x_j-\mu_{\mathcal{B}}) = 0$", "mean", 0.5, (0.0, 0.62)
    ),
    Edge("x", "xhat", rf"$\dfrac{{1}}{{{_SQRT_VAR}}}$", "direct", 0.5, (0.0, -0.7)),
    Edge("mu", "xhat", rf"$\dfrac{{-1}}{{{_SQRT_VAR}}}$", "mean", 0.55, (-0.45, -0.78)),
    Edge(
        "var",
        "xhat",
        r"$-\dfrac{x_i-\mu_{\mathcal{B}}}{2(\sigma_{\mathcal{B}}^2+\epsilon)^{3/2}}$",
        "var",
        0.4,
        (2.0, 0.25),
    ),
    Edge("xhat", "y", r"$\gamma$", "after", 0.5, (0.0, 0.32)),
    Edge("gamma", "y", r"$\hat x_i$", "after", 0.5, (-0.5, 0.0)),
    Edge("beta", "y", r"$1$", "after", 0.5, (0.4, 0.0)),
    Edge("y", "loss", r"$\dfrac{\partial \mathcal{L}}{\partial y_i}$", "after", 0.5, (0.0, 0.55)),
]

#: Path name → (colour, legend text): the three paths from x_i to x̂_i, and the rest.
BN_GRAPH_PATHS: dict[str, tuple[str, str]] = {
    "direct": (PALETTE[0], r"direct path $x_i \to \hat x_i$"),
    "mean": (PALETTE[2], r"path through $\mu_{\mathcal{B}}$"),
    "var": (PALETTE[1], r"path through $\sigma_{\mathcal{B}}^2$"),
    "after": (PALETTE[7], "scale, shift and loss"),
}

# where a node's note goes: offset (dx, dy) and text alignment
_NOTE_AT = {
    "above": (0.0, 0.62, "center", "bottom"),
    "below": (0.0, -0.62, "center", "top"),
    "left": (-0.75, 0.0, "right", "center"),
    "right": (0.75, 0.0, "left", "center"),
}


def draw_graph(
    ax,
    nodes: Mapping[str, Node],
    edges: Sequence[Edge],
    colors: Mapping[str, str],
    *,
    limits: tuple[tuple[float, float], tuple[float, float]] | None = None,
):
    """Draw ``nodes`` as rounded boxes and ``edges`` as labelled arrows on the Axes ``ax``.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw; its axis is switched off and its aspect set to equal.
    nodes : mapping of str to Node
        The boxes, by name.
    edges : sequence of Edge
        The arrows; ``tail`` and ``head`` name nodes, ``path`` names a colour in ``colors``.
    colors : mapping of str to str
        A matplotlib colour for every ``path`` that ``edges`` use.
    limits : ((xmin, xmax), (ymin, ymax)) or None
        The data limits; None: the nodes' extent plus a margin.

    Returns
    -------
    matplotlib.axes.Axes
        ``ax``, with one patch per node and one per edge.

    Raises
    ------
    KeyError
        If an edge names a node or a path that is not given.
    ValueError
        If a node's ``where`` is not one of "above", "below", "left", "right".
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    for name, node in nodes.items():
        if node.where not in _NOTE_AT:
            raise ValueError(
                f"node {name!r}: where must be one of {sorted(_NOTE_AT)}, got {node.where!r}"
            )
    for edge in edges:
        for end in (edge.tail, edge.head):
            if end not in nodes:
                raise KeyError(f"edge {edge.tail!r} -> {edge.head!r} names no node {end!r}")
        if edge.path not in colors:
            raise KeyError(f"edge {edge.tail!r} -> {edge.head!r}: no colour for {edge.path!r}")

    for node in nodes.values():
        box = FancyBboxPatch(
            (node.x - 0.55, node.y - 0.4),
            1.1,
            0.8,
            boxstyle="round,pad=0.06",
            fc="white",
            ec="0.2",
            lw=1.5,
            zorder=3,
        )
        ax.add_patch(box)
        ax.text(node.x, node.y, node.label, ha="center", va="center", fontsize=18, zorder=4)
        dx, dy, ha, va = _NOTE_AT[node.where]
        ax.text(node.x + dx, node.y + dy, node.note, ha=ha, va=va, fontsize=10, color="0.35")
    for edge in edges:
        tail, head, colour = nodes[edge.tail], nodes[edge.head], colors[edge.path]
        arrow = FancyArrowPatch(
            (tail.x, tail.y),
            (head.x, head.y),
            arrowstyle="-|>",
            mutation_scale=18,
            shrinkA=26,
            shrinkB=26,
            color=colour,
            lw=2.2,
            zorder=2,
        )
        ax.add_patch(arrow)
        ax.text(
            tail.x + edge.t * (head.x - tail.x) + edge.offset[0],
            tail.y + edge.t * (head.y - tail.y) + edge.offset[1],
            edge.label,
            ha="center",
            va="center",
            fontsize=13,
            color=colour,
            zorder=5,
            bbox=dict(fc="white", ec="none", alpha=0.9, pad=1),
        )
    if limits is None:
        xs, ys = [n.x for n in nodes.values()], [n.y for n in nodes.values()]
        limits = ((min(xs) - 1.0, max(xs) + 1.0), (min(ys) - 1.0, max(ys) + 1.5))
    ax.set(xlim=limits[0], ylim=limits[1], aspect="equal")
    ax.axis("off")
    return ax


def batch_norm_graph(ax):
    """Draw the computational graph of training-mode batch norm (ch-backprop's first figure).

    One channel, one example ``i``: the input, the batch mean and variance, the normalised value,
    the output and the loss, with the parameters γ and β; every arrow carries its local
    derivative, and the three paths from ``x_i`` to ``x̂_i`` have their own colours and a legend.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw (a 13 × 5.6 inch Axes fits the labels).

    Returns
    -------
    matplotlib.axes.Axes
        ``ax``, with :data:`BN_GRAPH_NODES` and :data:`BN_GRAPH_EDGES` drawn and the legend.

    References
    ----------
    Equations (2.1)–(2.4) (``eq-bn-mean`` … ``eq-bn-scale-shift``); figure ``fig-backprop-graph``.
    """
    from matplotlib.lines import Line2D

    colors = {name: colour for name, (colour, _) in BN_GRAPH_PATHS.items()}
    draw_graph(ax, BN_GRAPH_NODES, BN_GRAPH_EDGES, colors, limits=((-1.0, 21.0), (-3.9, 4.9)))
    handles = [Line2D([], [], color=c, lw=2.2, label=text) for c, text in BN_GRAPH_PATHS.values()]
    ax.legend(handles=handles, loc="lower left", frameon=False, fontsize=11)
    return ax
