"""Speed of the book's batch norm against PyTorch's, over a sweep of shapes, side by side.

For every shape of the sweep (dense and spatial, float32, forward + backward, ONE thread for
torch and for BLAS), one interleaved round-robin times

* ``bnbook.numpy`` (``batch_norm_forward`` + ``batch_norm_backward``) and ``F.batch_norm``;
* the eager twin ``bnbook.torch.BatchNorm*d`` and ``torch.nn.BatchNorm*d``;
* the compiled twin (``torch.compile`` of the twin) and, unless ``--no-compile``, the compiled
  ``torch.nn`` module;

and reports each contender's time over its reference's as the median of the per-round ratios,
with their interquartile range and their lowest and highest round: in each round both saw the
same background load, and the clock is the CPU time of this process (``bnbook.cost.cpu_times``),
so time spent waiting for the other tenants of a shared machine does not count. Each processor
keeps its own sweep: the results go to ``bench/results/core/<processor>.csv`` and the machine they
were measured on (processor, instruction set, caches, versions, allocator settings, hashes of the
measured modules) to ``<processor>.json`` beside it, where ``<processor>`` names the processor and
its instruction set (:func:`sweep_name`), so a run on another CPU adds a sweep and a run on the
same one replaces its own; ch-cost shows every stored sweep side by side. When CUDA is
available, the same contenders on the GPU go to ``core_gpu.csv``: the twin eager and compiled
against cuDNN (``torch.nn``), and the bandwidth each achieves against a device copy.

    python bench/bench_core.py                      # the sweep (several minutes: compiles)
    python bench/bench_core.py --quick --no-compile # a smoke test (seconds); writes nothing
    python bench/bench_core.py --shapes 60x100 64x64x56x56

Allocator: both libraries take their outputs from the C library's ``malloc``, whose state decides
whether an output lands on recycled memory or on fresh pages that fault on first touch (ch-cost's
section on fresh pages); NumPy asks for huge pages for large arrays, PyTorch only with
``THP_MEM_ALLOC_ENABLE=1``. The sweep compares kernels, not allocators, so unless
``--default-allocator`` is given the script restarts itself with ``malloc`` keeping freed memory
below 32 MiB (``GLIBC_TUNABLES``, see :data:`ALLOCATOR`) and huge pages for PyTorch too; the
settings are recorded in the machine file.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bnbook.cost  # noqa: E402
import bnbook.machine  # noqa: E402
import bnbook.torch as bnt  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SWEEPS = RESULTS / "core"  # one <processor>.csv and <processor>.json per processor
GPU_CSV_PATH = RESULTS / "core_gpu.csv"
#: The modules whose code a sweep measures; their hashes go into the machine file.
MEASURED = ("numpy.py", "autograd.py", "torch.py")

#: The environment the sweep runs in (unless --default-allocator): glibc's malloc serves blocks
#: below 32 MiB (its largest mmap threshold) from its heap and never trims the heap, so freed
#: outputs are reused by the next call; PyTorch asks for transparent huge pages like NumPy does.
ALLOCATOR = {
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296",
    "THP_MEM_ALLOC_ENABLE": "1",
}

DENSE = [(60, 100), (1024, 256), (4096, 1024)]
SPATIAL = [(8, 256, 14, 14), (64, 64, 56, 56), (32, 512, 7, 7)]
SHAPES = DENSE + SPATIAL

#: (contender, reference) pairs, each a ratio of the table. "twin" is bnbook.torch.
COMPARISONS = [
    ("bnbook.numpy", "F.batch_norm"),
    ("twin eager", "torch.nn eager"),
    ("twin compiled", "torch.nn eager"),
    ("twin compiled", "torch.nn compiled"),
]
FIELDS = [
    "device",
    "shape",
    "kind",
    "contender",
    "reference",
    "contender_ms",
    "reference_ms",
    "ratio_median",
    "ratio_q1",
    "ratio_q3",
    "ratio_min",
    "ratio_max",
    "ratio_fastest",
    "rounds",
    "target",
]


def sweep_name(machine: dict[str, str]) -> str:
    """The file name (without suffix) of a processor's sweep: its model and instruction set.

    >>> sweep_name({"cpu": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512"})
    'intel-xeon-avx512'
    """
    model = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b", " ", machine["cpu"].lower())
    words = re.findall(r"[a-z0-9]+", f"{model} {machine['cpu_capability'].lower()}")
    return "-".join(words)


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def parse_shape(text: str) -> tuple[int, ...]:
    """``"64x64x56x56"`` as ``(64, 64, 56, 56)``; at least two positive sizes."""
    shape = tuple(int(s) for s in text.lower().split("x"))
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is N x C [x spatial...], got {text!r}")
    return shape


def kind(shape: Sequence[int]) -> str:
    return "dense" if len(shape) == 2 else "spatial"


def target(contender: str, reference: str, shape: Sequence[int]) -> float | None:
    """The speed target of a comparison at a shape (None: none set)."""
    if contender == "bnbook.numpy":
        return 1.5 if kind(shape) == "dense" else 1.1
    if contender == "twin eager":
        return {(64, 64, 56, 56): 1.3, (60, 100): 1.5}.get(tuple(shape))
    if contender == "twin compiled" and reference == "torch.nn eager":
        return 1.0
    return None


# --------------------------------------------------------------------------------------------
# The contenders: zero-argument callables, one training step of batch norm each
# --------------------------------------------------------------------------------------------


def module_classes(shape: Sequence[int]):
    """The twin's and torch's batch-norm class for an input of this rank."""
    dims = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    return getattr(bnt, f"BatchNorm{dims}d"), getattr(torch.nn, f"BatchNorm{dims}d")


def module_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ``module`` in training mode, gradients cleared first."""

    def step() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)

    return step


def numpy_steps(shape: Sequence[int], seed: int) -> dict[str, Callable[[], object]]:
    """``bnbook.numpy`` and ``F.batch_norm`` (no running statistics), on the same values."""
    steps = bnbook.cost.batch_norm_steps(bnbook.cost.batch_norm_case(tuple(shape), seed))
    return {name: steps[name] for name in ("bnbook.numpy", "F.batch_norm")}


def module_steps(
    shape: Sequence[int], seed: int, device: torch.device, compile_twin: bool, compile_nn: bool
) -> dict[str, Callable[[], None]]:
    """The twin and ``torch.nn`` modules, eager and (if asked) compiled, on ``device``."""
    twin_cls, nn_cls = module_classes(shape)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device)
    twin, ref = twin_cls(shape[1]).to(device), nn_cls(shape[1]).to(device)
    steps = {"twin eager": module_step(twin, x, dy), "torch.nn eager": module_step(ref, x, dy)}
    if compile_twin:
        compiled = torch.compile(twin_cls(shape[1]).to(device), dynamic=False)
        steps["twin compiled"] = module_step(compiled, x, dy)
    if compile_nn:
        compiled = torch.compile(nn_cls(shape[1]).to(device), dynamic=False)
        steps["torch.nn compiled"] = module_step(compiled, x, dy)
    return steps


