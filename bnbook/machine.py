"""The machine a measurement was made on, and the results the benchmarks store.

A time belongs to a processor: its instruction set, its caches, the kernel paths its libraries
pick. :func:`machine_info` records what a benchmark result depends on (through
:func:`cpu_model`, :func:`cache_sizes` and the versions and settings that choose kernels);
:func:`minor_faults` counts first touches of fresh memory pages. :func:`read_rows` and
:class:`StoredRun` read the results ``bench/`` stores, which chapter ``ch-cost`` shows.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import resource
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "cpu_model",
    "cache_sizes",
    "format_caches",
    "parse_caches",
    "machine_info",
    "minor_faults",
    "read_rows",
    "StoredRun",
]


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


def machine_info() -> dict[str, str]:
    """What a benchmark result depends on, as text: processor, instruction set, caches, versions.

    Keys: ``cpu`` (:func:`cpu_model`), ``cores``, ``cpu_capability`` (the vector instruction set
    PyTorch's kernels dispatch to, e.g. ``AVX2`` or ``AVX512``), ``caches`` (:func:`format_caches`
    of :func:`cache_sizes`), ``memory_GiB``, ``transparent_hugepages`` (the kernel's setting),
    ``python``, ``numpy``, ``torch``, ``blas`` (the BLAS library NumPy uses, with the kernel
    family it picked for this CPU), the environment variables that change kernel paths or the
    allocator (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``,
    ``OPENBLAS_CORETYPE``, ``THP_MEM_ALLOC_ENABLE``; ``unset`` if not set), and ``date``.
    """
    import time

    import torch

    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # an optional dependency: only the BLAS line is lost
        threadpool_info = list
    blas = [
        f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture', '-')})"
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f}"
    except (ValueError, OSError):
        memory = "unknown"
    knobs = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OPENBLAS_CORETYPE")
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "caches": format_caches(cache_sizes()),
        "memory_GiB": memory,
        "transparent_hugepages": thp,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "blas": "; ".join(blas) or "unknown",
        **{k: os.environ.get(k, "unset") for k in (*knobs, "THP_MEM_ALLOC_ENABLE")},
        "date": time.strftime("%Y-%m-%d"),
    }


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ------------------------------------------------------------------------------------------------
# Stored results
# ------------------------------------------------------------------------------------------------


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line, as dicts of strings (``csv.DictReader``)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class StoredRun:
    """A stored run in long format, one value a row: ``section, case, impl, metric, value``.

    This is how ``bench/cost.py`` writes ``bench/results/cost.csv``; rows of section
    ``machine`` describe the machine (metric: value).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "run.csv"
    >>> lines = ["section,case,impl,metric,value", "machine,,,cpu,X", "bw,0.5,numpy,read,4"]
    >>> _ = path.write_text("\\n".join(lines))
    >>> run = StoredRun(path)
    >>> run.value("bw", "0.5", "numpy", "read"), run.machine, run.cases("bw")
    (4.0, {'cpu': 'X'}, ['0.5'])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.rows = read_rows(path)
        self.machine = {r["metric"]: r["value"] for r in self.rows if r["section"] == "machine"}
        self._values = {(r["section"], r["case"], r["impl"], r["metric"]): r for r in self.rows}

    def value(self, section: str, case: str, impl: str, metric: str) -> float:
        """One stored number; KeyError names the missing key."""
        return float(self._values[(section, case, impl, metric)]["value"])

    def cases(self, section: str) -> list[str]:
        """The cases of a section, in the order they were stored."""
        return list(dict.fromkeys(r["case"] for r in self.rows if r["section"] == section))
