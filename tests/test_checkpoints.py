"""A dummy model is a checkpoint, and the check loads its own model from it as a validator does.

The bug these guard against (issue #17): a dummy model built in memory on the GPU differed from the same
weights loaded from a directory in one buffer (rotary inv_freq), so our own check on the engine's object
passed what the protocol's validator rejected.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from transformers import AutoModelForCausalLM

from grail_pipeline.inference.checkpoints import DUMMY_SEED, checkpoint_metadata, dummy_checkpoint
from grail_pipeline.inference.engine import SamplingParams
from grail_pipeline.inference.fast_engine import FastEngine
from grail_pipeline.inference.loading import load_model
from grail_pipeline.proving.validator_process import CheckUnavailable, ValidatorProcess

SAMPLING = SamplingParams(eos_token_id=151645, pad_token_id=151643, max_new_tokens=8)


def test_a_dummy_preset_is_a_checkpoint_directory_written_once(tmp_path: Path) -> None:
    path = dummy_checkpoint("tiny", root=tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metadata.json"):
        assert (path / name).is_file(), name
    meta = checkpoint_metadata(path)
    assert meta["model_name"] == "dummy:tiny" and meta["window"] == 0 and meta["seed"] == DUMMY_SEED
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"  # as the trainer publishes
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert dummy_checkpoint("tiny", root=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written  # not written again
    assert dummy_checkpoint("tiny", seed=DUMMY_SEED + 1, root=tmp_path) != path  # keyed by seed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_killed_writer_leaves_nothing_that_looks_whole(tmp_path: Path) -> None:
    path = dummy_checkpoint("tiny", root=tmp_path)
    stale = tmp_path / f".{path.name}.0123456789ab.tmp"
    os.rename(path, stale)  # as if a writer had died before its rename
    assert not (tmp_path / path.name).exists()
    assert dummy_checkpoint("tiny", root=tmp_path) == path and (path / "metadata.json").is_file()
    assert not stale.exists()  # swept under the lock


def _write(root: str) -> str:
    return str(dummy_checkpoint("tiny", root=Path(root)))


def test_two_workers_starting_together_write_it_once(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_write, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [Path(paths[0]).name]


def test_the_engine_mines_with_the_model_a_validator_loads() -> None:
    """Parameters and buffers bit-equal (rotary inv_freq included), and one forward gives the same hidden states,
    between the model the engine decodes with (loaded, then fused by two engines) and plain from_pretrained."""
    mined = load_model("dummy:tiny", device="cpu")
    FastEngine(mined, SAMPLING, slots=2)
    FastEngine(mined, SAMPLING, slots=2)
    validator = AutoModelForCausalLM.from_pretrained(mined.source, dtype=torch.float32).eval()
    assert mined.source == str(dummy_checkpoint("tiny"))
    ours = dict(mined.model.named_parameters()) | dict(mined.model.named_buffers())
    theirs = dict(validator.named_parameters()) | dict(validator.named_buffers())
    assert ours.keys() == theirs.keys() and any("inv_freq" in name for name in ours)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 2661, 264, 3491, 13, 151645]])
    with torch.inference_mode():
        a = mined.model(ids, output_hidden_states=True).hidden_states[-1]
        b = validator(ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def honest_records(tmp_path_factory) -> list[dict]:
    """Records the fast engine's pipeline proved and signed (two groups of the tiny model)."""
    import argparse

    import anyio

    from grail_pipeline.mining.chain import WindowClock
    from grail_pipeline.mining.messages import make_task
    from grail_pipeline.mining.runtime import Runtime
    from grail_pipeline.protocol.wallet import ephemeral_signer

    runtime = Runtime.from_args(argparse.Namespace(model="dummy:tiny", engine="fast", device="cpu", max_new_tokens=16,
                                                   length_profile="fixed:16", max_prompt_tokens=512))
    signer = ephemeral_signer()
    window = WindowClock(run_seed=4, genesis=0.0).context(30)
    records: list[dict] = []

    class Keep:
        async def put(self, group) -> None:
            records.extend(group.records)

    async def tasks():
        for index in (0, 1):
            yield make_task(window, index, signer.ss58_address, runtime.tokenizer, runtime.lengths)

    anyio.run(runtime.pipeline(runtime.engine(16), signer).run, tasks(), Keep())
    runtime.close()
    return records[::8]


def test_the_validator_process_checks_on_its_own_model(honest_records) -> None:
    source = str(dummy_checkpoint("tiny"))
    bad = copy.deepcopy(honest_records[0])
    bad["commit"]["commitments"][-1]["sketch"] += 10_000
    with ValidatorProcess(source, "cpu") as check:
        honest = check.verify(honest_records)
        tampered = check.verify([bad])
    assert honest["model_path"] == source
    assert honest["rollouts_checked"] == honest["rollouts_passed"] == len(honest_records) == 4
    assert honest["positions_passed"] == honest["positions_checked"] > 0
    assert tampered["rollouts_passed"] == 0 and tampered["positions_passed"] == tampered["positions_checked"] - 1


def test_an_unwritable_cache_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GRAIL_PIPELINE_CACHE", str(blocker / "cache"))  # a directory that cannot be made
    rc, out, err = run_cli(capsys, "benchmark", "--model", "dummy:tiny", "--device", "cpu", "--num-problems", "1")
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("grail-pipeline benchmark: error: cannot write the dummy:tiny checkpoint to ")
    assert "set GRAIL_PIPELINE_CACHE to a writable directory" in err


def test_a_check_that_cannot_load_its_model_says_so_in_one_line(tmp_path: Path, capfd) -> None:
    with ValidatorProcess(str(tmp_path / "no-checkpoint-here"), "cpu") as check:
        with pytest.raises(CheckUnavailable, match=r"^the check process could not load .*no-checkpoint-here") as err:
            check.verify([{}])
    assert "\n" not in str(err.value)
    assert "Traceback" not in capfd.readouterr().err  # nothing from the child either


def test_the_benchmark_reports_a_check_that_could_not_run(tiny, honest_records, tmp_path: Path) -> None:
    from grail_pipeline.tools.measurement import verify_independently

    result = verify_independently(dataclasses.replace(tiny, source=str(tmp_path / "gone")), honest_records[:1])
    assert result["model_path"] == str(tmp_path / "gone") and "could not load" in result["error"]
    assert "rollouts_passed" not in result  # no pass rate is made up


def test_a_runs_choices_name_its_checkpoint_before_the_weights_load(tmp_path) -> None:
    """A fleet compares the checkpoint (source, commit name, window) before the model loads (a worker of another
    one was refused only after 22 s of loading): the choices name it as the load then does."""
    import argparse
    import shutil

    from grail_pipeline.inference.loading import CheckpointSource
    from grail_pipeline.mining.choices import resolve_choices
    from grail_pipeline.mining.runtime import Runtime

    other = tmp_path / "checkpoint-7"
    shutil.copytree(dummy_checkpoint("tiny"), other)
    metadata = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps({**metadata, "window": 7, "model_name": "rehearsal-7"}))
    choices = resolve_choices(argparse.Namespace(model=str(other), device="cpu", engine="auto", length_profile=None,
                                                 max_new_tokens=16, max_prompt_tokens=64))
    assert choices.checkpoint == CheckpointSource(str(other), "rehearsal-7", 7)
    assert (choices.device.type, choices.engine_kind, choices.lengths.spec) == ("cpu", "hf", "natural")
    runtime = Runtime.from_choices(choices)
    loaded = runtime.loaded
    runtime.close()
    assert (loaded.source, loaded.name, loaded.checkpoint_window) == (str(other), "rehearsal-7", 7)
