"""calibrate: the real sweep on the CPU with dummy:tiny, the stop rules and the choice, and calibration.yaml
(merging GPU kinds, locking, one-line errors)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.rules import FAST_MAX_SLOTS
from grail_pipeline.tools.calibration_file import load_calibrations, read_choice, save_entry
from grail_pipeline.tools.calibration_plot import BUDGET, CHOSEN, ON_TIME, PEAK, RATE, TOTAL, calibration_figure
from grail_pipeline.tools.calibration_sweep import (
    CPU_LENGTH_PROFILE,
    CPU_PROBLEMS,
    CPU_SIZES,
    MIN_GAIN,
    Row,
    choose,
    default_sizes,
    model_for_workers,
    problems_for,
    sweep,
)
from grail_pipeline.tools.measurement import BatchResult

FAST_CPU = ["--model", "dummy:tiny", "--device", "cpu", "--length-profile", "fixed:16", "--max-new-tokens", "16",
            "--warmup-problems", "0", "--num-problems", "1"]
OTHER_NODE = """\
# an H100 node's calibration, copied here by the operator
kind: grail-pipeline-calibration
format: 1
calibrations:
  NVIDIA H100 80GB HBM3:
    hf:
      model: dummy:qwen2.5-3b
      engine: hf
      attention: sdpa
      gpu: {name: NVIDIA H100 80GB HBM3, total_memory_gb: 85.0}
      workload: {max_new_tokens: 1024, max_prompt_tokens: 512, length_profile: "lognormal:400:0.5:32:1024"}
      chosen: {batch_size: 16}
"""


def calibrate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "calibrate", *argv)


def test_cpu_calibration_adds_to_the_file(tmp_path, capsys) -> None:
    path = tmp_path / "calibration.yaml"
    path.write_text(OTHER_NODE)
    rc, out, err = calibrate(capsys, *FAST_CPU, "--memory-gb", "64", "--calibration", str(path))  # CPU sizes
    assert rc == 0, err
    calibrations = load_calibrations(path)
    assert read_choice(calibrations, path, "NVIDIA H100 80GB HBM3", "hf").batch_size == 16  # kept
    entry = calibrations["cpu"]["hf"]
    rows = entry["rows"]
    assert [r["batch_size"] for r in rows] == list(CPU_SIZES["hf"]) == [4, 16]  # the CPU's default, smallest first
    assert all(r["status"] == "ok" and r["rollouts"] == 16 and r["rollouts_per_s"] > 0 for r in rows)
    assert all(0.1 < r["peak_gb"] < 64 and r["reason"] for r in rows)
    # the choice is the most rollouts on time per window (calibration_sweep.choose), which on a busy CPU is not
    # always the fastest size: the reason then names the faster one
    fastest = max(rows, key=lambda r: r["rollouts_per_s"])
    [chosen] = [r for r in rows if r["verdict"] == "chosen"]
    assert entry["chosen"]["batch_size"] == chosen["batch_size"] and chosen["reason"].startswith("most on time")
    assert (chosen is fastest) == (f"batch {fastest['batch_size']} is faster" not in chosen["reason"]), chosen
    assert all(r["reason"].startswith("fewer on time") for r in rows if r is not chosen), rows
    assert entry["memory"] == {"headroom_gb": 12.0, "budget_gb": 52.0, "peak": entry["memory"]["peak"]}
    assert "CPU" in entry["memory"]["peak"] and "not GPU memory" in entry["memory"]["peak"]
    assert entry["gpu"]["name"] == "cpu" and entry["gpu"]["total_memory_gb"] == 64.0
    assert entry["tool_version"] and entry["created"] and entry["model"] == "dummy:tiny" and entry["engine"] == "hf"
    assert entry["workload"]["length_profile"] == "fixed:16" and entry["workload"]["max_new_tokens"] == 16
    assert entry["workload"]["max_prompt_tokens"] == 512 and entry["workload"]["kv_cache_gb"] is None  # the default cache
    choice = read_choice(calibrations, path, "cpu", "hf")
    assert (choice.batch_size, choice.model, choice.attention) == (chosen["batch_size"], "dummy:tiny", "sdpa")
    assert "CHOSEN: batch size" in out and "rejected" in out and "high-water" in out
    assert "batch sizes 4, 16 at most" in " ".join(out.split())
    assert (tmp_path / "calibration.png").read_bytes().startswith(b"\x89PNG")  # beside the YAML
    check_picture(calibrations, "cpu", "hf")


def check_picture(calibrations: dict, gpu: str, engine: str) -> None:
    """calibration.png's panels hold the file's rows: rollouts/s, on-time per window and peak memory per measured
    batch size, the chosen size marked, the budget and total lines, and every size's verdict in the notes."""
    entry = calibrations[gpu][engine]
    figure = calibration_figure(calibrations)
    rate, on_time, peak, notes = figure.axes[:4]  # the first entry's row (the file's other entries have no rows)

    def line(axes, label):
        return next(line for line in axes.get_lines() if line.get_label() == label)

    rows = sorted(entry["rows"], key=lambda r: r["batch_size"])
    assert line(rate, RATE).get_xydata().tolist() == [[r["batch_size"], r["rollouts_per_s"]] for r in rows]
    assert line(peak, PEAK).get_xydata().tolist() == [[r["batch_size"], r["peak_gb"]] for r in rows]
    assert line(on_time, ON_TIME).get_xdata().tolist() == [r["batch_size"] for r in rows]
    assert all(line(axes, CHOSEN).get_xdata().tolist() == [entry["chosen"]["batch_size"]] for axes in (rate, peak,
                                                                                                     on_time))
    assert list(line(peak, BUDGET).get_ydata()) == [entry["memory"]["budget_gb"]] * 2
    assert list(line(peak, TOTAL).get_ydata()) == [entry["gpu"]["total_memory_gb"]] * 2
    text = notes.texts[0].get_text()
    assert all(f"batch {r['batch_size']}: {r['verdict']} – {r['reason']}" in text for r in rows)


