"""bnbook.setup_notebook, progress, plotting and gradcheck helpers."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

import bnbook
from bnbook.gradcheck import numerical_gradient, relative_error
from bnbook.plotting import PALETTE, band


def test_setup_notebook_seeds_and_fixes_threads():
    bnbook.setup_notebook(seed=3)
    a = (np.random.rand(), torch.rand(1).item())  # noqa: NPY002 - the legacy global generator
    bnbook.setup_notebook(seed=3)
    assert (np.random.rand(), torch.rand(1).item()) == a  # noqa: NPY002
    assert torch.get_num_threads() == 1
    assert torch.are_deterministic_algorithms_enabled()
    assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] == PALETTE
    with pytest.raises(ValueError, match="threads"):
        bnbook.setup_notebook(threads=0)


def test_progress_is_quiet_under_tests(capsys):
    assert list(bnbook.progress(range(3))) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_band_checks_shapes():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    line = band(ax, [0, 1, 2], [[0, 1, 2], [1, 2, 3]], label="x")
    np.testing.assert_allclose(line.get_ydata(), [0.5, 1.5, 2.5])
    assert "2 seeds" in line.get_label()
    with pytest.raises(ValueError, match="runs must have shape"):
        band(ax, [0, 1], [[0, 1, 2]], label="x")
    plt.close(fig)


def test_numerical_gradient_and_relative_error():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    before = x.copy()
    g = numerical_gradient(np.sin, x, dout=np.ones_like(x))
    np.testing.assert_array_equal(x, before)
    assert relative_error(g, np.cos(x)) < 1e-9
    assert relative_error(g, np.cos(x) * 1.01) > 1e-3
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        relative_error(np.zeros(2), np.zeros(3))
