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
from grail_pipeline.mining.chain import WindowClock
from grail_pipeline.mining.messages import SignedGroup, make_task
from grail_pipeline.mining.runtime import Runtime
from grail_pipeline.protocol.profile import PROFILE
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
    """Two groups mined by the real pipeline, written in problem order to a real window file (window 60)."""
    out = tmp_path_factory.mktemp("windows")
    signer = ephemeral_signer()
    pipeline = runtime.pipeline(runtime.engine(16), signer)
    window = WindowClock(run_seed=3, genesis=0.0).context(60)
    mined: list[SignedGroup] = []

    class Collect:
        async def put(self, group: SignedGroup) -> None:
            mined.append(group)

    async def tasks():
        for index in (0, 1):
            yield make_task(window, index, signer.ss58_address, runtime.tokenizer, runtime.lengths, block=61)

    anyio.run(pipeline.run, tasks(), Collect())
    records = [r for group in sorted(mined, key=lambda g: g.task.index) for r in group.records]
    path = out / PROFILE.window_file_name(signer.ss58_address, 60)
    write_window_file(path, records, {"wallet": signer.ss58_address, "window_start": 60, "window_length": 30,
                                      "block_hash": window.block_hash})
    return path


def test_an_honest_file_passes_with_a_table(window_file: Path, capsys) -> None:
    assert cli.main(["verify", str(window_file), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    for name in ("file", "deadline", "metadata", "checkpoint", "structure", "fields", "signatures", "tokens", "prompt",
                 "reward", "proofs", "termination", "distribution", "groups", "order"):
        assert name in out
    assert "validator: PASS" in out and "strict: PASS" in out
    assert "random weights: termination 0/32, distribution 0/32" in " ".join(out.split())
    assert "not run: deadline" in out
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
    assert checks["reward"]["passed"] == 32 and checks["groups"]["passed"] == checks["groups"]["checked"] == 2
    assert checks["order"]["passed"] == checks["order"]["checked"] == 2
    assert report["verdicts"]["validator"]["passed"] and report["verdicts"]["strict"]["passed"]
    assert len(report["sample"]["groups"]) == 1  # 32 rollouts > 20: max(1, int(0.1 * 2 groups)) = 1 group
    assert report["verdicts"]["validator"]["rollouts_checked"] == 16


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
    "group order": (lambda records, meta: records.sort(key=lambda r: -r["rollout_group"]), {"order", "prompt"}),
    "completion token": (_tokens(-2), {"signatures", "proofs"}),
    "prompt token": (_tokens(3), {"signatures", "prompt", "proofs"}),
    "nonce": (_set(("nonce",), lambda n: n + 1), {"fields"}),
    "rollout signature": (_set(("signature",), lambda s: ("0" if s[0] != "0" else "1") + s[1:]), {"signatures"}),
    "logprob": (_set(("commit", "rollout", "token_logprobs"), lambda lp: lp[:-1] + [lp[-1] - 0.5]), {"proofs"}),
    "wallet": (lambda records, meta: meta.update(wallet="5Someone"), {"metadata", "file"}),
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
    failed = set(report.verdicts["strict"].failed)
    assert failed == expected, report.verdicts["strict"].failed
    assert not report.passed


def test_failing_file_exits_1(window_file: Path, tmp_path: Path, capsys) -> None:
    records, meta = read_window_file(window_file)
    records[0]["commit"]["rollout"]["total_reward"] += 1.0
    path = tmp_path / "bad.parquet"
    write_window_file(path, records, {k: v for k, v in meta.items() if k != "inference_count"})
    assert cli.main(["verify", str(path), "--skip-proofs"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "group 0 rollout 0 (file position 0): reward" in out


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


def test_an_empty_file_says_so(window_file: Path, tmp_path: Path, capsys) -> None:
    _, meta = read_window_file(window_file)
    path = tmp_path / window_file.name
    write_window_file(path, [], {k: v for k, v in meta.items() if k != "inference_count"})
    assert cli.main(["verify", str(path), "--json"]) == 1  # a file holding no rollout fails both verdicts
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["rollouts"] == report["groups"] == 0 and not report["passed"]
    assert all("no rollout in the file" in v["failed"]["file"] for v in report["verdicts"].values()), report
    assert checks["proofs"]["skipped"] == checks["tokens"]["skipped"] == "no rollouts in the file"  # not --skip-proofs


def test_help_names_every_check() -> None:
    from grail_pipeline.tools.window_check import CHECKS

    parser = cli.build_parser()
    text = parser._subparsers._group_actions[0].choices["verify"].format_help()
    for name, *_ in CHECKS:
        assert f"  {name} " in text
    assert "--status" in text and "--checkpoint-window" in text and "no-drand" in text
