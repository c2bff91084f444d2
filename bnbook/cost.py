"""Measuring what batch norm costs on a CPU: timings, memory bandwidth, the bandwidth limit.

The tools of chapter ``ch-cost`` and of its benchmark ``bench/cost.py``, kept in one place so the
chapter's live measurements and the stored run are made the same way:

* :func:`cpu_times` times functions by CPU time, interleaved round-robin, and returns every sample
  (:class:`Timings`), so that a ratio of two functions can be read per round, with its spread;
* :func:`bandwidth_kernels` are three STREAM-like NumPy kernels that measure read and read-write
  bandwidth; :func:`bandwidth_limit` turns bandwidths into the time limit of equation
  ``eq-cost-limit`` (eq. (10.3) of the book);
* :func:`batch_norm_case` and :func:`batch_norm_steps` are one training step of batch norm alone
  (forward + backward), for the book's implementations and PyTorch's, on the same values;
* :func:`training_step` and :func:`profiler_share` measure batch norm's share of a training step;
  :func:`small_cnn` is the network whose batch norms the chapter folds;
* the machine a measurement was made on, and the results the benchmarks store, are described and
  read by :mod:`bnbook.machine`.

Everything here runs on the CPU, one thread being the caller's choice (``setup_notebook`` pins it).

>>> kernels, moved = bandwidth_kernels(2**20, seed=0)
>>> sorted(kernels), moved["read"], moved["copy"]
(['copy', 'read', 'scale'], 1048576, 2097152)
>>> t = cpu_times({"copy": kernels["copy"], "read": kernels["read"]}, repeats=3)
>>> len(t.samples["copy"]), len(t.ratios("copy", "read")), sorted(t.rounds()[0])
(3, 3, ['copy', 'read'])
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "BYTES_PER_ELEMENT",
    "FLOPS_PER_ELEMENT",
    "Timings",
    "cpu_times",
    "bandwidth_kernels",
    "bandwidths",
    "bandwidth_limit",
    "BatchNormCase",
    "batch_norm_case",
    "batch_norm_steps",
    "torch_training_step",
    "training_step",
    "profiler_share",
    "profiler_shares",
    "small_cnn",
]

#: Bytes per float32 element that the two-pass algorithm must move, split into passes that only
#: read and passes that read and write (eqs. (10.1) and (10.2) of the book). Forward: mean (read
#: x), variance (read x), normalise (read x, write y). Backward: two sums (read x and the
#: upstream gradient), then the input gradient (read both, write one).
BYTES_PER_ELEMENT: dict[str, dict[str, int]] = {
    "fwd": {"read_only": 8, "read_write": 8},
    "fwdbwd": {"read_only": 8 + 8, "read_write": 8 + 12},
}

#: Floating-point operations per element: about 7 forward, 9 backward.
FLOPS_PER_ELEMENT: dict[str, int] = {"fwd": 7, "fwdbwd": 16}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """CPU seconds per call of each function, one sample per round of interleaved calls.

    ``timings[name]`` is the median; :attr:`fastest` the fastest round, the estimate least
    affected by other processes (they can only add time). :meth:`ratios` pairs the samples of
    two functions round by round (both saw the same background load in each round), which gives
    a ratio's spread; :meth:`fastest_ratio` is the ratio of the fastest rounds.
    """

    samples: dict[str, list[float]]

    def __getitem__(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.samples)

    @property
    def medians(self) -> dict[str, float]:
        """The median of every function's samples."""
        return {name: self[name] for name in self.samples}

    @property
    def fastest(self) -> dict[str, float]:
        """The fastest round of every function."""
        return {name: min(values) for name, values in self.samples.items()}

    def fastest_ratio(self, numerator: str, denominator: str) -> float:
        """``numerator / denominator``, each at its fastest round."""
        return min(self.samples[numerator]) / min(self.samples[denominator])

    def rounds(self) -> list[dict[str, float]]:
        """The sample of every function in each round: one dict per round."""
        columns = zip(*self.samples.values(), strict=True)
        return [dict(zip(self.samples, column, strict=True)) for column in columns]

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        """``numerator / denominator`` in every round (a sample of the ratio, not one number)."""
        return [
            a / b for a, b in zip(self.samples[numerator], self.samples[denominator], strict=True)
        ]

    def ratio_quartiles(self, numerator: str, denominator: str) -> dict[str, float]:
        """The per-round ratios summarised: ``min``, ``q1``, ``median``, ``q3``, ``max``.

        >>> Timings({"a": [1.0, 2.0, 3.0], "b": [1.0, 1.0, 1.0]}).ratio_quartiles("a", "b")
        {'min': 1.0, 'q1': 1.5, 'median': 2.0, 'q3': 2.5, 'max': 3.0}
        """
        values = np.quantile(self.ratios(numerator, denominator), [0, 0.25, 0.5, 0.75, 1])
        return dict(zip(("min", "q1", "median", "q3", "max"), map(float, values), strict=True))


