"""bnbook.setup_notebook, progress, plotting and gradcheck helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    assert not torch.utils.deterministic.fill_uninitialized_memory  # a debugging aid, off
    assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] == PALETTE
    with pytest.raises(ValueError, match="threads"):
        bnbook.setup_notebook(threads=0)


def test_setup_notebook_makes_compiled_code_deterministic_without_loading_the_compiler():
    code = """if True:
        import sys, torch, bnbook
        bnbook.setup_notebook(seed=0)
        assert torch.are_deterministic_algorithms_enabled()
        assert "torch._inductor.config" not in sys.modules  # not loaded just to set its flag
        import torch._inductor.config
        assert torch._inductor.config.deterministic  # ... which it has once it loads
    """
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_DETERMINISTIC"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_progress_is_quiet_under_tests(capsys):
    assert list(bnbook.progress(range(3))) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_band_checks_shapes():
    from matplotlib.figure import Figure

    ax = Figure().subplots()  # no pyplot: no backend or IPython hooks
    line = band(ax, [0, 1, 2], [[0, 1, 2], [1, 2, 3]], label="x")
    np.testing.assert_allclose(line.get_ydata(), [0.5, 1.5, 2.5])
    assert "2 seeds" in line.get_label()
    with pytest.raises(ValueError, match="runs must have shape"):
        band(ax, [0, 1], [[0, 1, 2]], label="x")


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


def test_seed_follows_bnbook_seed(monkeypatch):
    monkeypatch.delenv("BNBOOK_SEED", raising=False)
    assert bnbook.base_seed() == 0
    assert bnbook.seeds(3) == [0, 1, 2]
    monkeypatch.setenv("BNBOOK_SEED", "2")
    assert bnbook.seed(0) == 2000 and bnbook.seed(7) == 2007
    assert bnbook.seeds(2, start=5) == [2005, 2006]
    # two base seeds never share a seed
    monkeypatch.setenv("BNBOOK_SEED", "1")
    one = set(bnbook.seeds(50))
    monkeypatch.setenv("BNBOOK_SEED", "2")
    assert one.isdisjoint(bnbook.seeds(50))


def test_setup_notebook_draw_moves_with_bnbook_seed(monkeypatch):
    monkeypatch.delenv("BNBOOK_SEED", raising=False)
    bnbook.setup_notebook(seed=0)
    base = torch.rand(3)
    monkeypatch.setenv("BNBOOK_SEED", "1")
    bnbook.setup_notebook(seed=0)
    assert not torch.equal(torch.rand(3), base)


@pytest.mark.parametrize("bad", ["-1", "one", "1.5"])
def test_bnbook_seed_must_be_a_non_negative_integer(monkeypatch, bad):
    monkeypatch.setenv("BNBOOK_SEED", bad)
    with pytest.raises(ValueError, match="BNBOOK_SEED"):
        bnbook.seed(0)


@pytest.mark.parametrize("bad", [-1, 1000, 1.0, True, "0"])
def test_seed_index_is_checked(bad):
    with pytest.raises(ValueError, match="k must be an integer"):
        bnbook.seed(bad)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        bnbook.seeds(0)


def test_data_and_training_defaults_follow_bnbook_seed(monkeypatch):
    from bnbook.data import load_mnist_subset

    monkeypatch.delenv("BNBOOK_SEED", raising=False)
    split0 = load_mnist_subset().y_test
    np.testing.assert_array_equal(split0, load_mnist_subset(seed=0).y_test)
    monkeypatch.setenv("BNBOOK_SEED", "1")
    assert not np.array_equal(load_mnist_subset().y_test, split0)


def test_spread_and_glue_formats():
    from bnbook.evidence import glue, spread

    assert spread([0.91, 0.903, 0.916], ".3f") == "0.910 [0.903–0.916]"
    assert spread([2.0], ".1f") == "2.0"
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="non-empty sample"):
            spread(bad)
    with pytest.raises(TypeError, match="formatted strings"):
        glue({"x-key": 0.5})
    with pytest.raises(TypeError, match="flag"):
        glue(prefix="ch", flag=True)


def test_glue_prefixes_keys_and_formats_ints(monkeypatch):
    import sys
    import types

    from bnbook.evidence import glue

    glued = {}
    fake = types.ModuleType("myst_nb")  # the book's runtime, present or not
    fake.glue = lambda key, text, display: glued.update({key: text})
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    glue({"acc": "91%"}, prefix="ch", n_train=12000)
    assert glued == {"ch-acc": "91%", "ch-n-train": "12,000"}
    glue({"plain-key": "x"})
    assert glued["plain-key"] == "x"
