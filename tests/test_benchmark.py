"""`grail-pipeline benchmark` end to end on the CPU with `dummy:tiny`: tables, JSON, projections, bad input, OOM.

The end-to-end runs are subprocesses of the real command with a real (unencrypted) wallet, so what
is checked is what a user sees on stdout and stderr. Bad input runs in-process (each must fail
before the wallet or the model is touched, so nothing slow runs); one case also runs as a process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from grail_pipeline.cli import main as cli
from grail_pipeline.inference.checkpoints import dummy_checkpoint
from grail_pipeline.inference.engine import Engine, GroupResult, RequestFeed
from grail_pipeline.mining import runtime as runtime_module
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.workload import benchmark_window
from grail_pipeline.tools.measurement import measure_batch_size

HEADERS = ("Batch", "Problems", "Rollouts", "Time (s)", "Roll/s", "Tok/s", "GPU (GB)", "Success %", "Verified %")
TINY = ["--model", "dummy:tiny", "--device", "cpu"]
W1_SMALL = ["--length-profile", "fixed:20", "--max-new-tokens", "24"]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAIL_", "BT_WALLET_"))}
    if "GRAIL_PIPELINE_CACHE" in os.environ:
        env["GRAIL_PIPELINE_CACHE"] = os.environ["GRAIL_PIPELINE_CACHE"]  # the built tokenizer
    return {**env, **(extra or {})}


def run_benchmark(args: list[str], env: dict[str, str]) -> Run:
    proc = subprocess.run([sys.executable, "-m", "grail_pipeline", "benchmark", *args], capture_output=True,
                          text=True, env=env, timeout=300)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def table_rows(text: str, title: str) -> list[list[str]]:
    """The body rows of the table under `title` (tools/tables.py: no frame, `│` between columns, `┼` under the
    header), as lists of cell texts."""
    lines = text[text.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if "┼" in line)
    rows = []
    for line in lines[start + 1:]:
        if "│" not in line:
            break
        rows.append([cell.strip() for cell in line.split("│")])
    return rows


def table_header(text: str, title: str) -> list[str]:
    """The column names of the table under `title`, their lines joined with a space ("Time (s)")."""
    lines = text[text.index(title):].splitlines()
    end = next(i for i, line in enumerate(lines) if "┼" in line)
    parts = [[cell.strip() for cell in line.split("│")] for line in lines[1:end]]
    return [" ".join(p for p in column if p) for column in zip(*parts, strict=True)]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, wallet_env) -> tuple[Run, dict]:
    path = tmp_path_factory.mktemp("bench") / "out" / "fast.json"
    run = run_benchmark([*TINY, "--engine", "fast", "--batch-sizes", "16", *W1_SMALL, "--num-problems", "2",
                         "--warmup-problems", "1", "--verify", "4", "--workers", "4", "--json", str(path)],
                        clean_env(wallet_env))
    assert run.returncode == 0, run.stderr
    return run, json.loads(path.read_text())


@pytest.fixture(scope="module")
def hf_run(wallet_env) -> tuple[Run, dict]:
    """The reference engine, JSON on stdout, a 50-block window. One problem, no warm-up: hf is slow on the CPU."""
    run = run_benchmark([*TINY, "--engine", "hf", "--batch-sizes", "16", *W1_SMALL, "--num-problems", "1",
                         "--warmup-problems", "0", "--verify", "4", "--json", "-", "--window-blocks", "50",
                         "--block-time", "12"], clean_env(wallet_env))
    assert run.returncode == 0, run.stderr
    return run, json.loads(run.stdout)  # stdout holds the JSON and nothing else


@pytest.mark.slow
def test_fast_engine_tables(fast_run, real_wallet) -> None:
    run, _ = fast_run
    out = run.stdout
    assert run.stderr == ""  # a configured wallet: no warning, no progress bar leftovers
    assert "Traceback" not in out
    assert f"hotkey {real_wallet['address']}" in out and "ephemeral" not in out
    assert "│ Window      │ 30 blocks × 12 s = 360 s" in out
    assert table_header(out, "BENCHMARK RESULTS") == list(HEADERS)
    # not a terminal: progress lines say where the run was, the batch's ending at its total, then the labelled check
    lines = out.splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("batch 16: rollouts: 32/32") and "(done)" in line)
    check = next(i for i, line in enumerate(lines) if line.startswith(
        "batch 16: re-verifying 4 rollouts with the validator's method (a process of its own)"))
    assert done < check and lines[0].startswith("GRAIL THROUGHPUT BENCHMARK")
    (row,) = table_rows(out, "BENCHMARK RESULTS")
    assert row[:3] == ["16", "2", "32"] and row[8] == "100.0 (n=4)"
    assert float(row[4]) > 0 and row[6] == "-"  # no GPU memory on the CPU

    projection = out[out.index("PROJECTED 4-WORKER THROUGHPUT"):]
    assert "30 blocks × 12 s = 360 s" in projection
    assert "cap 5120 rollouts/window = 14.2 rollouts/s" in projection
    assert "Score factor" in projection
    (proj,) = table_rows(out, "PROJECTED 4-WORKER THROUGHPUT")
    # the projection is printed to 0.1 (±0.05) and the row to 0.01 (±0.005, times 4 workers)
    assert proj[0] == "16" and float(proj[1]) == pytest.approx(4 * float(row[4]), abs=0.05 + 4 * 0.005 + 1e-9)
    best = [line for line in out.splitlines() if line.startswith("BEST:")]
    assert len(best) == 1 and best[0].startswith(f"BEST: batch_size=16 -> {row[4]} rollouts/s; with 4 workers: ~")


@pytest.mark.slow
def test_fast_engine_json(fast_run, real_wallet) -> None:
    _, report = fast_run
    assert report["kind"] == "grail-pipeline-benchmark"
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"]
    assert env["commit"] is None or isinstance(env["commit"], str)
    assert env["gpus"] == [] and env["cuda"] == torch.version.cuda
    cfg = report["config"]
    assert cfg == {**cfg, "model": "dummy:tiny", "model_name": "dummy:tiny", "engine": "fast", "device": "cpu",
                   "dtype": "float32", "attention": "sdpa", "batch_sizes": [16], "num_problems": 2,
                   "rollouts_per_problem": 16, "warmup_problems": 1, "workers": 4, "max_new_tokens": 24,
                   "length_profile": "fixed:20", "window": "30 blocks × 12 s = 360 s", "verify": 4}
    assert report["signing"] == {"ephemeral": False, "hotkey": real_wallet["address"]}

    (result,) = report["results"]
    assert result["status"] == "ok" and result["batch_size"] == 16
    assert result["problems"] == 2 and result["rollouts"] == 2 * 16 and result["dropped_groups"] == 0
    assert result["completion_tokens"] == 32 * 20  # fixed:20, EOS included
    assert result["rollouts_per_s"] == pytest.approx(result["rollouts"] / result["seconds"])
    assert result["tokens_per_s"] == pytest.approx(result["completion_tokens"] / result["seconds"])
    assert result["engine"]["generated_tokens"] == 32 * 20 and 0 < result["engine"]["batch_occupancy"] <= 1
    verify = result["verify"]
    assert verify["rollouts_checked"] == 4 and verify["rollouts_passed"] == verify["rollouts_checked"]
    assert verify["positions_passed"] == verify["positions_checked"] > 0
    assert verify["logprobs_passed"] == verify["logprobs_checked"] == 4 * 20
    assert verify["model_path"] == str(dummy_checkpoint("tiny"))  # checked on a model of its own, loaded from there

    (projection,) = report["projection"]
    rate = result["rollouts_per_s"]
    assert projection["workers"] == 4 and projection["rollouts_per_s"] == pytest.approx(4 * rate)
    assert projection["generated_per_window"] == pytest.approx(4 * rate * 360)
    # on time: 4 s of deadline slack, four workers' slots and queues (16 + 4 x 16 rollouts each) drained at 4x
    # the rate, and the file's upload (40 KB a rollout at 100 Mbit/s) all come off the window
    drain = 4 * (16 + 64) / (4 * rate)
    on_time = 4 * rate * (360 - 4 - drain) / (1 + 4 * rate * 40_000 * 8 / 100e6)
    assert projection["on_time_per_window"] == pytest.approx(on_time)
    assert projection["score_factor"] == pytest.approx(min(1.0, on_time / 5120) ** 4)
    assert projection["hotkeys_at_cap"] == int(on_time // 5120)
    assert report["best"] == {"batch_size": 16, "rollouts_per_s": rate}


@pytest.mark.slow
def test_a_small_kv_cache_preempts_and_every_proof_still_verifies(tmp_path, wallet_env) -> None:
    """--kv-cache-gb at the least one group needs at its longest (113 pages, against 337 for 48 slots): three groups'
    prompts fit (each ~4 pages shared by its 16 rollouts and 1 of each one's own), their 100-token completions do
    not, so groups are preempted and run again; every rollout is delivered and the re-verified proofs (a process
    of its own, from the checkpoint) all pass. With the shared-prompt attention's group tables kept through the
    preemptions (on the CPU the attention itself is the reference's)."""
    path = tmp_path / "kv.json"
    page = 32768  # dummy:tiny in float32: 2 (K, V) x 2 layers x 64 positions x 2 KV heads x head dim 16 x 4 bytes
    run = run_benchmark([*TINY, "--engine", "fast", "--batch-sizes", "48", "--length-profile", "fixed:100",
                         "--max-new-tokens", "128", "--max-prompt-tokens", "320", "--kv-cache-gb", f"{113 * page / 1e9}",
                         "--num-problems", "6", "--warmup-problems", "0", "--verify", "8", "--json", str(path),
                         "--shared-prompt-attention"],
                        clean_env(wallet_env))
    assert run.returncode == 0, run.stderr
    report = json.loads(path.read_text())
    assert report["config"]["kv_cache_gb"] == pytest.approx(113 * page / 1e9)
    assert report["config"]["shared_prompt_attention"] is True
    assert re.search(r"batch 48: \d+ group\(s\) preempted for want of KV pages and run again", run.stdout), run.stdout
    (result,) = report["results"]
    assert result["status"] == "ok" and result["rollouts"] == 96 and result["dropped_groups"] == 0
    engine = result["engine"]
    assert engine["preemptions"] > 0 and engine["preempted_tokens"] > 0 and engine["generated_tokens"] == 96 * 100
    assert 0 < engine["peak_kv_pages"] <= 112
    kv = next(c for c in result["memory"]["components"] if c["name"] == "kv_cache")
    assert kv["bytes"] == 113 * page and "113 pages of 64 positions for 48 slots" in kv["what"]
    verify = result["verify"]
    assert verify["rollouts_checked"] == 8 and verify["rollouts_passed"] == 8


@pytest.mark.slow
def test_hf_engine_json_on_stdout_and_a_longer_window(hf_run) -> None:
    run, report = hf_run
    err = run.stderr
    assert "Traceback" not in err
    for title in ("GRAIL THROUGHPUT BENCHMARK", "BENCHMARK RESULTS", "WHERE THE TIME WENT", "BEST: batch_size=16"):
        assert title in err  # the tables moved to stderr
    assert "50 blocks × 12 s = 600 s" in err[err.index("PROJECTED 1-WORKER THROUGHPUT"):]
    assert "360 s" not in err

    assert report["config"]["engine"] == "hf" and report["config"]["window"] == "50 blocks × 12 s = 600 s"
    (result,) = report["results"]
    assert result["rollouts"] == result["problems"] * 16 == 16
    assert result["verify"]["rollouts_passed"] == result["verify"]["rollouts_checked"] == 4
    (projection,) = report["projection"]
    assert projection["workers"] == 1
    assert projection["generated_per_window"] == pytest.approx(result["rollouts_per_s"] * 600)
    assert 0 < projection["on_time_per_window"] < projection["generated_per_window"]
    assert report["best"]["batch_size"] == 16


# --- bad input -----------------------------------------------------------------------------------------------------


def main_exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse errors leave through parser.exit
        return int(exc.code)


@pytest.mark.parametrize("flags, words", [
    (["--batch-sizes", "0"], "batch sizes must be positive whole numbers, got '0'"),
    (["--batch-sizes", "a,b"], "batch sizes must be positive whole numbers, got 'a'"),
    (["--batch-sizes", "16,"], "batch sizes must be positive whole numbers"),
    (["--num-problems", "0"], "argument --num-problems: '0' must be at least 1"),
    (["--workers", "x"], "argument --workers: 'x' is not a whole number"),
    (["--engine", "nope"], "argument --engine: invalid choice: 'nope'"),
    (["--model", "dummy:nope"], "unknown model preset 'dummy:nope'"),
    (["--model", "./no/such/model"], "model directory './no/such/model' does not exist"),
    (["--length-profile", "weird"], "bad length profile 'weird'"),
    (["--engine", "fast", "--batch-sizes", "4"], "must be at least 16 (one problem's rollouts) and at most 4096; got 4"),
    (["--length-profile", "fixed:30", "--max-new-tokens", "24"], "draws up to 30 tokens, more than --max-new-tokens 24"),
    (["--device", "mps"], "device 'mps' is not supported"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--verify", "-1"], "--verify takes a positive number of rollouts"),
    (["--warmup-problems", "-1"], "--warmup-problems cannot be negative"),
    (["--block-time", "0"], "argument --block-time: '0' must be positive"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, caplog, monkeypatch, flags, words) -> None:
    """Checked before the wallet is read: with no wallet configured, not even its warning appears."""
    for name in ("BT_WALLET_COLD", "BT_WALLET_HOT", "BT_WALLET_PATH", "GRAIL_MULTI_GPU"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.WARNING)
    assert main_exit_code(["benchmark", "--model", "dummy:tiny", "--device", "cpu", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("grail-pipeline benchmark: error: ")
    assert words in captured.err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_bad_input_in_a_real_process_is_one_line_without_a_wallet() -> None:
    run = run_benchmark([*TINY, "--batch-sizes", "0"], clean_env())
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "grail-pipeline benchmark: error: batch sizes must be positive whole numbers, got '0'\n"


# --- out of memory -------------------------------------------------------------------------------------------------


class OutOfMemoryEngine(Engine):
    """Takes a group and runs out of GPU memory, as a too-large batch does (a stand-in: OOM needs a GPU)."""

    name = "oom"

    def run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        feed.next(wait=True)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (stand-in)")


class FailingEngine(Engine):
    name = "boom"

    def run(self, feed: RequestFeed, emit: Callable[[GroupResult], None]) -> None:
        feed.next(wait=True)
        raise RuntimeError("boom")


def runtime_failing_at(sizes: set[int], engine: type[Engine] = OutOfMemoryEngine) -> type[Runtime]:
    class FailingRuntime(Runtime):
        def engine(self, batch_size: int) -> Engine:
            return engine() if batch_size in sizes else super().engine(batch_size)

    return FailingRuntime


OOM_RUN = ["benchmark", *TINY, "--engine", "fast", "--length-profile", "fixed:16", "--max-new-tokens", "16",
           "--num-problems", "1", "--warmup-problems", "0"]


def test_out_of_memory_is_a_row_and_the_next_batch_size_still_runs(monkeypatch, capsys, tmp_path,
                                                                    wallet_env) -> None:
    """The engine at batch size 32 raises torch.OutOfMemoryError inside the pipeline (a stand-in engine,
    since a real OOM needs a GPU); 16 then runs for real."""
    for key, value in wallet_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(runtime_module, "Runtime", runtime_failing_at({32}))
    path = tmp_path / "oom.json"
    assert cli.main([*OOM_RUN, "--batch-sizes", "32,16", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "BENCHMARK RESULTS")
    assert rows[0] == ["32", "OOM"] + ["-"] * 7
    assert rows[1][:3] == ["16", "1", "16"]
    assert [r[0] for r in table_rows(out, "WHERE THE TIME WENT")] == ["16"]
    assert [r[0] for r in table_rows(out, "PROJECTED 1-WORKER THROUGHPUT")] == ["16"]
    assert "BEST: batch_size=16" in out

    report = json.loads(path.read_text())
    assert [(r["batch_size"], r["status"]) for r in report["results"]] == [(32, "OOM"), (16, "ok")]
    assert report["results"][0]["rollouts"] == 0 and report["results"][1]["rollouts"] == 16
    assert [p["batch_size"] for p in report["projection"]] == [16] and report["best"]["batch_size"] == 16


def test_every_batch_size_out_of_memory_exits_1(monkeypatch, capsys, wallet_env) -> None:
    """Stand-in engines at every size (OOM needs a GPU): nothing completes, the exit code says so."""
    for key, value in wallet_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(runtime_module, "Runtime", runtime_failing_at({16, 32}))
    assert cli.main([*OOM_RUN, "--batch-sizes", "16,32"]) == 1
    out = capsys.readouterr().out
    assert [r[:2] for r in table_rows(out, "BENCHMARK RESULTS")] == [["16", "OOM"], ["32", "OOM"]]
    assert "No batch size completed." in out and "BEST" not in out


def test_other_engine_failures_are_not_hidden_as_oom(tiny, tok, real_wallet) -> None:
    """measure_batch_size turns only OOM into a row; any other error propagates."""
    from grail_pipeline.inference.engine import SamplingParams
    from grail_pipeline.mining.lengths import parse_length_profile
    from grail_pipeline.protocol.wallet import ephemeral_signer

    runtime = runtime_failing_at({16}, FailingEngine)(
        tiny, tok, "fast", SamplingParams(tok.eos_token_id, tok.pad_token_id, max_new_tokens=16),
        parse_length_profile("fixed:16"), 512)
    with pytest.raises(BaseExceptionGroup) as err:  # as the pipeline's task group raised it
        measure_batch_size(runtime, ephemeral_signer(), 16, 1, 0, benchmark_window(0), 0, None)
    assert err.group_contains(RuntimeError, match="^boom$")
    assert not err.group_contains(torch.OutOfMemoryError)


def test_the_tables_fit_80_columns() -> None:
    """At 80 columns (a default terminal) no header or cell is cut with '…' (rich cut 'Start-up(s)' to 'Start-…'):
    cells fold instead, and no line is wider than the terminal."""
    from rich.console import Console

    from grail_pipeline.tools import benchmark_report
    from grail_pipeline.tools.measurement import BatchResult
    from grail_pipeline.tools.projection import WindowSpec

    wide = BatchResult(batch_size=512, problems=640, rollouts=10240, seconds=1234.5, completion_tokens=4_000_000,
                       gpu_reserved_gb=50.01, gpu_process_gb=51.23, startup_seconds=112.3,
                       stage_seconds={"generate": 1020.1, "prove": 500.2, "sign": 11.1, "sink": 0.12},
                       engine={"step_ms": 21.5, "batch_occupancy": 0.93},
                       verify={"rollouts_passed": 64, "rollouts_checked": 64, "model_path": "/x"})
    console = Console(width=80, record=True)
    benchmark_report._results(console, [wide, BatchResult(batch_size=1024, status="OOM")])
    benchmark_report._engine_details(console, None, [wide])
    benchmark_report._projections(console, 8, WindowSpec(), [wide])
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80, text
    assert table_header(text, "BENCHMARK RESULTS") == list(HEADERS)
    assert table_header(text, "WHERE THE TIME WENT")[1] == "Start-up (s)"