def test_nothing_fits_leaves_the_file_alone(tmp_path, capsys) -> None:
    path = tmp_path / "calibration.yaml"
    path.write_text(OTHER_NODE)
    rc, out, _ = calibrate(capsys, *FAST_CPU, "--batch-sizes", "16", "--memory-gb", "0.5", "--headroom-gb", "0.25",
                           "--calibration", str(path))
    assert rc == 1
    assert "peak" in out and "> budget 0.25 GB" in out and "left unchanged" in out
    assert path.read_text() == OTHER_NODE


@pytest.mark.parametrize(("flags", "message"), [
    ([], "give --memory-gb"),
    (["--memory-gb", "8", "--headroom-gb", "8"], "leaves nothing"),
    (["--memory-gb", "64", "--batch-sizes", "4,x"], "positive whole numbers"),
    (["--memory-gb", "lots"], "not a number"),
    (["--memory-gb", "64", "--headroom-gb", "-1"], "cannot be negative"),
    (["--memory-gb", "64", "--engine", "fast", "--batch-sizes", "8"], "at least 16"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, message) -> None:
    rc, out, err = calibrate(capsys, *FAST_CPU, *flags, "--calibration", str(tmp_path / "c.yaml"))
    assert rc == 2 and err.startswith("grail-pipeline calibrate: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.parametrize(("flags", "message"), [
    ([], "give --memory-gb, the memory to budget from, with a --headroom-gb below it (e.g. --memory-gb 16"),
    (["--memory-gb", "8"], "--headroom-gb 12 leaves nothing of --memory-gb 8: give a smaller --headroom-gb (e.g. "
                           "--headroom-gb 2)"),
])
def test_the_budget_is_checked_before_torch_loads(tmp_path, flags, message) -> None:
    """On the CPU a missing --memory-gb, or a headroom larger than it, is said before torch's imports."""
    code = ("import sys\nfrom grail_pipeline.cli.main import main\n"
            f"rc = main({['calibrate', *FAST_CPU, *flags, '--calibration', str(tmp_path / 'c.yaml')]!r})\n"
            "print('torch' in sys.modules, rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["False", "2"], run.stderr
    assert message in run.stderr


def test_corrupt_calibration_file_is_refused_before_the_sweep(tmp_path, capsys) -> None:
    path = tmp_path / "calibration.yaml"
    path.write_text("calibrations: [not, a, mapping")
    rc, out, err = calibrate(capsys, *FAST_CPU, "--memory-gb", "8", "--headroom-gb", "2", "--calibration", str(path))
    assert rc == 2 and "not valid YAML" in err and out == ""


# --- the sweep's rules, fed measurements as a GPU would give them (no GPU here) ---------------------------------


def measurements(table: dict[int, tuple[str, float, float]]):
    """A stand-in for measuring on a GPU: batch size -> (status, rollouts/s, peak GB)."""
    asked: list[int] = []

    def measure(size: int) -> Row:
        asked.append(size)
        status, rate, peak = table[size]
        result = BatchResult(batch_size=size, status=status)
        if status == "ok":
            result.rollouts, result.seconds = 1000, 1000 / rate
        return Row(result, peak if status == "ok" else None)

    return measure, asked


def test_doubling_stops_at_oom() -> None:
    measure, asked = measurements({16: ("ok", 20, 30), 32: ("ok", 38, 40), 64: ("ok", 60, 50), 128: ("OOM", 0, 0),
                                   256: ("ok", 99, 60)})
    rows = sweep(measure, default_sizes("fast"), budget_gb=68, grow=True)
    assert asked == [16, 32, 64, 128]  # nothing after the OOM
    assert choose(rows, 68).batch_size == 64
    reasons = {r.batch_size: r.reason for r in rows}
    assert reasons[128].startswith("OOM") and reasons[64].startswith("most on time: ~")
    assert "peak 50.00 GB" in reasons[64] and "faster" not in reasons[64]
    assert reasons[16].startswith("fewer on time: ~") and reasons[16].endswith("at batch 64 (20.00 rollouts/s)")


def test_the_choice_is_the_most_on_time_not_the_fastest() -> None:
    """On 60-s windows, 1,024 slots at 30 rollouts/s spend 36 s draining what is in flight at the cut; 128 slots
    at 25 rollouts/s drain in 7.7 s and put more rollouts into the file on time: the choice, and it says why."""
    from grail_pipeline.tools.projection import WindowSpec, on_time

    spec = WindowSpec(blocks=10, block_time_s=6)
    measure, _ = measurements({128: ("ok", 25, 20), 1024: ("ok", 30, 40)})
    rows = [measure(128), measure(1024)]
    assert on_time(spec, rows[0].result) > on_time(spec, rows[1].result)
    best = choose(rows, 68, spec)
    assert best.batch_size == 128
    assert "batch 1024 is faster, 30.00 rollouts/s, but drains more at the cut" in best.reason
    assert rows[1].reason.startswith("fewer on time")


def test_doubling_stops_over_budget_and_chooses_the_best_that_fits() -> None:
    measure, asked = measurements({1: ("ok", 1, 10), 2: ("ok", 2, 11), 4: ("ok", 3, 90), 8: ("ok", 9, 9)})
    rows = sweep(measure, default_sizes("hf"), budget_gb=68, grow=True)
    assert asked == [1, 2, 4]  # batch 4 already exceeds the budget: larger ones would too
    assert choose(rows, 68).batch_size == 2  # 4 is faster, but does not fit
    assert rows[2].reason == "peak 90.00 GB > budget 68.00 GB"


def test_doubling_stops_when_gains_stop() -> None:
    flat = 1 + MIN_GAIN / 2
    measure, asked = measurements({1: ("ok", 1, 10), 2: ("ok", 2, 10), 4: ("ok", 2 * flat, 10), 8: ("ok", 9, 10)})
    rows = sweep(measure, default_sizes("hf"), budget_gb=68, grow=True)
    assert asked == [1, 2, 4]
    assert choose(rows, 68).batch_size == 4  # still the fastest measured


def test_a_listed_sweep_measures_every_size_until_memory_runs_out() -> None:
    measure, asked = measurements({1: ("ok", 5, 10), 2: ("ok", 4, 10), 4: ("ok", 3, 10), 8: ("OOM", 0, 0),
                                   16: ("ok", 1, 1)})
    rows = sweep(measure, [1, 2, 4, 8, 16], budget_gb=68, grow=False)
    assert asked == [1, 2, 4, 8]  # slower sizes are still measured; the OOM ends it
    assert choose(rows, 68).batch_size == 1


def test_nothing_fits() -> None:
    measure, _ = measurements({1: ("ok", 5, 80), 2: ("OOM", 0, 0)})
    rows = sweep(measure, [1, 2], budget_gb=68, grow=False)
    assert choose(rows, 68) is None and all(r.verdict == "rejected" and r.reason for r in rows)


def test_sizes_and_work() -> None:
    assert list(default_sizes("hf")) == [1, 2, 4, 8, 16]
    fast = list(default_sizes("fast"))
    assert fast[0] == 16 and fast[-1] == FAST_MAX_SLOTS and all(b == 2 * a for a, b in zip(fast, fast[1:]))
    assert [problems_for(b, None) for b in (1, 16, 256)] == [2, 2, 32]  # two fills of the batch
    assert problems_for(256, 3) == 3
    # on the CPU (issue #15: the GPU defaults ran past 14 minutes on 2 cores): two sizes, one problem each,
    # short completions for dummy models
    assert [list(default_sizes(e, on_gpu=False)) for e in ("hf", "fast")] == [[4, 16], [16, 32]]
    assert problems_for(16, None, on_gpu=False) == CPU_PROBLEMS == 1 and problems_for(16, 3, on_gpu=False) == 3
    assert CPU_LENGTH_PROFILE == "fixed:32"


# --- calibration.yaml ------------------------------------------------------------------------------------------


def test_entries_of_other_gpu_kinds_and_engines_are_kept(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    base = dict(model="m", attention="sdpa", workload=dict(max_new_tokens=8, max_prompt_tokens=64,
                                                             length_profile="fixed:8"))
    save_entry(path, dict(base, gpu=dict(name="A"), engine="hf", chosen=dict(batch_size=4)))
    save_entry(path, dict(base, gpu=dict(name="A"), engine="fast", chosen=dict(batch_size=256)))
    save_entry(path, dict(base, gpu=dict(name="B"), engine="hf", chosen=dict(batch_size=8)))
    save_entry(path, dict(base, gpu=dict(name="A"), engine="hf", chosen=dict(batch_size=2)))  # recalibrated
    calibrations = load_calibrations(path)
    assert {(g, e): read_choice(calibrations, path, g, e).batch_size for g in ("A", "B")
            for e in calibrations[g]} == {("A", "hf"): 2, ("A", "fast"): 256, ("B", "hf"): 8}
    assert yaml.safe_load(path.read_text())["kind"] == "grail-pipeline-calibration"


def test_concurrent_writers_lose_nothing(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    kinds = [f"GPU {i}" for i in range(12)]
    threads = [threading.Thread(target=save_entry, args=(path, dict(gpu=dict(name=k), engine="hf")))
               for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(load_calibrations(path)) == sorted(kinds)
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no temporary, and the lock file is removed


def test_a_file_that_is_not_ours_is_not_overwritten(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("someone: else's file\n")
    with pytest.raises(UserError, match="not a grail-pipeline calibration file"):
        save_entry(path, dict(gpu=dict(name="A"), engine="hf"))
    assert path.read_text() == "someone: else's file\n"


def test_read_errors_name_the_file_and_field(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    save_entry(path, dict(gpu=dict(name="A"), engine="hf", model="m", attention="sdpa",
                          workload=dict(max_new_tokens="many", max_prompt_tokens=64, length_profile="fixed:8"), chosen=dict(batch_size=4)))
    calibrations = load_calibrations(path)
    with pytest.raises(UserError, match=r"c.yaml: A / hf: workload.max_new_tokens must be a whole number"):
        read_choice(calibrations, Path(path), "A", "hf")


def test_a_local_model_is_recorded_absolute(tmp_path, monkeypatch) -> None:
    """PM2 workers run in --cwd, not where calibrate ran."""
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_for_workers("ckpt") == str(tmp_path / "ckpt")
    assert model_for_workers("dummy:tiny") == "dummy:tiny"
