"""Checkpoint rotation (issue #14): a new checkpoint without a restart.

The weight copy writes the engine's own tensors (same addresses) and then gives the tokens and proofs of a
fresh `from_pretrained` load of the new checkpoint; another architecture is refused before anything is
written; the checkpoint directory ignores a folder without its ready marker and picks each window's
checkpoint; `make-checkpoints` writes a series; and the daemon, rehearsed over three checkpoints, mines each
window on its own checkpoint (each file verifies against its checkpoint, loaded fresh as a validator loads it,
and fails against the previous one), and restarts its engine, logged, for a checkpoint of another
architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import block_time_for, run_cli
from safetensors.torch import load_file, save_file

from grail_pipeline.cli import main as cli
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.engine import GroupRequest, SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine
from grail_pipeline.inference.loading import load_model, load_tokenizer
from grail_pipeline.inference.weights import WeightsMismatch, copy_checkpoint_weights
from grail_pipeline.mining.checkpoint_dir import READY_MARKER, CheckpointDir
from grail_pipeline.mining.status import read_status
from grail_pipeline.protocol.records import read_window_file
from grail_pipeline.proving.prefix import PrefixProver
from grail_pipeline.proving.proofs import ProofJob
from grail_pipeline.proving.reference import ReferenceProver
from grail_pipeline.tools.checkpoint_series import SeriesPlan, write_series
from grail_pipeline.tools.window_check import check_window_file

WINDOWS = (0, 30, 60, 90, 120)  # one checkpoint per window: whichever windows a shared CPU gets to mine have theirs
# 12-s windows (30 blocks of 0.4 s) on the CPU; the engine is chosen per test
DAEMON = ["--device", "cpu", "--length-profile", "fixed:16", "--max-new-tokens", "16", "--batch-size", "16",
          "--warmup-problems", "0", "--block-time", "0.4", "--log-level", "info"]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Perturbed dummy:tiny checkpoints for windows 0 to 120, each named for its window."""
    out = tmp_path_factory.mktemp("checkpoints")
    write_series(SeriesPlan("dummy:tiny", out, WINDOWS, model_name="rehearsal-{window}"))
    return out


def engine_tensors(engine: FastEngine) -> list[torch.Tensor]:
    w = engine.runner.weights
    return [w.embed, w.head, w.final_norm] + [t for layer in w.layers for t in vars(layer).values() if t is not None]


def generate(engine: FastEngine, tok) -> tuple[dict[str, list[list[int]]], list[GroupRequest]]:
    groups = [GroupRequest("a", tok("Hi there").input_ids, [8, 5]),
              GroupRequest("b", tok(" ".join(f"w{i}" for i in range(30))).input_ids, [6, 8, 3])]
    return {r.request.key: r.completions for r in engine.generate(groups)}, groups


def test_a_copy_keeps_the_engines_tensors_and_gives_a_fresh_loads_tokens_and_proofs(series, tok) -> None:
    loaded = load_model(str(series / "checkpoint-0"), "cpu")
    sampling = SamplingParams(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, top_k=1,
                              max_new_tokens=8, repetition_penalty=2.0)
    engine = FastEngine(loaded, sampling, slots=6, max_prompt_tokens=128, lag=2)
    before, _ = generate(engine, tok)
    pointers = [t.data_ptr() for t in engine_tensors(engine)]
    q_proj = loaded.model.get_decoder().layers[0].self_attn.q_proj.weight
    assert q_proj.data_ptr() == engine.runner.weights.layers[0].qkv_w.data_ptr()  # the module views the engine's

    report = copy_checkpoint_weights(loaded.model, series / "checkpoint-30")
    assert report.tensors == len(load_file(str(series / "checkpoint-30" / "model.safetensors")))
    assert [t.data_ptr() for t in engine_tensors(engine)] == pointers  # the same storage, new numbers
    fresh = load_model(str(series / "checkpoint-30"), "cpu")  # as a validator loads it
    ours = loaded.model.state_dict()
    for name, tensor in fresh.model.state_dict().items():
        assert torch.equal(ours[name], tensor), name

    after, groups = generate(engine, tok)
    expected, _ = generate(FastEngine(fresh, sampling, slots=6, max_prompt_tokens=128, lag=2), tok)
    assert after == expected and after != before
    jobs = [ProofJob(g.prompt_ids, after[g.key], hashlib.sha256(g.key.encode()).hexdigest()) for g in groups]
    for group_ours, group_fresh in zip(PrefixProver(loaded).prove_many(jobs), ReferenceProver(fresh).prove_many(jobs),
                                       strict=True):
        for a, b in zip(group_ours, group_fresh, strict=True):
            assert torch.equal(a.sketches, b.sketches) and torch.equal(a.indices, b.indices)


