"""Tests of bnbook.diagrams: the batch-norm graph's structure, its drawing and its errors."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from bnbook.diagrams import (
    BN_GRAPH_EDGES,
    BN_GRAPH_NODES,
    BN_GRAPH_PATHS,
    Edge,
    Node,
    batch_norm_graph,
    draw_graph,
)


@pytest.fixture
def ax():
    # A Figure without pyplot: no global backend state, which an IPython shell created by
    # another test in the same process would otherwise hook into.
    return Figure().subplots()


def test_three_paths_lead_from_the_input_to_the_normalised_value():
    leaving_x = {e.head: e.path for e in BN_GRAPH_EDGES if e.tail == "x"}
    assert leaving_x == {"xhat": "direct", "mu": "mean", "var": "var"}
    into_xhat = {e.tail for e in BN_GRAPH_EDGES if e.head == "xhat"}
    assert into_xhat == {"x", "mu", "var"}


def test_every_node_reaches_the_loss_and_every_edge_has_a_colour():
    heads: dict[str, set[str]] = {}
    for e in BN_GRAPH_EDGES:
        heads.setdefault(e.tail, set()).add(e.head)
        assert e.path in BN_GRAPH_PATHS
    for start in BN_GRAPH_NODES:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            seen.add(node)
            todo += heads.get(node, set()) - seen
        assert "loss" in seen, start


def test_the_notation_of_the_book():
    text = " ".join([n.label for n in BN_GRAPH_NODES.values()] + [e.label for e in BN_GRAPH_EDGES])
    assert r"\varepsilon" not in text and r"\ell" not in text
    assert r"\epsilon" in text and r"\mathcal{L}" in text


def test_batch_norm_graph_draws_a_box_per_node_and_an_arrow_per_edge(ax):
    batch_norm_graph(ax)
    assert len(ax.patches) == len(BN_GRAPH_NODES) + len(BN_GRAPH_EDGES)
    assert len(ax.get_legend().get_texts()) == len(BN_GRAPH_PATHS)
    assert ax.get_xlim() == (-1.0, 21.0)


def test_draw_graph_default_limits_contain_the_nodes(ax):
    nodes = {"a": Node(0.0, 0.0, "a", "", "above"), "b": Node(3.0, 1.0, "b", "", "right")}
    draw_graph(ax, nodes, [Edge("a", "b", "1", "p", 0.5, (0, 0))], {"p": "k"})
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < 0 < 3 < x1 and y0 < 0 < 1 < y1


@pytest.mark.parametrize(
    ("edge", "colors", "match"),
    [
        (Edge("a", "z", "", "p", 0.5, (0, 0)), {"p": "k"}, "names no node 'z'"),
        (Edge("a", "a", "", "q", 0.5, (0, 0)), {"p": "k"}, "no colour for 'q'"),
    ],
)
def test_draw_graph_rejects_unknown_nodes_and_paths(ax, edge, colors, match):
    nodes = {"a": Node(0.0, 0.0, "a", "", "above")}
    with pytest.raises(KeyError, match=match):
        draw_graph(ax, nodes, [edge], colors)


def test_draw_graph_rejects_an_unknown_note_side(ax):
    with pytest.raises(ValueError, match="where must be one of"):
        draw_graph(ax, {"a": Node(0.0, 0.0, "a", "", "inside")}, [], {})
