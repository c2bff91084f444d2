"""Measuring what batch norm costs on a CPU: timings, memory bandwidth, the bandwidth limit.

The tools of chapter ``ch-cost`` and of its benchmark ``bench/cost.py``, kept in one place so the
chapter's live measurements and the stored run are made the same way:

* :func:`cpu_times` times functions by CPU time, interleaved round-robin, and returns every sample
  (:class:`Timings`), so that a ratio of two functions can be read per round, with its spread;
* :func:`bandwidth_kernels` are three STREAM-like NumPy kernels that measure read and read-write
  bandwidth; :func:`bandwidth_limit` turns bandwidths into the time limit of equation
  ``eq-cost-limit`` (eq. (10.3) of the book);
* :func:`training_step` and :func:`profiler_share` measure batch norm's share of a training step;
* :func:`cache_sizes`, :func:`cpu_model` and :func:`minor_faults` describe the machine.

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
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BYTES_PER_ELEMENT",
    "FLOPS_PER_ELEMENT",
    "Timings",
    "cpu_times",
    "bandwidth_kernels",
    "bandwidth_limit",
    "training_step",
    "profiler_share",
    "profiler_shares",
    "cache_sizes",
    "format_caches",
    "parse_caches",
    "cpu_model",
    "minor_faults",
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


# ------------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _bytes(text: str) -> int | None:
    m = _SIZE.match(text)
    return int(m.group(1)) * _UNIT[m.group(2).upper()] if m else None


def cache_sizes(root: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Sizes in bytes of the data (or unified) caches the first CPU core sees, by level.

    Read from Linux's ``sysfs`` (``index*/level``, ``type``, ``size`` under ``root``); where it is
    missing, from ``os.sysconf`` (glibc's ``_SC_LEVEL*_CACHE_SIZE``). Levels it cannot find are
    left out, so the result may be empty.

    Returns
    -------
    dict
        For example ``{"L1": 32768, "L2": 1048576, "L3": 33554432}``. An L2 is usually per core,
        an L3 shared by several cores.
    """
    sizes: dict[str, int] = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _bytes((index / "size").read_text())
        except OSError:
            continue
        if kind != "Instruction" and size:
            sizes[f"L{level}"] = size
    if sizes:
        return sizes
    names = {
        "L1": "SC_LEVEL1_DCACHE_SIZE",
        "L2": "SC_LEVEL2_CACHE_SIZE",
        "L3": "SC_LEVEL3_CACHE_SIZE",
    }
    for level, name in names.items():
        try:
            value = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if value > 0:
            sizes[level] = value
    return sizes


def format_caches(sizes: Mapping[str, int]) -> str:
    """``{"L1": 32768, "L2": 524288}`` as ``"L1 32K, L2 512K"`` (the benchmark CSV's format).

    >>> format_caches({"L1": 32768, "L2": 524288})
    'L1 32K, L2 512K'
    """
    return ", ".join(f"{level} {size // 1024}K" for level, size in sizes.items())


def parse_caches(text: str) -> dict[str, int]:
    """The inverse of :func:`format_caches`.

    >>> parse_caches("L1 32K, L2 512K, L3 8192K")["L3"] / 2**20
    8.0
    """
    return {level: int(kib) * 1024 for level, kib in re.findall(r"(L\d) (\d+)K", text)}


def cpu_model() -> str:
    """The CPU's model name as the operating system reports it (``/proc/cpuinfo`` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
