"""Every number of chapter ``ch-cost`` ("What batch norm costs, and how to make it cheap").

Runs the chapter's experiments at full size, side by side in one process, and writes them to
``bench/results/cost.csv`` (long format: ``section, case, impl, metric, value``), together with the
C++ kernels that ``torch.compile`` generates for batch norm + ReLU
(``bench/results/inductor_bn_relu_{forward,backward}.cpp``). The chapter reads the expensive numbers
(everything compiled, the large shapes, the full grids) from these files and re-measures a fast
subset live.

    python bench/cost.py                          # every section (~10 minutes on 2 busy cores)
    python bench/cost.py --sections fusion fold   # only these; other sections' rows are kept
    python bench/cost.py --quick                  # smoke test: few repeats, small shapes, no CSV

Sections: ``bandwidth`` (NumPy read/copy bandwidth against array size), ``roofline`` (the
implementations against the bandwidth limit, several shapes), ``fusion`` (BN and BN+ReLU, eager
against torch.compile, and the kernels inductor writes), ``alloc`` (first touch of fresh pages),
``fold`` (folding BN into the layers before it, a trained small CNN), ``profile`` (BN's share of a
training step against batch size and channels).

How things are timed: every implementation runs on ONE thread (torch and BLAS); the functions being
compared are called round-robin (interleaved), so that all of them see the same background load, and
each result is the median over repeats. The clock is the process's CPU time
(``time.process_time``: user + system time of this process), not the wall clock: the machine is
shared, and wall time mostly measures the other tenants. A ratio of two such medians is the result;
absolute times are recorded only to make the ratios checkable.

Compile times are measured with a fresh, empty inductor cache directory and in-process compilation
(``compile_threads = 1``), so they are cold starts; their CPU time includes the C++ compiler's
(a child process).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# A fresh inductor cache: compile times below are cold starts, not cache hits. Set before torch loads.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnbook-cost-inductor-")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bnbook.numpy as bnp  # noqa: E402
import bnbook.torch as bnt  # noqa: E402
from bnbook.cost import (  # noqa: E402  (the chapter uses the same tools)
    BYTES_PER_ELEMENT,
    bandwidth_kernels,
    bandwidth_limit,
    bandwidths,
    batch_norm_case,
    batch_norm_steps,
    cpu_times,
    profiler_share,
    small_cnn,
    torch_training_step,
    training_step,
)
from bnbook.machine import machine_info, minor_faults  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CSV_PATH = RESULTS / "cost.csv"
CODE_FORWARD = RESULTS / "inductor_bn_relu_forward.cpp"
CODE_BACKWARD = RESULTS / "inductor_bn_relu_backward.cpp"
FIELDS = ["section", "case", "impl", "metric", "value"]

# The roofline shapes: a dense layer, the book's small CNN (first stage, batch 60), a late CNN stage
# with short 7x7 rows, and two ResNet-like early stages. Distinct sizes from 1 MiB to 49 MiB.
ROOFLINE_SHAPES = [
    (1024, 256),
    (60, 16, 28, 28),
    (128, 256, 7, 7),
    (64, 64, 28, 28),
    (64, 64, 56, 56),
]
FUSION_SHAPES = [(60, 16, 28, 28), (64, 64, 28, 28)]
BANDWIDTH_MIB = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
ALLOC_MIB = [8, 16, 32, 48, 96]

Row = tuple[str, str, str, str, object]


def shape_str(shape) -> str:
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def machine_rows() -> list[Row]:
    info = machine_info()
    # The names this CSV has always used for two of them.
    info["caches_per_core_or_shared"] = info.pop("caches")
    info["torch_cpu_capability"] = info.pop("cpu_capability")
    info["threads"] = "1 (torch and BLAS)"
    info["clock"] = "time.process_time (CPU time of the process), median of interleaved repeats"
    info["load_average_at_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    # Which version of the implementations was measured (sha256 of the files, first 12 digits).
    for name in ("numpy.py", "torch.py", "fusion.py", "cost.py"):
        digest = hashlib.sha256((ROOT / "bnbook" / name).read_bytes()).hexdigest()[:12]
        info[f"sha256_{name}"] = digest
    return [("machine", "", "", key, value) for key, value in info.items()]


# --------------------------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------------------------


def section_bandwidth(repeats: int, quick: bool) -> list[Row]:
    rows: list[Row] = []
    for mib in BANDWIDTH_MIB[:4] if quick else BANDWIDTH_MIB:
        kernels, moved = bandwidth_kernels(int(mib * 2**20))
        med = cpu_times(kernels, repeats).medians
        for name, t in med.items():
            rows.append(
                ("bandwidth", f"{mib}", "numpy", f"{name}_GBps", f"{moved[name] / t / 1e9:.3f}")
            )
        print(
            f"  {mib:7.2f} MiB  "
            + "  ".join(f"{k} {moved[k] / t / 1e9:5.1f} GB/s" for k, t in med.items())
        )
    return rows


# --------------------------------------------------------------------------------------------
# Roofline: the implementations against the bandwidth limit
# --------------------------------------------------------------------------------------------


def _compile(fn):
    return torch.compile(fn, dynamic=False)


def cpu_with_children() -> float:
    """CPU seconds of this process and of its finished children (the C++ compiler runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed_first_call(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_with_children()
    fn()
    return time.perf_counter() - wall, cpu_with_children() - cpu


def section_roofline(repeats: int, quick: bool) -> list[Row]:
    rows: list[Row] = []
    for shape in ROOFLINE_SHAPES[:2] if quick else ROOFLINE_SHAPES:
        rows += _roofline_shape(shape, repeats)
    return rows


def _roofline_shape(shape: tuple[int, ...], repeats: int) -> list[Row]:
    rows: list[Row] = []
    case = shape_str(shape)
    problem = batch_norm_case(shape, seed=0)
    x_np, gamma, beta = problem.x_np, problem.gamma, problem.beta
    x, dy, w, b = problem.x, problem.dy, problem.weight, problem.bias
    functions = {"bnbook.torch": bnt.batch_norm, "F.batch_norm": F.batch_norm}
    functions |= {f"{name}+compile": _compile(fn) for name, fn in functions.items()}
    fwdbwd = batch_norm_steps(problem)  # forward + backward, eager; compiled below
    fwd = {"bnbook.numpy": lambda: bnp.batch_norm_forward(x_np, gamma, beta)}
    for name, fn in functions.items():
        fwdbwd[name] = torch_training_step(fn, problem)
        fwd[name] = functools.partial(fn, x, None, None, w, b, training=True)
    if len(shape) == 4:  # the same kernel on the same values, stored channels-last (NHWC)
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        dy_cl = dy.contiguous(memory_format=torch.channels_last)

        def channels_last_fwdbwd():
            x_cl.grad = w.grad = b.grad = None
            F.batch_norm(x_cl, None, None, w, b, training=True).backward(dy_cl)

        fwd["F.batch_norm channels_last"] = functools.partial(
            F.batch_norm, x_cl, None, None, w, b, training=True
        )
        fwdbwd["F.batch_norm channels_last"] = channels_last_fwdbwd
    for name in [k for k in fwd if k.endswith("+compile")]:
        wall, cpu = _timed_first_call(fwdbwd[name])  # compiles forward and backward graphs
        rows.append(("roofline", case, name, "compile_wall_s", f"{wall:.2f}"))
        rows.append(("roofline", case, name, "compile_cpu_s", f"{cpu:.2f}"))
        print(f"  {case}: compiled {name} in {wall:.1f} s wall, {cpu:.1f} s CPU")

    # Correctness first: every implementation agrees with F.batch_norm.
    ref = F.batch_norm(x.detach(), None, None, training=True).numpy()
    for name, fn in fwd.items():
        out = fn()
        y = out[0] if isinstance(out, tuple) else out.detach().numpy()
        err = float(np.max(np.abs(y - ref)))
        if err > 1e-3:  # float32 sums of up to 200,000 values per channel, in any order
            raise AssertionError(f"{name} disagrees with F.batch_norm on {case}: {err:.2e}")

    kernels, moved = bandwidth_kernels(x_np.nbytes)
    # Fewer repeats for the largest input, where one round of calls takes many seconds.
    reps = repeats if x_np.nbytes < 32 * 2**20 else max(5, repeats // 3)
    for which, fns in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        med = cpu_times({**fns, **kernels}, reps).medians
        read_gbps, rw_gbps = bandwidths(med, moved)
        limit = bandwidth_limit(x_np.size, which, read_gbps, rw_gbps)
        nbytes = x_np.size * sum(BYTES_PER_ELEMENT[which].values())
        rows += [
            ("roofline", case, "limit", f"{which}_read_GBps", f"{read_gbps:.3f}"),
            ("roofline", case, "limit", f"{which}_rw_GBps", f"{rw_gbps:.3f}"),
            ("roofline", case, "limit", f"{which}_bytes", str(nbytes)),
            ("roofline", case, "limit", f"{which}_ms", f"{limit * 1e3:.4f}"),
        ]
        for name in fns:
            rows.append(("roofline", case, name, f"{which}_ms", f"{med[name] * 1e3:.4f}"))
            rows.append(("roofline", case, name, f"{which}_fraction", f"{limit / med[name]:.4f}"))
        print(
            f"  {case} {which:6s} limit {limit * 1e3:7.2f} ms | "
            + " | ".join(f"{k} {med[k] * 1e3:7.2f} ms ({limit / med[k]:4.0%})" for k in fns)
        )
    return rows


# --------------------------------------------------------------------------------------------
# Training-time fusion: BN and BN+ReLU under torch.compile
# --------------------------------------------------------------------------------------------


def _bn(x, w, b):
    return F.batch_norm(x, None, None, w, b, training=True)


def _bn_relu(x, w, b):
    return F.relu(F.batch_norm(x, None, None, w, b, training=True))


def _kernels_of(code: str) -> list[str]:
    """The C++ sources inside an inductor output module (the r'''...''' strings)."""
    parts = code.split("r'''")[1:]
    return [p.split("'''")[0].strip("\n") for p in parts]


def _bind(fn: Callable, *args) -> Callable[[], object]:
    """``fn`` with its arguments bound: a zero-argument callable to time."""
    return lambda: fn(*args)


def _training_step(fn: Callable, x, w, b, dy) -> Callable[[], None]:
    def run():
        x.grad = w.grad = b.grad = None
        fn(x, w, b).backward(dy)

    return run


def _forward_no_grad(fn: Callable, x, w, b) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(x, w, b)

    return run


def section_fusion(repeats: int, quick: bool) -> list[Row]:
    rows: list[Row] = []
    for shape in FUSION_SHAPES[:1] if quick else FUSION_SHAPES:
        save_code = shape == FUSION_SHAPES[0] and not quick
        rows += _fusion_shape(shape, repeats, save_code)
    return rows


def _fusion_shape(shape: tuple[int, ...], repeats: int, save_code: bool) -> list[Row]:
    from torch._inductor.utils import run_and_get_code

    rows: list[Row] = []
    case = shape_str(shape)
    x = torch.randn(shape, requires_grad=True)
    w = torch.ones(shape[1], requires_grad=True)
    b = torch.zeros(shape[1], requires_grad=True)
    dy = torch.randn(shape)

    fns: dict[str, Callable] = {}
    for name, fn in (("bn", _bn), ("bn+relu", _bn_relu)):
        compiled = _compile(fn)
        wall, cpu = time.perf_counter(), cpu_with_children()
        _, codes = run_and_get_code(_training_step(compiled, x, w, b, dy))
        wall, cpu = time.perf_counter() - wall, cpu_with_children() - cpu
        rows.append(("fusion", case, name, "compile_wall_s", f"{wall:.2f}"))
        rows.append(("fusion", case, name, "compile_cpu_s", f"{cpu:.2f}"))
        print(f"  {case} {name}: compiled in {wall:.1f} s wall, {cpu:.1f} s CPU")
        if name == "bn+relu" and save_code:
            CODE_FORWARD.write_text("\n\n".join(_kernels_of(codes[0])) + "\n")
            CODE_BACKWARD.write_text("\n\n".join(_kernels_of(codes[1])) + "\n")
        fns[f"{name} eager"] = _training_step(fn, x, w, b, dy)
        fns[f"{name} compiled"] = _training_step(compiled, x, w, b, dy)
        fns[f"{name} eager no_grad"] = _forward_no_grad(fn, x, w, b)
        fns[f"{name} compiled no_grad"] = _forward_no_grad(compiled, x, w, b)
    med = cpu_times(fns, repeats).medians
    for key, t in med.items():
        name, variant = key.split(" ", 1)
        metric = variant.replace(" ", "_") + "_ms"
        rows.append(("fusion", case, name, metric, f"{t * 1e3:.4f}"))
    for name in ("bn", "bn+relu"):
        ratio = med[f"{name} compiled"] / med[f"{name} eager"]
        ratio_ng = med[f"{name} compiled no_grad"] / med[f"{name} eager no_grad"]
        rows.append(("fusion", case, name, "compiled_over_eager", f"{ratio:.4f}"))
        rows.append(("fusion", case, name, "compiled_over_eager_no_grad", f"{ratio_ng:.4f}"))
        print(
            f"  {case} {name}: train step compiled/eager {ratio:.2f}, forward no_grad {ratio_ng:.2f}"
        )

    # The suspect in isolation: storing a comparison as one byte per element (a bool mask),
    # against storing it as float32, eager and compiled.
    xd = x.detach()
    probes = {
        "mask_bool": lambda t: t <= 0,
        "mask_float": lambda t: (t <= 0).float(),
        "relu": torch.relu,
    }
    pf = {}
    for name, fn in probes.items():
        compiled = _compile(fn)
        compiled(xd)
        pf[f"{name} eager"] = _bind(fn, xd)
        pf[f"{name} compiled"] = _bind(compiled, xd)
    med = cpu_times(pf, repeats).medians
    for name in probes:
        ratio = med[f"{name} compiled"] / med[f"{name} eager"]
        rows.append(("fusion", case, name, "eager_ms", f"{med[f'{name} eager'] * 1e3:.4f}"))
        rows.append(("fusion", case, name, "compiled_ms", f"{med[f'{name} compiled'] * 1e3:.4f}"))
        rows.append(("fusion", case, name, "compiled_over_eager", f"{ratio:.4f}"))
        print(f"  {case} probe {name}: compiled/eager {ratio:.2f}")
    return rows


# --------------------------------------------------------------------------------------------
# Allocation: first touch of fresh pages
# --------------------------------------------------------------------------------------------


def _alloc_measurements(repeats: int, sizes_mib) -> list[Row]:
    """Fresh versus reused output buffers, torch and NumPy, and a large batch norm's forward."""
    tag = "torch+THP" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "torch"
    rows: list[Row] = []
    for mib in sizes_mib:
        rows += _alloc_size(mib, tag, repeats)
    for shape in ((64, 64, 28, 28), (64, 64, 56, 56)):
        rows += _alloc_batch_norm(shape, tag, repeats)
    return rows


def _alloc_size(mib: int, tag: str, repeats: int) -> list[Row]:
    rows: list[Row] = []
    n = mib * 2**20 // 4
    xt = torch.randn(n)
    xn = xt.numpy()
    out_t = torch.empty(n)
    out_t.copy_(xt)
    out_n = np.empty(n, np.float32)
    np.copyto(out_n, xn)
    fns = {
        f"{tag} fresh": lambda: torch.empty(n).copy_(xt),
        f"{tag} reused": lambda: out_t.copy_(xt),
    }
    if tag == "torch":
        fns["numpy fresh"] = lambda: np.copyto(np.empty(n, np.float32), xn)
        fns["numpy reused"] = lambda: np.copyto(out_n, xn)
    med = cpu_times(fns, repeats).medians
    for key, t in med.items():
        impl, variant = key.split(" ")
        rows.append(("alloc", f"{mib}", impl, f"{variant}_ms", f"{t * 1e3:.4f}"))
    for key, fn in fns.items():
        fn()
        before = minor_faults()
        fn()
        impl, variant = key.split(" ")
        rows.append(("alloc", f"{mib}", impl, f"{variant}_faults", str(minor_faults() - before)))
    return rows


def _alloc_batch_norm(shape: tuple[int, ...], tag: str, repeats: int) -> list[Row]:
    x = torch.randn(shape)
    c = shape[1]
    w, b = torch.ones(c), torch.zeros(c)
    out, save_mean, save_invstd = torch.empty_like(x), torch.empty(c), torch.empty(c)
    bn = torch.ops.aten.native_batch_norm
    fns = {
        "fresh": lambda: bn(x, w, b, None, None, True, 0.1, 1e-5),
        "reused": lambda: bn.out(
            x,
            w,
            b,
            None,
            None,
            True,
            0.1,
            1e-5,
            out=out,
            save_mean=save_mean,
            save_invstd=save_invstd,
        ),
    }
    med = cpu_times(fns, repeats).medians
    impl = f"{tag} native_batch_norm"
    return [("alloc", shape_str(shape), impl, f"{v}_ms", f"{t * 1e3:.4f}") for v, t in med.items()]


def section_alloc(repeats: int, quick: bool) -> list[Row]:
    sizes = ALLOC_MIB[:2] if quick else ALLOC_MIB
    rows = _alloc_measurements(repeats, sizes)
    # The same measurement with PyTorch's transparent-huge-page option, which is read once at the
    # first allocation, so it needs a fresh process.
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
    child = subprocess.run(
        [sys.executable, __file__, "--alloc-child", "--repeats", str(repeats)]
        + (["--quick"] if quick else []),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rows += [tuple(r) for r in json.loads(child.stdout.strip().splitlines()[-1])]
    for r in rows:
        print("  " + " ".join(map(str, r[1:])))
    return rows


# --------------------------------------------------------------------------------------------
# Inference-time folding
# --------------------------------------------------------------------------------------------


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            model(x)

    return run


FOLD_STEPS = 150
FOLD_BATCH = 50
FOLD_LR = 0.1


def section_fold(repeats: int, quick: bool) -> list[Row]:
    import bnbook
    from bnbook.data import load_mnist_subset
    from bnbook.fusion import fold_bn
    from bnbook.train import evaluate, train_classifier

    rows: list[Row] = []
    bnbook.seed_everything(0)
    data = load_mnist_subset(flatten=False, as_torch=True)
    model = small_cnn()
    train_classifier(
        model, data, steps=30 if quick else FOLD_STEPS, batch_size=FOLD_BATCH, lr=FOLD_LR
    )
    model.eval()
    folded = fold_bn(model).eval()
    with torch.no_grad():
        diff = (model(data.x_test) - folded(data.x_test)).abs().max().item()
    _, acc = evaluate(model, data.x_test, data.y_test)
    _, acc_folded = evaluate(folded, data.x_test, data.y_test)
    rows += [
        ("fold", "test", "unfolded", "accuracy", f"{acc:.4f}"),
        ("fold", "test", "folded", "accuracy", f"{acc_folded:.4f}"),
        ("fold", "test", "folded", "max_abs_logit_diff", f"{diff:.3e}"),
        ("fold", "model", "unfolded", "modules", str(len(model))),
        (
            "fold",
            "model",
            "folded",
            "batch_norms_left",
            str(sum("BatchNorm" in type(m).__name__ for m in folded)),
        ),
    ]
    for batch in (1, 32, 256):
        xb = data.x_test[:batch]
        infer = {"unfolded": _inference(model, xb), "folded": _inference(folded, xb)}
        med = cpu_times(infer, repeats).medians
        rows.append(
            ("fold", f"batch{batch}", "unfolded", "latency_ms", f"{med['unfolded'] * 1e3:.4f}")
        )
        rows.append(("fold", f"batch{batch}", "folded", "latency_ms", f"{med['folded'] * 1e3:.4f}"))
        rows.append(
            ("fold", f"batch{batch}", "folded", "ratio", f"{med['folded'] / med['unfolded']:.4f}")
        )
        print(f"  batch {batch}: folded/unfolded latency {med['folded'] / med['unfolded']:.3f}")
    print(f"  accuracy {acc:.4f} -> {acc_folded:.4f}, max |logit difference| {diff:.2e}")
    return rows


# --------------------------------------------------------------------------------------------
# BN's share of a training step
# --------------------------------------------------------------------------------------------


def conv_net(channels: int, norm: bool) -> nn.Sequential:
    """``bnbook.models.cnn((c, 2c))`` with torch's BatchNorm2d, or with the BN layers removed."""
    from bnbook.models import cnn

    # With any norm factory, cnn() builds its convolutions without bias: nn.Identity keeps the
    # convolutions of the two networks identical.
    return cnn((channels, 2 * channels), norm=nn.BatchNorm2d if norm else nn.Identity)


def section_profile(repeats: int, quick: bool) -> list[Row]:
    rows: list[Row] = []
    batches = (16, 64) if quick else (8, 32, 128)
    channels = (8, 32) if quick else (8, 16, 32, 64)
    for batch in batches:
        for c in channels:
            case = f"N={batch},C={c}"
            torch.manual_seed(0)
            with_bn = training_step(conv_net(c, True), batch)
            without = training_step(conv_net(c, False), batch)
            share = profiler_share(with_bn, steps=5, runs=5)
            med = cpu_times({"bn": with_bn, "none": without}, max(5, repeats // 2)).medians
            ablation = 1 - med["none"] / med["bn"]
            rows += [
                ("profile", case, "profiler", "bn_share", f"{share:.4f}"),
                ("profile", case, "ablation", "bn_share", f"{ablation:.4f}"),
                ("profile", case, "with_bn", "step_ms", f"{med['bn'] * 1e3:.4f}"),
                ("profile", case, "without_bn", "step_ms", f"{med['none'] * 1e3:.4f}"),
            ]
            print(f"  {case}: BN share {share:.1%} (profiler), {ablation:.1%} (removing BN)")
    return rows


# --------------------------------------------------------------------------------------------

SECTIONS = {
    "bandwidth": section_bandwidth,
    "roofline": section_roofline,
    "fusion": section_fusion,
    "alloc": section_alloc,
    "fold": section_fold,
    "profile": section_profile,
}


def write_rows(new_rows: list[Row], sections: list[str]) -> None:
    """Replace the rows of ``sections`` (and the machine rows) in the CSV, keep the others."""
    kept = []
    if CSV_PATH.exists():
        with CSV_PATH.open(newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if r["section"] not in {*sections, "machine"}]
    RESULTS.mkdir(exist_ok=True)
    with CSV_PATH.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(FIELDS)
        for r in new_rows:
            writer.writerow(r)
        for r in kept:
            writer.writerow([r[f] for f in FIELDS])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats, no files written"
    )
    parser.add_argument("--alloc-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    torch._inductor.config.force_disable_caches = True  # every compile time is a cold start
    torch._dynamo.config.recompile_limit = 64
    repeats = 3 if args.quick else args.repeats
    with threadpool_limits(1):
        if args.alloc_child:
            sizes = ALLOC_MIB[:2] if args.quick else ALLOC_MIB
            print(json.dumps(_alloc_measurements(repeats, sizes)))
            return
        rows = machine_rows()
        for name in args.sections:
            print(f"[{name}]")
            t0 = time.perf_counter()
            rows += SECTIONS[name](repeats, args.quick)
            print(f"[{name}] {time.perf_counter() - t0:.0f} s")
        rows.append(
            (
                "machine",
                "",
                "",
                "load_average_at_end",
                " ".join(f"{v:.2f}" for v in os.getloadavg()),
            )
        )
    if not args.quick:
        write_rows(rows, args.sections)
        print(f"wrote {CSV_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
