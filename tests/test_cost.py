"""Tests of bnbook.cost: the timing, bandwidth and profiling tools of ch-cost and bench/cost.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnbook import cost, machine
from bnbook.models import cnn


def test_cpu_times_interleaves_and_keeps_every_sample():
    calls: list[str] = []
    t = cost.cpu_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=4,
        min_sample=0.0,
        warmup=1,
    )
    # warm-up and calibration: a, a, b, b; then four rounds of a, b
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 4
    assert len(t.samples["a"]) == len(t.samples["b"]) == 4
    assert t["a"] == np.median(t.samples["a"])
    assert list(t) == ["a", "b"] and set(t.medians) == {"a", "b"}


def test_cpu_times_ratio_sees_a_slower_function():
    x = np.random.default_rng(0).standard_normal(200_000)
    t = cost.cpu_times({"once": lambda: x.sum(), "ten": lambda: [x.sum() for _ in range(10)]})
    ratios = t.ratios("ten", "once")
    assert len(ratios) == 7
    assert 3 < np.median(ratios) < 30  # ten sums take several times one sum, on any machine


def test_cpu_times_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        cost.cpu_times({"f": lambda: None}, repeats=0)


@pytest.mark.parametrize("nbytes", [64, 4096, 3 * 2**20, 752640 * 4, 1000])
def test_bandwidth_kernels_move_what_they_say(nbytes):
    kernels, moved = cost.bandwidth_kernels(nbytes, seed=1)
    n = nbytes // 4
    assert moved == {"read": 4 * n, "copy": 8 * n, "scale": 8 * n}
    read = kernels["read"]()  # one sum per row of the array seen as a matrix
    assert read.dtype == np.float32 and n % read.size == 0
    kernels["copy"]()
    kernels["scale"]()


def test_bandwidth_kernels_reject_tiny_arrays():
    with pytest.raises(ValueError, match="nbytes"):
        cost.bandwidth_kernels(16)


def test_bandwidth_limit_is_bytes_over_bandwidth():
    # forward: 8 read-only bytes at 10 GB/s and 8 read-write bytes at 5 GB/s, per element
    assert cost.bandwidth_limit(1000, "fwd", 10.0, 5.0) == pytest.approx(1000 * (0.8 + 1.6) * 1e-9)
    both = cost.bandwidth_limit(1000, "fwdbwd", 10.0, 5.0)
    assert both == pytest.approx(1000 * (16 / 10 + 20 / 5) * 1e-9)
    assert sum(cost.BYTES_PER_ELEMENT["fwd"].values()) == 16
    assert sum(cost.BYTES_PER_ELEMENT["fwdbwd"].values()) == 36
    with pytest.raises(KeyError):
        cost.bandwidth_limit(1000, "bwd", 10.0, 5.0)


def test_training_step_updates_the_model():
    torch.manual_seed(0)
    model = cnn((4, 8), norm=nn.BatchNorm2d)
    before = [p.detach().clone() for p in model.parameters()]
    step = cost.training_step(model, batch=4, seed=3)
    step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_profiler_share_is_zero_without_batch_norm_and_positive_with_it():
    torch.manual_seed(0)
    with_bn = cost.training_step(cnn((4, 8), norm=nn.BatchNorm2d), batch=8, seed=0)
    without = cost.training_step(cnn((4, 8), norm=nn.Identity), batch=8, seed=0)
    share = cost.profiler_share(with_bn, steps=2, runs=1, warmup=1)
    assert 0 < share < 1
    assert cost.profiler_share(without, steps=2, runs=1, warmup=1) == 0.0


def test_cache_sizes_read_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate(
        [
            ("1", "Data", "32K"),
            ("1", "Instruction", "32K"),
            ("2", "Unified", "1024K"),
            ("3", "Unified", "32M"),
        ]
    ):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(level + "\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert machine.cache_sizes(tmp_path) == {"L1": 32 * 2**10, "L2": 2**20, "L3": 32 * 2**20}


def test_cache_sizes_without_sysfs_fall_back_or_are_empty(tmp_path):
    sizes = machine.cache_sizes(tmp_path / "missing")
    assert all(level in {"L1", "L2", "L3"} and size > 0 for level, size in sizes.items())


def test_cache_format_round_trips():
    sizes = {"L1": 32 * 2**10, "L2": 512 * 2**10, "L3": 8 * 2**20}
    assert machine.format_caches(sizes) == "L1 32K, L2 512K, L3 8192K"
    assert machine.parse_caches(machine.format_caches(sizes)) == sizes


def test_cpu_model_and_minor_faults():
    assert isinstance(machine.cpu_model(), str) and machine.cpu_model()
    before = machine.minor_faults()
    buf = np.ones(4 * 2**20 // 8)  # 4 MiB of fresh memory, touched
    assert buf.sum() > 0
    assert machine.minor_faults() >= before


def test_timings_rounds_and_ratios_pair_samples_of_one_round():
    t = cost.Timings({"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]})
    assert t.rounds() == [{"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 2.0}, {"a": 4.0, "b": 2.0}]
    assert t.ratios("a", "b") == [0.5, 1.0, 2.0]
    assert t["a"] == 2.0 and t.fastest == {"a": 1.0, "b": 2.0}
    assert t.fastest_ratio("a", "b") == 0.5


def test_profiler_shares_gives_one_share_per_run():
    torch.manual_seed(0)
    step = cost.training_step(cnn((4, 8), norm=nn.BatchNorm2d), batch=8, seed=0)
    shares = cost.profiler_shares(step, steps=1, runs=3, warmup=1)
    assert len(shares) == 3 and all(0 < s < 1 for s in shares)


def test_ratio_quartiles_summarise_the_per_round_ratios():
    t = cost.Timings({"a": [2.0, 4.0, 6.0, 8.0, 10.0], "b": [2.0] * 5})
    assert t.ratio_quartiles("a", "b") == {
        "min": 1.0,
        "q1": 2.0,
        "median": 3.0,
        "q3": 4.0,
        "max": 5.0,
    }


def test_bandwidths_take_the_faster_writing_kernel():
    moved = {"read": 4e9, "copy": 8e9, "scale": 8e9}
    assert cost.bandwidths({"read": 0.5, "copy": 1.0, "scale": 2.0}, moved) == (8.0, 8.0)
    assert cost.bandwidths({"read": 1.0, "copy": 2.0, "scale": 0.5}, moved) == (4.0, 16.0)
    # with live kernels: the bandwidths are positive and the limit follows from them
    kernels, nbytes = cost.bandwidth_kernels(2**16, seed=0)
    read, rw = cost.bandwidths(cost.cpu_times(kernels, repeats=2).fastest, nbytes)
    assert read > 0 and rw > 0
    assert cost.bandwidth_limit(10**6, "fwd", read, rw) > 0


def test_small_cnn_classifies_mnist_sized_images_and_folds():
    from bnbook.fusion import fold_bn

    torch.manual_seed(0)
    net = cost.small_cnn(channels=(4, 8), hidden=16)
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net) == 3
    net.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics other than 0 and 1
            net(torch.randn(16, 1, 28, 28) * 2 + 1)
    net.eval()
    folded = fold_bn(net).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)


def test_machine_info_names_the_machine(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    info = machine.machine_info()
    assert info["cpu"] == machine.cpu_model()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine.parse_caches(info["caches"]) == machine.cache_sizes()
    assert info["torch"] == torch.__version__ and info["numpy"] == np.__version__
    assert info["THP_MEM_ALLOC_ENABLE"] == "1" and info["OPENBLAS_CORETYPE"] == "unset"
    assert all(isinstance(v, str) and v for v in info.values())


def test_stored_run_reads_values_machine_and_cases(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text(
        "section,case,impl,metric,value\n"
        "machine,,,cpu,Some CPU\n"
        "machine,,,cores,2\n"
        "bandwidth,0.5,numpy,read_GBps,40.5\n"
        "bandwidth,0.25,numpy,read_GBps,50\n"
        "bandwidth,0.5,numpy,copy_GBps,30\n"
    )
    run = machine.StoredRun(path)
    assert run.machine == {"cpu": "Some CPU", "cores": "2"}
    assert run.value("bandwidth", "0.5", "numpy", "read_GBps") == 40.5
    assert run.cases("bandwidth") == ["0.5", "0.25"]
    with pytest.raises(KeyError):
        run.value("bandwidth", "0.5", "numpy", "scale_GBps")
    assert machine.read_rows(path)[0] == {
        "section": "machine",
        "case": "",
        "impl": "",
        "metric": "cpu",
        "value": "Some CPU",
    }
