"""bench/bench_core.py: the shape sweep's pieces, on tiny shapes (the GPU path runs on the CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bnbook import cost, machine

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench_core.py"
_SPEC = importlib.util.spec_from_file_location("bench_core", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_shapes_parse_and_print():
    assert bench.parse_shape("64x64x56x56") == (64, 64, 56, 56)
    assert bench.shape_str((60, 100)) == "60x100"
    for bad in ("64", "0x3", "ax3"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            bench.parse_shape(bad)
    assert {bench.kind(s) for s in bench.DENSE} == {"dense"}
    assert {bench.kind(s) for s in bench.SPATIAL} == {"spatial"}


def test_targets_are_those_of_the_sweep():
    assert bench.target("bnbook.numpy", "F.batch_norm", (1024, 256)) == 1.5
    assert bench.target("bnbook.numpy", "F.batch_norm", (8, 256, 14, 14)) == 1.1
    assert bench.target("twin eager", "torch.nn eager", (64, 64, 56, 56)) == 1.3
    assert bench.target("twin eager", "torch.nn eager", (60, 100)) == 1.5
    assert bench.target("twin eager", "torch.nn eager", (1024, 256)) is None
    assert bench.target("twin compiled", "torch.nn eager", (32, 512, 7, 7)) == 1.0
    assert bench.target("twin compiled", "torch.nn compiled", (32, 512, 7, 7)) is None


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 5), (2, 3, 2, 2, 2)])
def test_the_steps_run_and_agree(shape):
    steps = bench.numpy_steps(shape, seed=0)
    steps.update(bench.module_steps(shape, 0, torch.device("cpu"), False, False))
    assert set(steps) == {"bnbook.numpy", "F.batch_norm", "twin eager", "torch.nn eager"}
    dx, dgamma, _ = steps["bnbook.numpy"]()
    assert dx.shape == shape and dgamma.shape == (shape[1],)
    for name in ("F.batch_norm", "twin eager", "torch.nn eager"):
        steps[name]()


def test_ratio_rows_and_table():
    t = cost.Timings(
        {
            "bnbook.numpy": [2e-3, 2e-3, 3e-3],
            "F.batch_norm": [1e-3, 2e-3, 2e-3],
            "twin eager": [1e-3, 1e-3, 1e-3],
            "torch.nn eager": [1e-3, 1e-3, 1e-3],
        }
    )
    rows = bench.ratio_rows(t, (60, 100), "cpu")
    assert [(r["contender"], r["reference"]) for r in rows] == bench.COMPARISONS[:2]
    numpy_row = rows[0]
    assert set(numpy_row) == set(bench.FIELDS)
    assert float(numpy_row["ratio_median"]) == 1.5 and float(numpy_row["ratio_max"]) == 2.0
    assert numpy_row["target"] == "1.5" and numpy_row["rounds"] == "3"
    assert float(numpy_row["ratio_fastest"]) == 2.0  # 2 ms over 1 ms
    table = bench.format_table(rows)
    assert "1.50x" in table and "target 1.5x met" in table and "MISSED" not in table


def test_results_round_trip(tmp_path):
    rows = [{f: str(i) for i, f in enumerate(bench.FIELDS)}]
    bench.write_csv(tmp_path / "core.csv", rows, bench.FIELDS)
    assert machine.read_rows(tmp_path / "core.csv") == rows


def test_device_path_runs_on_the_cpu():
    # gpu_rows and device_times take a device: on the CPU they fall back to CPU time.
    cpu = torch.device("cpu")
    t = bench.device_times({"a": lambda: None, "b": lambda: None}, cpu, repeats=2)
    assert len(t.samples["a"]) == 2
    rows = bench.gpu_rows((4, 3, 4, 4), repeats=2, compile_=False, device=cpu)
    assert [r["contender"] for r in rows] == ["twin eager", "torch.nn eager"]
    assert float(rows[1]["ratio_to_cudnn"]) == 1.0  # the reference against itself
    assert all(float(r["achieved_GBps"]) > 0 and float(r["copy_GBps"]) > 0 for r in rows)


def test_quick_sweep_prints_and_writes_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "SWEEPS", tmp_path / "core")
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--no-compile", "--shapes", "8x4", "2x3x4x4"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "8x4" in out and "2x3x4x4" in out and "bnbook.numpy / F.batch_norm" in out
    assert not (tmp_path / "core").exists()
    assert np.isfinite(float(out.split("F.batch_norm")[1].split("x")[0].split()[-1]))


def test_each_processor_keeps_its_own_sweep():
    name = bench.sweep_name
    assert name({"cpu": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512"}) == (
        "intel-xeon-avx512"
    )
    assert name({"cpu": "AMD EPYC", "cpu_capability": "AVX2"}) == "amd-epyc-avx2"
    # the same model with another instruction set is another sweep
    assert name({"cpu": "AMD EPYC", "cpu_capability": "AVX512"}) != "amd-epyc-avx2"
    stored = sorted(p.stem for p in bench.SWEEPS.glob("*.csv"))
    assert stored and all((bench.SWEEPS / f"{s}.json").exists() for s in stored)
    for stem in stored:
        machine_file = json.loads((bench.SWEEPS / f"{stem}.json").read_text())
        assert name(machine_file) == stem
