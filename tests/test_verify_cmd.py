"""`grail-pipeline verify PATH`: an honest window file passes; each kind of tampering fails the check it should."""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from grail_pipeline.cli import main as cli
from grail_pipeline.inference.checkpoints import dummy_checkpoint
from grail_pipeline.inference.loading import LoadedModel
from grail_pipeline.mining.chain import WindowClock, WorkerSlot
from grail_pipeline.mining.messages import make_task
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.mining.sink import WindowSink
from grail_pipeline.mining.source import WindowClose
from grail_pipeline.protocol.records import read_window_file, write_window_file
from grail_pipeline.protocol.wallet import ephemeral_signer
from grail_pipeline.tools.window_check import check_window_file

Records = list[dict[str, Any]]


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    args = argparse.Namespace(model="dummy:tiny", engine="hf", device="cpu", max_new_tokens=16,
                              length_profile="fixed:16", max_prompt_tokens=512)
    return Runtime.from_args(args)


@pytest.fixture(scope="module")
def window_file(runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two groups mined by the real pipeline into a real window file (worker 0 of 1, window 60)."""
    out = tmp_path_factory.mktemp("windows")
    signer = ephemeral_signer()
    pipeline = runtime.pipeline(runtime.engine(16), signer)
    window = WindowClock(run_seed=3, genesis=0.0).context(60)
    sink = WindowSink(out, signer.ss58_address, WorkerSlot(0, 1), 30, block_time_s=12.0)

    async def tasks():
        for index in (0, 1):
            yield make_task(window, index, signer.ss58_address, runtime.tokenizer, runtime.lengths, block=61)

    async def main() -> None:
        await pipeline.run(tasks(), sink)
        await sink.close_window(WindowClose(window, (0, 1), False, 0.0, 0.0))

    anyio.run(main)
    return sink.path_for(60)


def test_an_honest_file_passes_with_a_table(window_file: Path, capsys) -> None:
    assert cli.main(["verify", str(window_file), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    for name in ("metadata", "structure", "fields", "signatures", "tokens", "prompt", "reward", "groups", "proofs"):
        assert name in out
    assert "32 rollouts in 2 groups" in out
    assert f"on the model loaded from {dummy_checkpoint('tiny')}" in " ".join(out.split())


def test_json_for_programs(window_file: Path, capsys) -> None:
    assert cli.main(["verify", str(window_file), "--skip-proofs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and not report["partial"]
    assert (report["rollouts"], report["groups"], report["window_start"]) == (32, 2, 60)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["proofs"]["skipped"] and checks["tokens"]["skipped"]
    assert checks["signatures"]["checked"] == checks["signatures"]["passed"] == 32
    assert checks["reward"]["passed"] == 32 and checks["groups"]["passed"] == checks["groups"]["checked"] == 4


def _set(path: tuple, delta: Callable[[Any], Any], row: int = 0) -> Callable[[Records, dict], None]:
    def tamper(records: Records, meta: dict) -> None:
        target = records[row]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = delta(target[path[-1]])
    return tamper


def _tokens(position: int) -> Callable[[Records, dict], None]:
    def tamper(records: Records, meta: dict) -> None:
        tokens = records[0]["commit"]["tokens"]
        tokens[position] = (tokens[position] + 1) % 150000
    return tamper


TAMPERING: dict[str, tuple[Callable[[Records, dict], None], set[str]]] = {
    "reward": (_set(("commit", "rollout", "total_reward"), lambda r: r + 0.5, row=3), {"reward", "groups"}),
    "advantage": (_set(("commit", "rollout", "advantage"), lambda a: a + 0.1), {"groups"}),
    "missing rollout": (lambda records, meta: records.pop(5), {"groups"}),
    "group order": (lambda records, meta: records.sort(key=lambda r: -r["rollout_group"]), {"groups"}),
    "completion token": (_tokens(-2), {"signatures", "proofs"}),
    "prompt token": (_tokens(3), {"signatures", "prompt", "proofs"}),
    "nonce": (_set(("nonce",), lambda n: n + 1), {"fields"}),
    "rollout signature": (_set(("signature",), lambda s: ("0" if s[0] != "0" else "1") + s[1:]), {"signatures"}),
    "logprob": (_set(("commit", "rollout", "token_logprobs"), lambda lp: lp[:-1] + [lp[-1] - 0.5]), {"proofs"}),
    "wallet": (lambda records, meta: meta.update(wallet="5Someone"), {"metadata"}),
    "short completion": (
        _set(("commit", "rollout", "completion_length"), lambda n: n + 1), {"structure"}),
}


@pytest.fixture(scope="module")
def loaded(runtime: Runtime) -> LoadedModel:
    return runtime.loaded


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_fails_the_right_checks(case: str, window_file: Path, runtime: Runtime, tmp_path: Path) -> None:
    records, meta = read_window_file(window_file)
    records, meta = copy.deepcopy(records), dict(meta)
    tamper, expected = TAMPERING[case]
    tamper(records, meta)
    path = tmp_path / window_file.name
    write_window_file(path, records, {k: v for k, v in meta.items() if k != "inference_count"})
    report = check_window_file(path, runtime.tokenizer, runtime.loaded, proof_sample=1)  # rollout 0 is in the sample
    failed = {c.name for c in report.checks if not c.ok}
    assert failed == expected, {c.name: c.problems for c in report.checks if not c.ok}
    assert not report.passed


def test_failing_file_exits_1(window_file: Path, tmp_path: Path, capsys) -> None:
    records, meta = read_window_file(window_file)
    records[0]["commit"]["rollout"]["total_reward"] += 1.0
    path = tmp_path / "bad.parquet"
    write_window_file(path, records, {k: v for k, v in meta.items() if k != "inference_count"})
    assert cli.main(["verify", str(path), "--skip-proofs"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "group 0 rollout 0: reward" in out


@pytest.mark.parametrize("content", [b"", b"not parquet at all", None])
def test_not_a_window_file_is_one_line(tmp_path: Path, content: bytes | None, capsys) -> None:
    path = tmp_path / "window.parquet"
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("grail-pipeline verify: error: window file")


def test_negative_proof_sample(window_file: Path, capsys) -> None:
    assert cli.main(["verify", str(window_file), "--proof-sample", "-1"]) == 2
    assert "--proof-sample" in capsys.readouterr().err
