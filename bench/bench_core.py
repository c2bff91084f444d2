"""Speed of the book's batch norm against PyTorch's, side by side in one process (issue 2's targets).

Prints, for float32 inputs on ONE thread, the ratio of forward+backward time of
  * bnbook.numpy (batch_norm_forward + batch_norm_backward) to torch.nn.functional.batch_norm,
  * bnbook.torch.BatchNorm2d (eager) to torch.nn.BatchNorm2d (eager),
  * bnbook.torch.BatchNorm2d under torch.compile to torch.nn.BatchNorm2d under torch.compile (--compile),
as the median over interleaved repeats (the machine may be shared: interleaving exposes both sides to
the same load). Ratios, not absolute times, are the result; they are written to bench/results/core.csv.

    python bench/bench_core.py [--shape 64 64 56 56] [--repeats 15] [--compile]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

import bnbook.numpy as bnp
from bnbook.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d

RESULTS = Path(__file__).parent / "results" / "core.csv"


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def numpy_vs_torch(shape, repeats):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[1]
    gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.ones(c, requires_grad=True)
    bt = torch.zeros(c, requires_grad=True)
    dyt = torch.from_numpy(dy)

    def run_numpy():
        y, cache = bnp.batch_norm_forward(x, gamma, beta)
        bnp.batch_norm_backward(dy, cache)

    def run_torch():
        xt.grad = wt.grad = bt.grad = None
        F.batch_norm(xt, None, None, wt, bt, training=True).backward(dyt)

    return interleaved({"bnbook.numpy": run_numpy, "torch F.batch_norm": run_torch}, repeats)


def module_pair(shape, repeats, compile_: bool):
    cls_ours = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}[len(shape)]
    cls_ref = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }[len(shape)]
    ours, ref = cls_ours(shape[1]), cls_ref(shape[1])
    if compile_:
        ours, ref = torch.compile(ours), torch.compile(ref)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)

    def step(module):
        def run():
            x.grad = None
            module(x).backward(dy)

        return run

    t0 = time.perf_counter()
    step(ours)()
    step(ref)()
    first = time.perf_counter() - t0
    res = interleaved({"bnbook.torch": step(ours), "torch.nn": step(ref)}, repeats)
    return res, first


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 56, 56])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also compare under torch.compile")
    args = parser.parse_args()
    shape = tuple(args.shape)
    torch.set_num_threads(1)
    rows = []
    with threadpool_limits(1):
        t = numpy_vs_torch(shape, args.repeats)
        rows.append(
            ("numpy fwd+bwd / F.batch_norm fwd+bwd", t["bnbook.numpy"], t["torch F.batch_norm"])
        )
        t, _ = module_pair(shape, args.repeats, compile_=False)
        rows.append(("bnbook.torch / torch.nn (eager)", t["bnbook.torch"], t["torch.nn"]))
        if args.compile:
            t, first = module_pair(shape, args.repeats, compile_=True)
            rows.append(
                ("bnbook.torch / torch.nn (torch.compile)", t["bnbook.torch"], t["torch.nn"])
            )
    print(f"shape {shape}, float32, 1 thread, median of {args.repeats} interleaved repeats")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )
    for name, ours, ref in rows:
        print(f"  {name:42s} {ours * 1e3:8.2f} ms / {ref * 1e3:8.2f} ms = {ours / ref:5.2f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["comparison", "shape", "ours_ms", "reference_ms", "ratio"])
        for name, ours, ref in rows:
            w.writerow(
                [
                    name,
                    "x".join(map(str, shape)),
                    f"{ours * 1e3:.3f}",
                    f"{ref * 1e3:.3f}",
                    f"{ours / ref:.3f}",
                ]
            )


if __name__ == "__main__":
    main()