def cpu_times(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 7,
    min_sample: float = 0.002,
    warmup: int = 1,
) -> Timings:
    """Time each function by the CPU time of this process, calls interleaved round-robin.

    Parameters
    ----------
    fns : mapping of str to callable
        The functions to compare, each called without arguments.
    repeats : int
        Rounds; each round calls every function once more (one sample each).
    min_sample : float
        Each sample repeats a call enough times to last about this many CPU seconds (the number
        of calls is chosen once per function), so short calls are not lost in the clock's grain.
    warmup : int
        Untimed calls of each function first.

    Returns
    -------
    Timings
        Seconds per call, ``repeats`` samples per function.

    Notes
    -----
    ``time.process_time`` counts the user and system time of this process only: on a shared
    machine, time spent waiting for other tenants does not count (their competition for memory
    bandwidth still does). Interleaving gives every function the same background load.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    numbers = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.process_time()
        fn()
        once = max(time.process_time() - t0, 1e-6)
        numbers[name] = max(1, int(min_sample / once))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(numbers[name]):
                fn()
            samples[name].append((time.process_time() - t0) / numbers[name])
    return Timings(samples)


# ------------------------------------------------------------------------------------------------
# Bandwidth and the bandwidth limit
# ------------------------------------------------------------------------------------------------


def bandwidth_kernels(
    nbytes: int, seed: int | None = None
) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """Three NumPy kernels on float32 arrays of ``nbytes`` bytes, and the bytes each moves per call.

    * ``read``: a BLAS matrix-vector product with a vector of ones (reads the array once);
    * ``copy``: ``np.copyto`` (a memcpy: reads once, writes once; may use non-temporal stores);
    * ``scale``: ``np.multiply(a, s, out=b)`` (STREAM's "scale": reads once, writes once).

    Parameters
    ----------
    nbytes : int
        Size of the array, at least 64 bytes (rounded down to whole float32 values).
    seed : int or None
        Seed of the array's values (they do not matter for the time); None takes
        ``bnbook.seed(0)``.

    Returns
    -------
    kernels : dict of str to callable
    moved : dict of str to int
        Bytes read plus bytes written by one call of each kernel.

    Raises
    ------
    ValueError
        If ``nbytes`` is below 64.
    """
    if nbytes < 64:
        raise ValueError(f"nbytes must be at least 64, got {nbytes}")
    if seed is None:
        from bnbook import seed as run_seed

        seed = run_seed(0)
    n = nbytes // 4
    a = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    b = np.zeros_like(a)
    width = next(w for w in (1024, 256, 64, 16, 4, 1) if n % w == 0)
    a2, ones = a.reshape(-1, width), np.ones(width, np.float32)
    kernels = {
        "read": lambda: a2 @ ones,
        "copy": lambda: np.copyto(b, a),
        "scale": lambda: np.multiply(a, np.float32(1.5), out=b),
    }
    return kernels, {"read": a.nbytes, "copy": 2 * a.nbytes, "scale": 2 * a.nbytes}


def bandwidths(times: Mapping[str, float], moved: Mapping[str, int]) -> tuple[float, float]:
    """Read and read-write bandwidth in GB/s from timings of :func:`bandwidth_kernels`.

    ``times`` and ``moved`` map each kernel name to seconds per call and bytes per call. The
    read bandwidth is the ``read`` kernel's; the read-write one the faster of ``copy`` and
    ``scale`` (bytes read plus written), the best a pass that writes can do.

    >>> bandwidths({"read": 1e-3, "copy": 4e-3, "scale": 2e-3}, {"read": 8e6, "copy": 16e6,
    ...             "scale": 16e6})
    (8.0, 8.0)
    """
    read = moved["read"] / times["read"] / 1e9
    read_write = max(moved[k] / times[k] for k in ("copy", "scale")) / 1e9
    return read, read_write


def bandwidth_limit(numel: int, which: str, read_gbps: float, rw_gbps: float) -> float:
    """Seconds the two-pass algorithm needs at least: eq. (10.3) of the book (``eq-cost-limit``).

    Parameters
    ----------
    numel : int
        Elements of the input.
    which : {"fwd", "fwdbwd"}
        The forward pass alone, or forward and backward.
    read_gbps, rw_gbps : float
        Read bandwidth and read-write bandwidth (bytes read plus written), in GB/s.

    Raises
    ------
    KeyError
        If ``which`` is not one of the two passes.

    >>> round(bandwidth_limit(10**6, "fwd", 16.0, 8.0) * 1e3, 3)  # 8 MB at 16 GB/s + 8 MB at 8
    1.5
    """
    b = BYTES_PER_ELEMENT[which]
    return numel * (b["read_only"] / (read_gbps * 1e9) + b["read_write"] / (rw_gbps * 1e9))


# ------------------------------------------------------------------------------------------------
# One training step of batch norm alone
# ------------------------------------------------------------------------------------------------


class BatchNormCase(NamedTuple):
    """The same float32 input and upstream gradient for NumPy and for torch (separate copies).

    ``x`` (and ``weight``, ``bias``) require gradients; ``gamma``/``beta`` are their NumPy
    values (ones and zeros).
    """

    x_np: np.ndarray
    dy_np: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    x: Any  #: torch.Tensor
    dy: Any
    weight: Any
    bias: Any


def batch_norm_case(shape: tuple[int, ...], seed: int | None = None) -> BatchNormCase:
    """A standard-normal input and upstream gradient of ``shape`` (N, C, ...), on the CPU.

    ``seed`` None takes ``bnbook.seed(0)``.
    """
    import torch

    if seed is None:
        from bnbook import seed as run_seed

        seed = run_seed(0)
    x_np, dy_np = np.random.default_rng(seed).standard_normal((2, *shape), dtype=np.float32)
    c = shape[1]
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    x = torch.from_numpy(x_np.copy()).requires_grad_()
    weight = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    return BatchNormCase(x_np, dy_np, gamma, beta, x, torch.from_numpy(dy_np.copy()), weight, bias)


def torch_training_step(fn: Callable, case: BatchNormCase) -> Callable[[], None]:
    """Forward + backward of ``fn(x, None, None, weight, bias, training=True)`` (gradients
    cleared first): ``fn`` is ``F.batch_norm``, the twin's ``batch_norm``, or either compiled."""

    def step() -> None:
        case.x.grad = case.weight.grad = case.bias.grad = None
        fn(case.x, None, None, case.weight, case.bias, training=True).backward(case.dy)

    return step


def batch_norm_steps(case: BatchNormCase) -> dict[str, Callable[[], object]]:
    """One training step each of ``bnbook.numpy``, ``bnbook.torch.batch_norm`` (the eager
    twin) and ``F.batch_norm``, on ``case``: the contenders of chapter ``ch-cost``.

    >>> steps = batch_norm_steps(batch_norm_case((8, 3, 4, 4), seed=0))
    >>> sorted(steps), steps["bnbook.numpy"]()[0].shape
    (['F.batch_norm', 'bnbook.numpy', 'bnbook.torch'], (8, 3, 4, 4))
    """
    import torch.nn.functional as F

    import bnbook.numpy as bnp
    import bnbook.torch as bnt

    def numpy_step():
        _, cache = bnp.batch_norm_forward(case.x_np, case.gamma, case.beta)
        return bnp.batch_norm_backward(case.dy_np, cache)

    return {
        "bnbook.numpy": numpy_step,
        "bnbook.torch": torch_training_step(bnt.batch_norm, case),
        "F.batch_norm": torch_training_step(F.batch_norm, case),
    }


# ------------------------------------------------------------------------------------------------
# Batch norm's share of a training step
# ------------------------------------------------------------------------------------------------


def training_step(
    model, batch: int, seed: int | None = None, lr: float = 0.01
) -> Callable[[], None]:
    """One SGD step of ``model`` on a fixed random batch of ``(batch, 1, 28, 28)`` images.

    The batch is drawn once, on the device of the model's parameters; each call of the returned
    function does forward, backward and the update. ``seed`` None takes ``bnbook.seed(0)``.
    """
    import torch
    import torch.nn.functional as F

    if seed is None:
        from bnbook import seed as run_seed

        seed = run_seed(0)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    # The profiler's C++ library logs timestamped lines straight to file descriptor 2.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiler_shares(
    step: Callable[[], None], steps: int = 5, runs: int = 5, warmup: int = 2, quiet: bool = True
) -> list[float]:
    """Share of the operators' self time spent in batch-norm operators, once per profiled run.

    Each run profiles ``steps`` calls of ``step`` with ``torch.profiler`` (CPU activity) and
    divides the self time of the operators whose name contains ``batch_norm`` by the self time of
    all operators. The profiler times operators with the wall clock, so a run in which another
    process preempted this one is skewed: look at the median (:func:`profiler_share`).

    Parameters
    ----------
    step : callable
        One training step (see :func:`training_step`).
    steps, runs, warmup : int
        Steps per profiled run, profiled runs, untimed steps first.
    quiet : bool
        Silence the profiler library's own messages on the process's standard error.

    Returns
    -------
    list of float
        One share per run, each in [0, 1]; 0 for a network without batch-norm operators.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    shares = []
    for _ in range(runs):
        silenced = _native_stderr_silenced() if quiet else contextlib.nullcontext()
        with silenced, profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        bn = sum(e.self_cpu_time_total for e in events if "batch_norm" in e.key.lower())
        shares.append(bn / total if total > 0 else 0.0)
    return shares


def profiler_share(
    step: Callable[[], None], steps: int = 5, runs: int = 5, warmup: int = 2, quiet: bool = True
) -> float:
    """The median of :func:`profiler_shares` (same arguments)."""
    return statistics.median(profiler_shares(step, steps, runs, warmup, quiet))


def small_cnn(channels: tuple[int, int] = (8, 16), hidden: int = 32):
    """The small CNN of chapter ``ch-cost``, for 28×28 single-channel images and 10 classes.

    Two Conv(3×3, no bias)–BatchNorm2d–ReLU–MaxPool stages with ``channels`` = (c₁, c₂) filters,
    then Flatten–Linear(no bias)–BatchNorm1d–ReLU with ``hidden`` units and a Linear classifier:
    three batch norms, each right after the layer it can be folded into (``bnbook.fusion.fold_bn``).
    The layers are ``torch.nn``'s; the network is created on the CPU.

    >>> net = small_cnn()
    >>> len(net), sum(type(m).__name__.startswith("BatchNorm") for m in net)
    (13, 3)
    """
    from torch import nn

    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