def test_another_architecture_or_a_missing_tensor_is_refused_before_anything_is_written(series, tmp_path) -> None:
    loaded = load_model(str(series / "checkpoint-0"), "cpu")
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    other = tmp_path / "qwen3"
    write_series(SeriesPlan("dummy:tiny-qwen3", other, (30,)))
    with pytest.raises(WeightsMismatch, match="another architecture .*config"):
        copy_checkpoint_weights(loaded.model, other / "checkpoint-30")
    cut = tmp_path / "cut"
    shutil.copytree(series / "checkpoint-30", cut)
    tensors = load_file(str(cut / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(cut / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatch, match="no tensor for model.layers.1.mlp.down_proj.weight"):
        copy_checkpoint_weights(loaded.model, cut)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


def test_the_directory_ignores_unready_folders_and_picks_each_windows_checkpoint(series, tmp_path, caplog) -> None:
    root = tmp_path / "dir"
    shutil.copytree(series, root)
    for window in (60, 90, 120):
        (root / f"checkpoint-{window}" / READY_MARKER).unlink()  # still being written
    shutil.copytree(series / "checkpoint-30", root / "half")
    (root / "half" / READY_MARKER).unlink()
    checkpoints = CheckpointDir(root)
    assert [c.window for c in checkpoints.ready()] == [0, 30]
    now = time.time()
    for window, ago in ((0, 100), (30, 50)):  # the ready marker's time is when the checkpoint became ready
        os.utime(root / f"checkpoint-{window}" / READY_MARKER, (now - ago, now - ago))
    assert checkpoints.for_window(60, now).window == 30  # 60 is not ready
    assert checkpoints.for_window(29, now).window == 0  # 30 names a later window
    assert checkpoints.for_window(30, now - 51).window == 0  # not ready before window 30 opened
    assert checkpoints.for_window(30, now - 50).model_name == "rehearsal-30"

    (root / "checkpoint-30" / "metadata.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="grail_pipeline"):
        assert [c.window for c in checkpoints.ready()] == [0]
        assert [c.window for c in checkpoints.ready()] == [0]
    assert sum("skipping checkpoint" in r.getMessage() for r in caplog.records) == 1  # said once
    with pytest.raises(UserError, match="checkpoint-30/metadata.json is not JSON"):
        checkpoints.first(30, now)
    (root / "checkpoint-30" / "metadata.json").unlink()
    with pytest.raises(UserError, match="marked READY but has no metadata.json"):
        checkpoints.first(30, now)
    shutil.rmtree(root / "checkpoint-30")
    shutil.rmtree(root / "checkpoint-0")
    with pytest.raises(UserError, match="has no ready checkpoint for window 0 or earlier"):
        checkpoints.first(0, now)


def test_make_checkpoints_writes_a_ready_series_and_never_rewrites_one(tmp_path, capsys) -> None:
    out = tmp_path / "series"
    rc, stdout, err = run_cli(capsys, "make-checkpoints", "--out", str(out), "--count", "2", "--first-window", "30",
                              "--seed", "3")
    assert rc == 0, err
    assert stdout.split() == [str(out / "checkpoint-30"), str(out / "checkpoint-60")]
    for window in (30, 60):
        folder = out / f"checkpoint-{window}"
        meta = json.loads((folder / "metadata.json").read_text())
        assert (meta["window"], meta["model_name"]) == (window, "dummy:tiny") and (folder / READY_MARKER).is_file()
        assert (folder / READY_MARKER).stat().st_mtime >= (folder / "model.safetensors").stat().st_mtime
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    a, b = (load_file(str(out / f"checkpoint-{w}" / "model.safetensors")) for w in (30, 60))
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    rc, _, err = run_cli(capsys, "make-checkpoints", "--out", str(out), "--windows", "60")
    assert rc == 2 and err.count("\n") == 1 and "exists already" in err


def mine(out: Path, checkpoint_dir: Path, windows: int, *extra: str) -> int:
    return cli.main(["mine", "--dry-run", *DAEMON, "--checkpoint-dir", str(checkpoint_dir), "--out-dir", str(out),
                     "--max-windows", str(windows), *extra])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three windows sized from a group's time: minutes on a loaded box
def test_the_daemon_mines_each_window_on_its_own_checkpoint(series, tmp_path, monkeypatch, wallet_env,
                                                            caplog, group_seconds) -> None:
    for key, value in wallet_env.items():
        monkeypatch.setenv(key, value)
    caplog.set_level("INFO", logger="grail_pipeline")
    out = tmp_path / "windows"
    # the hf engine: one group at a time, so that on a shared CPU no window's groups spill into the next one's;
    # windows with room for a few groups at this machine's speed now (12 s on an idle box; a loaded one cut the
    # only group of a window, and then of the next)
    block = block_time_for(group_seconds("hf"), groups=2)
    assert mine(out, series, 3, "--engine", "hf", "--verify-sample", "2", "--block-time", block) == 0, caplog.text
    files = sorted(out.glob("*.parquet"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    mined = [int(p.stem.rsplit("-", 1)[1]) for p in files]
    windows = read_status(out / "status-worker-0.json")["windows"]
    # three windows had groups issued; those with a rollout before any gap have a file (a window whose first
    # group was cut has none, its status record counts the cut): whichever were mined, each on its own checkpoint
    assert set(mined) == {int(w) for w, r in windows.items() if r["file"]}, caplog.text
    assert set(mined) <= set(WINDOWS), caplog.text
    tokenizer = load_tokenizer(str(series / "checkpoint-0"))
    checkpoints = {w: load_model(str(series / f"checkpoint-{w}"), "cpu") for w in WINDOWS}  # fresh loads
    verified = []
    for window, path in zip(mined, files):
        previous = window - 30 if window else None
        records, meta = read_window_file(path)
        if not records:
            continue
        verified.append(window)
        assert all(r["checkpoint_window"] == window for r in records)
        assert {r["commit"]["model"]["name"] for r in records} == {f"rehearsal-{window}"}
        assert (meta["checkpoint_window"], meta["model_name"]) == (str(window), f"rehearsal-{window}")
        report = check_window_file(path, tokenizer, checkpoints[window])
        assert report.passed, {c.name: c.problems for c in report.checks if not c.ok}
        assert report.check("proofs").checked == report.rollouts
        if previous is not None:  # the previous checkpoint's numbers do not give these proofs
            against = check_window_file(path, tokenizer, checkpoints[previous], expected_checkpoint_window=window,
                                        proof_sample=4)  # F's sample and 4 more: none passes
            assert against.check("proofs").passed == 0 and not against.passed
    assert len(verified) >= 2, caplog.text  # at least one switch checked both ways
    copies = [r.getMessage() for r in caplog.records if "copied into the engine" in r.getMessage()]
    assert {f"window {w}" for w in mined[1:]} <= {m.split(":")[0] for m in copies}, copies
    checks = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    # each window's sample checked on its own checkpoint, loaded in a process of its own; the last one's too, even
    # when its cut wrote it as the pipeline drained (the daemon waits for that report before the checks end)
    for window in verified:
        assert any(f"window {window} self-check" in m and f"checkpoint-{window}" in m and "2/2 rollouts pass" in m
                   for m in checks), checks
    assert read_status(out / "status-worker-0.json")["state"] == "stopped"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two windows sized from a group's time: minutes on a loaded box
def test_a_checkpoint_of_another_architecture_restarts_the_engine(series, tmp_path, monkeypatch, wallet_env,
                                                                  caplog, group_seconds) -> None:
    for key, value in wallet_env.items():
        monkeypatch.setenv(key, value)
    caplog.set_level("INFO", logger="grail_pipeline")
    root = tmp_path / "checkpoints"
    root.mkdir()
    shutil.copytree(series / "checkpoint-0", root / "checkpoint-0")
    write_series(SeriesPlan("dummy:tiny-qwen3", root, (30, 60, 90), model_name="qwen3-{window}"))
    out = tmp_path / "windows"
    # the fast engine (its restart is the one that matters on a GPU), one group queued ahead of it. The second
    # window holds the first one's groups still in flight at its cut (three), the restart (a load, about a group's
    # time) and its own group: fixed 12-s windows cut that group on a loaded CI box (its window had no file)
    block = block_time_for(group_seconds("fast"), groups=6)
    assert mine(out, root, 2, "--engine", "fast", "--generation-queue", "1", "--block-time", block) == 0, caplog.text
    restarts = [r for r in caplog.records if "engine restarted on checkpoint 30" in r.getMessage()]
    assert len(restarts) == 1 and restarts[0].levelno == logging.WARNING  # once: later qwen3 checkpoints are copied
    assert any("cannot be copied into the engine" in r.getMessage() for r in caplog.records)
    files = sorted(out.glob("*.parquet"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    mined = [int(p.stem.rsplit("-", 1)[1]) for p in files]
    assert len(mined) == 2 and mined[0] == 0 and mined[1] in (30, 60, 90), caplog.text
    window = mined[1]
    report = check_window_file(files[1], load_tokenizer(str(root / f"checkpoint-{window}")),
                               load_model(str(root / f"checkpoint-{window}"), "cpu"))
    assert report.passed and report.rollouts > 0, {c.name: c.problems for c in report.checks if not c.ok}
    assert {r["commit"]["model"]["name"] for r in read_window_file(files[1])[0]} == {f"qwen3-{window}"}
