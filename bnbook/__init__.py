"""bnbook: batch normalization from scratch, in NumPy and PyTorch.

The package behind the bnbook textbook. Every chapter starts with :func:`setup_notebook`;
the from-scratch layers live in :mod:`bnbook.numpy` and :mod:`bnbook.torch`.

>>> import bnbook
>>> bnbook.setup_notebook(seed=0)
>>> import bnbook.numpy as bnp
>>> import numpy as np
>>> y, cache = bnp.batch_norm_forward(np.arange(8.0).reshape(4, 2), np.ones(2), np.zeros(2))
>>> y.shape
(4, 2)
"""

from __future__ import annotations

import operator
import os
import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = [
    "setup_notebook",
    "seed",
    "seeds",
    "base_seed",
    "seed_everything",
    "default_device",
    "progress",
    "__version__",
]
__version__ = "0.1.0"

T = TypeVar("T")


#: Seeds of one run of the book are spaced this far apart, so that the draws of two base seeds
#: never share a seed (a chapter uses far fewer than this many).
SEED_STRIDE = 1000


def base_seed() -> int:
    """The book's base seed: the environment variable ``BNBOOK_SEED`` (default 0).

    Every random draw of the book derives from it through :func:`seed`, so that
    ``BNBOOK_SEED=1 make execute`` re-runs every experiment on a new, independent draw.

    Raises
    ------
    ValueError
        If ``BNBOOK_SEED`` is not a non-negative integer.
    """
    text = os.environ.get("BNBOOK_SEED", "0").strip() or "0"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"BNBOOK_SEED must be a non-negative integer, got {text!r}")
    return value


def seed(k: int = 0) -> int:
    """The ``k``-th seed of this run: ``k + 1000 * BNBOOK_SEED``.

    Chapters never write a literal seed: they write ``bnbook.seed(k)`` (``k`` = 0, 1, ... names
    the draw within the chapter), so that one environment variable moves every draw at once.

    >>> import os
    >>> os.environ.pop("BNBOOK_SEED", None) and None
    >>> seed(0), seed(3)
    (0, 3)
    >>> os.environ["BNBOOK_SEED"] = "2"
    >>> seed(0), seed(3)
    (2000, 2003)
    >>> del os.environ["BNBOOK_SEED"]
    """
    if isinstance(k, bool) or not hasattr(k, "__index__") or not 0 <= k < SEED_STRIDE:
        raise ValueError(f"k must be an integer in [0, {SEED_STRIDE}), got {k!r}")
    return operator.index(k) + SEED_STRIDE * base_seed()


_run_seed = seed  # setup_notebook's argument is called ``seed`` too


def seeds(n: int, start: int = 0) -> list[int]:
    """``n`` consecutive seeds of this run, ``[seed(start), ..., seed(start + n - 1)]``.

    >>> seeds(3)
    [0, 1, 2]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return [seed(start + i) for i in range(n)]


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and torch's random number generators with ``seed``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global generator readers may use
    torch.manual_seed(seed)


def setup_notebook(seed: int = 0, threads: int = 1) -> None:
    """Make a chapter reproducible and give it the book's look.

    Seeds Python, NumPy and torch with ``bnbook.seed(seed)`` (so ``BNBOOK_SEED`` moves it); turns on
    torch's deterministic algorithms, ``torch.compile``'s included; fixes the number of
    threads of torch and of NumPy's BLAS (one by default, so results do not depend on the machine and
    two chapters can run side by side on two cores); sets NumPy's print precision; applies the shared
    plot style (:func:`bnbook.plotting.apply_style`); in a notebook, shows errors without tracebacks
    (a deliberate error prints ``ValueError: message``, not the machine's paths).

    Parameters
    ----------
    seed : int
        Which seed of the run (:func:`seed`) to give every random number generator.
    threads : int
        Threads for torch's intra-op pool and for BLAS.
    """
    import numpy as np
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass
    _deterministic_algorithms(torch)
    seed_everything(_run_seed(seed))
    np.set_printoptions(precision=4, suppress=True, linewidth=100)
    torch.set_printoptions(precision=4, sci_mode=False, linewidth=100)

    from bnbook.plotting import apply_style

    apply_style()
    _minimal_tracebacks()


def _deterministic_algorithms(torch) -> None:
    """``torch.use_deterministic_algorithms(True)``, without importing ``torch.compile``'s compiler.

    The public function sets two flags: torch's own, and the compiler's ``deterministic`` option,
    which it reaches by importing ``torch._inductor.config`` and with it the whole compiler stack
    (about 3 s, in every chapter, most of which never compile). The compiler reads the same option
    from ``TORCHINDUCTOR_DETERMINISTIC`` when it first loads, so that is set instead; torch's flag
    is set directly. If the compiler is loaded already, or torch lacks that setter, the public
    function does both.

    With the flag on, torch also fills every tensor allocated uninitialised (``torch.empty`` and
    its relatives, which kernels use for their outputs too) with NaN, so that a read of memory
    nobody wrote shows up. Code that writes before it reads computes the same values without that
    fill, and PyTorch's documentation says the setting can then be turned off and stay
    deterministic (``torch.utils.deterministic.fill_uninitialized_memory``). The fill costs a pass
    over every such tensor, about 4 % of a stacked training run here; it is turned off.
    """
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True)
    else:
        set_flag(True, warn_only=False)
    torch.utils.deterministic.fill_uninitialized_memory = False


def _minimal_tracebacks() -> None:
    """In a notebook, show a deliberate error as ``ValueError: message``, without the traceback.

    Chapters demonstrate errors (cells tagged ``raises-exception``); a full traceback would print
    the machine's paths into the stored outputs, and teaches nothing the message does not say.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython ships with the notebook stack
        return
    shell = get_ipython()
    if shell is not None and hasattr(shell, "InteractiveTB"):
        shell.InteractiveTB.set_mode("Minimal")


def default_device():
    """The device experiments run on: CUDA when present, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _interactive() -> bool:
    """True when a person is watching: a terminal, or a notebook kernel not run by a test/executor."""
    if os.environ.get("BNBOOK_QUIET") or os.environ.get("CI"):
        return False
    if "pytest" in sys.modules or "nbval" in sys.modules:
        return False
    return (
        sys.stderr.isatty() or "ipykernel" in sys.modules and not os.environ.get("BNBOOK_EXECUTE")
    )


def progress(iterable: Iterable[T], **tqdm_kwargs) -> Iterator[T]:
    """Wrap ``iterable`` in a ``tqdm.auto`` progress bar when run interactively.

    Long runs (the ``FULL = True`` versions of experiments) show a bar; executed or tested notebooks
    (``make execute`` sets ``BNBOOK_EXECUTE=1``; nbval, CI) stay quiet, so stored outputs do not vary.
    """
    from tqdm.auto import tqdm

    tqdm_kwargs.setdefault("disable", not _interactive())
    return iter(tqdm(iterable, **tqdm_kwargs))