def first_calls(steps: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Call each step once (compiles what is compiled); wall seconds of each first call."""
    seconds = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - t0
    return seconds


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def ratio_rows(
    timings: bnbook.cost.Timings, shape: Sequence[int], device: str
) -> list[dict[str, object]]:
    """One row per comparison whose two sides were both timed."""
    rows = []
    for contender, reference in COMPARISONS:
        if contender not in timings.samples or reference not in timings.samples:
            continue
        q = timings.ratio_quartiles(contender, reference)
        limit = target(contender, reference, shape)
        rows.append(
            {
                "device": device,
                "shape": shape_str(shape),
                "kind": kind(shape),
                "contender": contender,
                "reference": reference,
                "contender_ms": f"{timings[contender] * 1e3:.4f}",
                "reference_ms": f"{timings[reference] * 1e3:.4f}",
                "ratio_median": f"{q['median']:.4f}",
                "ratio_q1": f"{q['q1']:.4f}",
                "ratio_q3": f"{q['q3']:.4f}",
                "ratio_min": f"{q['min']:.4f}",
                "ratio_max": f"{q['max']:.4f}",
                "ratio_fastest": f"{timings.fastest_ratio(contender, reference):.4f}",
                "rounds": str(len(timings.samples[contender])),
                "target": "" if limit is None else f"{limit:g}",
            }
        )
    return rows


def cpu_shape(shape: Sequence[int], repeats: int, compile_: bool, seed: int) -> list[dict]:
    """Every contender at one shape, in one interleaved round-robin."""
    cpu = torch.device("cpu")
    steps = {**numpy_steps(shape, seed)}
    steps.update(module_steps(shape, seed, cpu, compile_twin=compile_, compile_nn=compile_))
    first = first_calls(steps)
    compiled = {k: f"{v:.1f} s" for k, v in first.items() if "compiled" in k}
    if compiled:
        print(f"  {shape_str(shape)}: first call (compile) {compiled}", flush=True)
    # Fewer rounds where one round of calls takes long (49 MiB tensors: about a second).
    nbytes = 4 * int(np.prod(shape))
    rounds = repeats if nbytes < 32 * 2**20 else max(5, (2 * repeats) // 3)
    return ratio_rows(bnbook.cost.cpu_times(steps, repeats=rounds, min_sample=0.02), shape, "cpu")


def cpu_sweep(shapes, repeats: int, compile_: bool, seed: int = 0) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    with threadpool_limits(1):
        for shape in shapes:
            rows += cpu_shape(shape, repeats, compile_, seed)
            print(format_table([r for r in rows if r["shape"] == shape_str(shape)]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# The GPU table
# --------------------------------------------------------------------------------------------


def device_times(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 15
) -> bnbook.cost.Timings:
    """Seconds per call of each function on ``device``, interleaved like ``cpu_times``.

    On CUDA each sample is the wall time of enough calls to last a few milliseconds, measured
    between two synchronisations (the kernels run asynchronously); on the CPU this is
    :func:`bnbook.cost.cpu_times`.
    """
    if device.type != "cuda":
        return bnbook.cost.cpu_times(fns, repeats=repeats)

    def sync() -> None:
        torch.cuda.synchronize(device)

    numbers = {}
    for name, fn in fns.items():
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        numbers[name] = max(1, int(0.005 / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / numbers[name])
    return bnbook.cost.Timings(samples)


def copy_step(shape: Sequence[int], device: torch.device) -> Callable[[], object]:
    """A device-to-device copy of a float32 tensor of ``shape`` (reads it once, writes once)."""
    src = torch.randn(shape, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def gpu_rows(shape: Sequence[int], repeats: int, compile_: bool, device, seed=0) -> list[dict]:
    """The twin (eager, compiled) against cuDNN at one shape, and the bandwidth each achieves.

    Bandwidth counts the bytes of the two-pass algorithm (``bnbook.cost.BYTES_PER_ELEMENT``,
    36 per float32 element forward + backward) and compares it with a device copy's (8 per
    element: read and write).
    """
    steps = module_steps(shape, seed, device, compile_twin=compile_, compile_nn=False)
    steps["copy"] = copy_step(shape, device)
    first_calls(steps)
    t = device_times(steps, device, repeats)
    numel = int(np.prod(shape))
    moved = numel * sum(bnbook.cost.BYTES_PER_ELEMENT["fwdbwd"].values())
    copy_gbps = 8 * numel / t["copy"] / 1e9
    rows = []
    for name in [k for k in steps if k != "copy"]:
        q = t.ratio_quartiles(name, "torch.nn eager")
        rows.append(
            {
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "shape": shape_str(shape),
                "contender": name,
                "ms": f"{t[name] * 1e3:.4f}",
                "ratio_to_cudnn": f"{q['median']:.4f}",
                "ratio_min": f"{q['min']:.4f}",
                "ratio_max": f"{q['max']:.4f}",
                "achieved_GBps": f"{moved / t[name] / 1e9:.4g}",
                "copy_GBps": f"{copy_gbps:.4g}",
                "fraction_of_copy": f"{moved / t[name] / 1e9 / copy_gbps:.3f}",
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """The ratio rows as a text table: median [q1–q3] (min–max), the ratio of the fastest
    rounds, and the target if any (met or not by the median)."""
    lines = []
    for r in rows:
        spread = f"[{float(r['ratio_q1']):.2f}–{float(r['ratio_q3']):.2f}]"
        extremes = f"({float(r['ratio_min']):.2f}–{float(r['ratio_max']):.2f})"
        extremes += f" fastest {float(r['ratio_fastest']):.2f}"
        ms = f"{float(r['contender_ms']):9.3f} / {float(r['reference_ms']):9.3f} ms"
        verdict = ""
        if r["target"]:
            ok = float(r["ratio_median"]) <= float(r["target"])
            verdict = f"  target {r['target']}x {'met' if ok else 'MISSED'}"
        comparison = f"{r['contender']} / {r['reference']}"
        lines.append(
            f"{r['shape']:>13s} {comparison:34s} {ms}  {float(r['ratio_median']):5.2f}x "
            f"{spread} {extremes}{verdict}"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], fields: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES)
    parser.add_argument("--repeats", type=int, default=15, help="rounds per shape")
    parser.add_argument("--quick", action="store_true", help="5 rounds, nothing written")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument(
        "--default-allocator", action="store_true", help="keep the environment's malloc settings"
    )
    args = parser.parse_args(argv)
    restart = argv is None and not args.default_allocator
    if restart and any(os.environ.get(k) != v for k, v in ALLOCATOR.items()):
        # The settings are read when the process starts: start again with them.
        env = {**os.environ, **ALLOCATOR}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    repeats = 5 if args.quick else args.repeats
    compile_ = not args.no_compile
    machine = bnbook.machine.machine_info()
    machine["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "unset")
    machine["threads"] = "1 (torch and BLAS)"
    machine["clock"] = "CPU time of the process, per-round ratios of interleaved calls"
    machine["load_average_at_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    for name in MEASURED:  # which versions were measured
        digest = hashlib.sha256((ROOT / "bnbook" / name).read_bytes()).hexdigest()[:12]
        machine[f"sha256_{name}"] = digest
    print(f"{machine['cpu']} ({machine['cpu_capability']}), caches {machine['caches']}")
    print(f"torch {machine['torch']}, numpy {machine['numpy']}, BLAS {machine['blas']}")
    print("float32, forward + backward, 1 thread; time ratio: median [q1–q3] (min–max) over")
    print("rounds, and the ratio of the two fastest rounds")
    t0 = time.perf_counter()
    rows = cpu_sweep(args.shapes, repeats, compile_)
    machine["sweep_seconds"] = f"{time.perf_counter() - t0:.0f}"
    machine["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    gpu = []
    if torch.cuda.is_available():
        device = torch.device("cuda")
        machine["gpu"] = torch.cuda.get_device_name(device)
        for shape in args.shapes:
            gpu += gpu_rows(shape, repeats, compile_, device)
        for r in gpu:
            print(
                f"{r['shape']:>13s} {r['contender']:15s} {r['ms']:>9s} ms "
                f"{float(r['ratio_to_cudnn']):6.2f}x cuDNN, {r['achieved_GBps']} GB/s "
                f"({float(r['fraction_of_copy']):.0%} of a copy)"
            )
    if args.quick:
        return
    csv_path = SWEEPS / f"{sweep_name(machine)}.csv"
    SWEEPS.mkdir(parents=True, exist_ok=True)
    write_csv(csv_path, rows, FIELDS)
    csv_path.with_suffix(".json").write_text(json.dumps(machine, indent=1) + "\n")
    if gpu:
        write_csv(GPU_CSV_PATH, gpu, list(gpu[0]))
    print(f"wrote {csv_path.relative_to(ROOT)} and its .json")


if __name__ == "__main__":
    main()
