"""noprop bench / profile, bench/plots.py, bench/accuracy_vs_time.py, bench/gpu_check.sh (CPU, small)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noprop import bench
from noprop.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import accuracy_vs_time  # noqa: E402
import plots  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, csv_path = out / "quick.json", out / "quick.csv"
    rc = main(["bench", "--quick", "--json", str(json_path), "--csv", str(csv_path)])
    return rc, json.loads(json_path.read_text()), csv_path


def test_quick_bench_writes_well_formed_records(quick):
    rc, records, csv_path = quick
    assert rc == 0
    by = {(r["method"], r["mode"]): r for r in records}
    assert set(by) == {("dt", m) for m in bench.DT_MODES} | {("backprop", "end-to-end"), ("cnn", "end-to-end")}
    for r in records:
        for key in ("method", "mode", "device", "batch", "samples_per_s", "ms_per_step", "peak_mem_mb", "ratio_to_backprop", "torch", "commit", "timestamp", "execution",
                                          "threads", "saved_mb", "ms_min", "ms_max"):
            assert key in r, key
        assert r["device"] == "cpu" and r["batch"] == 16 and r["T"] == 3
        assert r["samples_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_mem_mb"] > 0
        assert r["samples_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_step"], rel=1e-3)
        assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        assert "error" not in r
    assert by[("backprop", "end-to-end")]["ratio_to_backprop"] == pytest.approx(1.0)
    parallel = by[("dt", "parallel")]  # auto on the CPU: block threads when there are threads to share out
    assert parallel["execution_used"] == ("threads" if parallel["threads"] > 1 else "loop")
    assert not by[("cnn", "end-to-end")]["equal_work"]
    assert by[("dt", "sequential")]["ms_per_block_update"] == pytest.approx(
        by[("dt", "sequential")]["ms_per_step"] / 3, rel=1e-3)
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",")[:3] == ["method", "mode", "execution"] and len(lines) == 1 + len(records)


def test_a_run_cut_short_leaves_the_cases_measured_so_far(tmp_path, monkeypatch, capsys):
    # A time limit (gpu_check's timeout) or Ctrl-C in the middle of a bench must not lose its results.
    calls = []

    def fake_measure(case, opts, saved=True):
        calls.append(case.label)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed while measuring its third case
        ms = 10.0 * len(calls)
        return {"ms_per_step": ms, "peak_mem_mb": 100.0, "peak_mem_kind": "fake", "rss_base_mb": 50.0,
                "execution_used": "loop", "saved_mb": 1.0}

    monkeypatch.setattr(bench.cli, "measure", fake_measure)
    json_path = tmp_path / "b.json"
    rc = main(["bench", "--quick", "--no-isolate", "--methods", "dt,backprop", "--modes", "parallel,lean",
               "--json", str(json_path)])
    assert rc == 130 and "cases measured so far" in capsys.readouterr().err
    records = json.loads(json_path.read_text())
    assert [r["label"] for r in records] == calls[:2]
    assert all(r["ms_per_step"] == 10.0 * (i + 1) for i, r in enumerate(records))
    assert not list(tmp_path.glob("*.tmp"))  # written through a rename, nothing half-written left


def test_saved_bytes_order_lean_chunked_parallel(quick):
    _, records, _ = quick
    saved = {r["mode"]: r["saved_mb"] for r in records if r["method"] == "dt"}
    # T = 3, chunk 2: one block's activations, two, three
    assert 0 < saved["lean"] < saved["chunked"] < saved["parallel"]
    assert saved["sequential"] == pytest.approx(saved["lean"], rel=0.05)


def test_saved_tensor_meter_counts_storages_once_and_frees():
    w = torch.nn.Parameter(torch.randn(64, 64))
    meter = bench.SavedTensorMeter([w])
    x = torch.randn(32, 64, requires_grad=True)
    with meter.hooks():
        y = (x * x).sum() + (x @ w).sum()  # x saved three times, w excluded
    assert meter.peak == 32 * 64 * 4
    y.backward()
    del y
    assert meter.current == 0


def test_plots_write_pngs(quick, tmp_path):
    _, records, _ = quick
    src = tmp_path / "small.json"
    src.write_text(json.dumps(records))
    pngs = plots.plot_file(src, tmp_path / "png")
    assert [p.name for p in pngs] == ["small_throughput.png", "small_memory.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_skip_a_file_without_results_and_plot_the_rest(quick, tmp_path, capsys):
    _, records, _ = quick
    failed, good = tmp_path / "failed.json", tmp_path / "good.json"
    failed.write_text(json.dumps([{**records[0], "error": "boom", "ms_per_step": None, "samples_per_s": None}]))
    good.write_text(json.dumps(records))
    assert plots.main([str(failed), str(good), "--out", str(tmp_path / "png")]) == 1
    assert "failed.json: skipped" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["good_memory.png", "good_throughput.png"]


def test_profile_writes_trace_and_prints_table(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--steps", "1", "--warmup", "0", "-T", "2", "--batch", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for stage in ("noprop.noise", "noprop.block_forward", "noprop.local_loss", "noprop.backward", "noprop.optimizer"):
        assert stage in names and stage in text
    assert "Self CPU" in text and "CPU Mem" in text  # key_averages table with memory columns


def test_profile_takes_trains_all_blocks_mode_as_parallel(tmp_path, capsys):
    assert main(["profile", "--mode", "all-blocks", "--steps", "1", "--warmup", "0", "-T", "2", "--batch-size", "8",
                 "--out", str(tmp_path / "prof")]) == 0
    assert "noprop profile: dt parallel |" in capsys.readouterr().out


def test_profile_sees_the_block_threads(tmp_path, capsys, torch_threads):
    """torch's profiler is per thread: the threaded execution's work is only in the trace because
    `noprop profile` turns on Kineto's all-threads mode (and then still marks the stages)."""
    out = tmp_path / "prof"
    assert main(["profile", "--steps", "1", "--warmup", "0", "-T", "2", "--batch", "8", "--threads", "2",
                 "--execution", "threads", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    threads_with_forward = {e.get("tid") for e in events if e.get("name") == "noprop.block_forward"}
    assert len(threads_with_forward) == 2  # one per group of blocks, each on its own thread
    assert "noprop.backward" in text and "noprop.optimizer" in text


def test_execution_list_is_checked_against_device_and_threads():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.cli._executions("loop,threads", cpu, 2) == ["loop", "threads"]
    assert bench.cli._executions("all", cpu, 2) == ["loop", "vmap", "threads", "bank"]
    assert bench.cli._executions("all", cpu, 1) == ["loop", "vmap", "bank"]  # one thread: threads would be loop
    assert bench.cli._executions("both,loop", cuda, 8) == ["loop", "vmap"]
    with pytest.raises(ValueError, match="needs --threads >= 2"):
        bench.cli._executions("threads", cpu, 1)
    with pytest.raises(ValueError, match="CPU threads"):
        bench.cli._executions("threads", cuda, 8)
    with pytest.raises(ValueError, match="unknown execution 'fast'"):
        bench.cli._executions("loop,fast", cpu, 2)


def test_execution_verdict_names_the_fastest_of_three():
    recs = [{"method": "dt", "mode": "parallel", "execution": ex, "ms_per_step": ms, "device": "cpu"}
            for ex, ms in (("loop", 10.0), ("vmap", 20.0), ("threads", 8.0))]
    assert bench.execution_verdict(recs) == [
        "parallel: threads wins on cpu (1.25x faster than loop; threads 8.0 ms, loop 10.0 ms, vmap 20.0 ms)"]


def test_accuracy_vs_time_plots_two_runs(tmp_path, capsys):
    runs = []
    for method, accs in (("dt", [0.5, 0.9, 0.97]), ("backprop", [0.3, 0.6, 0.8])):
        p = tmp_path / f"{method}.jsonl"
        p.write_text("\n".join(json.dumps({"epoch": i + 1, "test_acc": a, "elapsed_s": 10.0 * (i + 1),
                                           "method": method, "mode": "parallel"})
                               for i, a in enumerate(accs)) + "\n")
        runs.append(str(p))
    out = tmp_path / "acc.png"
    assert accuracy_vs_time.main([*runs, "--out", str(out), "--chance", "0.1"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "acc.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("NoProp-DT parallel")
    assert "20" in capsys.readouterr().out  # dt reached 0.9 after 20 s
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1}\n')
    assert accuracy_vs_time.main([str(bad), "--out", str(tmp_path / "x.png")]) == 2


def test_gpu_check_without_gpu_skips_gpu_steps_and_honours_the_budget(tmp_path):
    env = dict(os.environ, GPU_CHECK_BUDGET="12", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    steps = dict(line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines()[1:])
    assert steps["build-cuda-ext"] == "skipped" and steps["tests-gpu"] == "skipped"
    # Steps run until the budget is spent (how many depends on the machine's speed), none fails,
    # and what did not fit is cut (TIMEOUT) or not started (SKIPPED): 12 s cannot hold the benchmarks.
    assert "ok" in steps.values() and not any(v.startswith("FAILED") for v in steps.values()), steps
    assert "SKIPPED" in steps.values() or "TIMEOUT" in steps.values()
    took = int(re.search(r"done in (\d+)s", proc.stdout).group(1))
    assert took <= 12 + 25 + 15  # budget + the plots/summary reserve + a step's kill grace
    assert proc.returncode == 1


def test_gpu_check_runs_only_the_named_steps_and_refuses_a_misspelt_one(tmp_path):
    script = str(ROOT / "bench" / "gpu_check.sh")
    env = dict(os.environ, GPU_CHECK_ONLY="bench-compil", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", script, "--dry-run", str(tmp_path / "a")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2 and "names no step 'bench-compil'" in proc.stderr
    env["GPU_CHECK_ONLY"] = "bench-ops"
    proc = subprocess.run(["bash", script, "--dry-run", str(tmp_path / "b")], capture_output=True, text=True,
                          env=env, timeout=120)
    steps = dict(line.split("\t")[:2] for line in (tmp_path / "b" / "steps.tsv").read_text().splitlines()[1:])
    assert steps["bench-ops"] == "ok" and steps["profile"] == "skipped" and steps["bench-b128"] == "skipped"


def test_modes_accept_trains_all_blocks_name_for_parallel(capsys):
    from noprop.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--modes", "all-blocks,lean,parallel"])
    _, _, modes, _ = bench.options(args)
    assert modes == ["parallel", "lean"]  # one name for one update, measured once
    assert main(["bench", "--quick", "--modes", "everything"]) == 2
    assert "all-blocks = parallel" in capsys.readouterr().err


def test_flop_per_step_counts_the_dt_blocks_arithmetic():
    """The step's matmul and convolution operations against the DT block's layer shapes worked out by
    hand: per sample and block, forward 2·(multiply-adds); backward twice that, less the first
    convolution's input gradient (images need none). ~549 MFLOP per sample for 10 blocks on MNIST."""
    from noprop.bench.measure import flop_per_step

    B, T = 3, 2
    case = bench.Case("dt", "parallel", "loop")
    model, cfg, step = bench.step_factory(case, "mnist5k", B, T, 2, torch.device("cpu"))
    convs = [(26 * 26, 32, 1 * 9), (11 * 11, 64, 32 * 9), (9 * 9, 128, 64 * 9)]  # (pixels out, O, C*k*k)
    linears = [(2048, 256), (10, 256), (256, 256), (256, 256), (512, 256), (256, 128), (128, 10)]
    fwd = sum(2 * p * o * k for p, o, k in convs) + sum(2 * i * o for i, o in linears)
    first_conv_input_grad = 2 * 26 * 26 * 32 * 9
    first_label_input_grad = 2 * 10 * 256  # z needs no gradient either
    per_block_sample = 3 * fwd - first_conv_input_grad - first_label_input_grad
    expected = B * T * per_block_sample
    got = flop_per_step(step)
    assert abs(got - expected) / expected < 0.005, (got, expected)
    assert 548e6 < 10 * per_block_sample < 550e6


@pytest.mark.parametrize("execution,conv", [("vmap", None), ("bank", "grouped"), ("bank", "gemm")])
def test_flop_per_step_is_the_same_arithmetic_however_the_blocks_run(monkeypatch, execution, conv):
    """vmap and the bank's grouped layers run grouped convolutions, whose backward torch's own formula
    counts `groups` times over: the step's count must stay the per-block one."""
    from noprop.bench.measure import flop_per_step

    def count(ex):
        _, _, step = bench.step_factory(bench.Case("dt", "parallel", ex), "mnist5k", 2, 3, 2, torch.device("cpu"))
        return flop_per_step(step)

    if conv:
        monkeypatch.setenv("NOPROP_BANK_CONV", conv)
    assert count(execution) == count("loop")


def test_tflops_and_share_of_peak_borrow_the_eager_count():
    recs = [{"label": "dt parallel", "method": "dt", "mode": "parallel", "ms_per_step": 10.0, "flop_per_step": 2e12,
             "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
            {"label": "dt parallel+graph", "method": "dt", "mode": "parallel", "ms_per_step": 5.0,
             "flop_per_step": None, "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
            {"label": "backprop", "method": "backprop", "mode": "end-to-end", "ms_per_step": 5.0, "device": "cpu",
             "device_name": "AMD EPYC", "flop_per_step": 1e9}]
    bench.add_flops(recs)
    assert recs[0]["tflops"] == pytest.approx(200.0) and recs[1]["tflops"] == pytest.approx(400.0)
    assert recs[1]["pct_of_bf16_peak"] == pytest.approx(100 * 400 / 989.4)
    assert recs[2]["tflops"] == pytest.approx(0.2) and recs[2]["pct_of_bf16_peak"] is None


def test_profile_splits_the_step_s_time_by_kind(tmp_path, capsys):
    from noprop.profile import KINDS

    def kind(name):
        return next(k for k, test in KINDS if test(name))

    assert kind("aten::cudnn_convolution") == kind("aten::convolution_backward") == kind("aten::im2col") == "convolutions"
    assert kind("aten::addmm") == kind("aten::baddbmm") == "matmuls (Linear, bmm)"
    assert kind("noprop::local_loss") == "NoProp fused ops"
    assert kind("aten::_fused_adamw_") == kind("aten::_foreach_mul_") == kind("Optimizer.step#AdamW.step") == "optimizer"
    assert kind("aten::native_batch_norm").startswith("other aten") and kind("aten::copy_") == "copies and stacking"
    assert kind("autograd::engine::evaluate_function: ReluBackward0").startswith("autograd")
    out = tmp_path / "prof"
    assert main(["profile", "--steps", "1", "--warmup", "0", "-T", "2", "--batch", "8", "--threads", "1",
                 "--out", str(out)]) == 0
    text = (out / "table.txt").read_text()
    rows = text.split("time by kind (CPU self time)")[1].split("\n\n")[0].strip().splitlines()[1:]  # under ms/share
    shares = {line[:48].strip(): float(line.split()[-1].rstrip("%")) for line in rows}
    assert shares["convolutions"] > 0 and shares["NoProp fused ops"] > 0 and shares["optimizer"] > 0
    assert "time by kind" in capsys.readouterr().out


def test_time_by_kind_sums_operator_self_time_once():
    """Self times only, and on a GPU the operators' device time, not the kernel rows beside them
    (which repeat that time) nor the operators' CPU time."""
    from types import SimpleNamespace as Ev

    from noprop.profile import time_by_kind

    events = [Ev(key="aten::cudnn_convolution", device_type="DeviceType.CPU", self_cpu_time_total=50.0,
                 self_device_time_total=3000.0),
              Ev(key="void cudnn::conv_kernel", device_type="DeviceType.CUDA", self_cpu_time_total=0.0,
                 self_device_time_total=3000.0),
              Ev(key="aten::conv2d", device_type="DeviceType.CPU", self_cpu_time_total=20.0, self_device_time_total=0.0),
              Ev(key="aten::_fused_adamw_", device_type="DeviceType.CPU", self_cpu_time_total=10.0,
                 self_device_time_total=1000.0)]
    rows = time_by_kind(events, torch.device("cuda"))
    assert [(k, ms) for k, ms, _ in rows] == [("convolutions", 3.0), ("optimizer", 1.0)]
    assert [share for *_, share in rows] == [0.75, 0.25]
    cpu = {k: ms for k, ms, _ in time_by_kind(events, torch.device("cpu"))}
    assert cpu == {"convolutions": 0.07, "optimizer": 0.01}
