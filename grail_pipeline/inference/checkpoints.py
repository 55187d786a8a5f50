"""A dummy model is a checkpoint: each preset is written once as a checkpoint directory in the cache, and
every process loads it from there with `from_pretrained`, as any checkpoint and as a validator would.

Why: a model built in memory is not one a validator can rebuild. Measured on an H100 (issue #17), the
rotary `inv_freq` buffer of a model created directly on the GPU differs by 1.9e-9 from the one
`from_pretrained` computes on the CPU; that changed the bf16 hidden states of 241 of 700 positions, and
46 of 96 rollouts failed the protocol's own proof check, while every parameter was equal. Loaded from a
directory, the miner's model is the validator's, buffers included.

The directory holds what the protocol's checkpoints hold: `config.json`, `model.safetensors` (bf16, as
the trainer publishes), the tokenizer with the protocol's chat template, and `metadata.json` with
`model_name` (the name that goes into every commit) and `window`. It is keyed by preset, seed and the
preset's config, built on the CPU from a fixed seed, under a lock (two workers of one node build it
once) and renamed into place whole, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.utils import logging as hf_logging

from grail_pipeline import __version__
from grail_pipeline.common.atomic import publish_directory
from grail_pipeline.common.errors import UserError
from grail_pipeline.common.input_file import not_a_regular_file, parse_json, read_text
from grail_pipeline.common.paths import ENV_CACHE, cache_root
from grail_pipeline.inference.model_ref import DUMMY_PREFIX, PRESETS
from grail_pipeline.protocol.profile import INT64_MAX
from grail_pipeline.protocol.tokenizer import builtin_tokenizer

log = logging.getLogger("grail_pipeline")

DUMMY_SEED = 1234
METADATA = "metadata.json"
FORMAT = 2  # bump when what a dummy checkpoint holds changes: its directory name changes with it


def dummy_config(preset: str) -> PreTrainedConfig:
    """The transformers config of a preset (model_ref.PRESETS), its fields copied: the table stays as written."""
    entry = PRESETS[preset]
    return AutoConfig.for_model(entry.model_type, **copy.deepcopy(dict(entry.config)))


def checkpoint_root() -> Path:
    """Where dummy checkpoints are kept: `$GRAIL_PIPELINE_CACHE/checkpoints`."""
    return cache_root() / "checkpoints"


def dummy_checkpoint(preset: str, seed: int = DUMMY_SEED, root: Path | None = None) -> Path:
    """The checkpoint directory of `dummy:<preset>`, written first if it is not there yet."""
    root = root or checkpoint_root()
    key = json.dumps(dict(format=FORMAT, preset=preset, seed=seed, config=PRESETS[preset].config,
                          model_type=PRESETS[preset].model_type), sort_keys=True)
    path = root / f"{preset}-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if _whole(path):
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this node may be writing it right now
            if not _whole(path):
                if path.exists():  # damaged after it was written (a disk filled, a file cut): written again
                    log.warning("the cached dummy:%s checkpoint at %s is damaged; writing it again", preset, path)
                    shutil.rmtree(path)
                for stale in root.glob(f".{path.name}.*.tmp"):  # a writer killed half-way (we hold the lock)
                    shutil.rmtree(stale, ignore_errors=True)
                _write(path, preset, seed)
    except OSError as exc:  # an unwritable cache or a full disk: nothing half-written stays behind
        raise UserError(f"cannot write the {DUMMY_PREFIX}{preset} checkpoint to {root} ({exc.strerror or exc}); "
                        f"set {ENV_CACHE} to a writable directory with room for it") from None
    return path


def _whole(path: Path) -> bool:
    """A cached preset checkpoint is there and whole (metadata.json is written last, the weights' header covers the
    file): a cache cut short after it was written is noticed and rebuilt, not loaded."""
    if not (path / METADATA).is_file():
        return False
    try:
        check_checkpoint(path)
    except UserError:
        return False
    return True


def _write(path: Path, preset: str, seed: int) -> None:
    """Random weights from `seed` on the CPU (the same on every machine with the same libraries), saved as bf16."""
    log.info("writing the dummy:%s checkpoint (seed %d) to %s, once", preset, seed, path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        model = _random_model(dummy_config(preset), seed)
        with transformers_progress_off():
            model.save_pretrained(tmp)
        builtin_tokenizer().save_pretrained(tmp)
        metadata = dict(model_name=DUMMY_PREFIX + preset, window=0, preset=preset, seed=seed, format=FORMAT,
                        dtype="bfloat16", written_by=f"grail-pipeline {__version__}", torch=torch.__version__,
                        transformers=transformers.__version__)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        publish_directory(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def _random_model(config: PreTrainedConfig, seed: int) -> torch.nn.Module:
    """The model with its weights drawn from `seed`: normals of the config's initializer_range (float32 draws, one
    generator, parameters in their named order, then bf16), norm weights 1 and biases 0, as transformers'
    own initialisation. Built on the meta device and filled here because transformers' bf16 initialisation on
    the CPU took 155 s for the 3B preset on the H100 host; this takes seconds."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters storage of their own: tie them again before drawing
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name.rsplit(".", 2)[-2]:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator).mul_(std))
    return model


@contextlib.contextmanager
def transformers_progress_off() -> Iterator[None]:
    """transformers' per-shard "Loading weights" / "Writing model shards" bars off while we load or write a
    checkpoint: our commands say what they do themselves, and a bar on stderr from every worker and check
    process is noise in logs (and in what programs read)."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def checkpoint_window_of(metadata: dict) -> int:
    """The checkpoint window a `metadata.json` states (0 where it states none: a hub model or a plain directory)."""
    value = metadata.get("window", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "…"
        raise UserError(f"the checkpoint's metadata.json has window {shown}: it must be a whole number from 0 to "
                        f"{INT64_MAX} (the window file's checkpoint_window is int64)")
    return value


def checkpoint_metadata(path: str | os.PathLike[str], required: bool = False) -> dict:
    """A checkpoint directory's `metadata.json` ({} where there is none, or where `path` is no directory: a hub id).
    One that is there but is not a regular file (a FIFO would block the reader), not JSON, nested too deep or not
    a JSON object is a UserError naming it; `required`: a missing one is too."""
    file = Path(path) / METADATA
    if not Path(path).is_dir() or not (file.exists() or file.is_symlink()):
        if required:
            raise UserError(f"checkpoint {path} has no {METADATA}")
        return {}
    data = parse_json(read_text(file, "checkpoint metadata"), f"checkpoint metadata {file}")
    if not isinstance(data, dict):
        raise UserError(f"checkpoint metadata {file} is not a JSON object")
    return data


def check_checkpoint(path: str | os.PathLike[str]) -> None:
    """The checkpoint rule: what a directory must hold before `from_pretrained` reads it, each miss one UserError
    naming it (a checkpoint arrives from the network, and a cache can be cut short by a full disk or a kill).

    config.json is a JSON object whose text_config, if any, is one too, with a positive vocab_size; metadata.json
    is `checkpoint_metadata`'s and its window `checkpoint_window_of`'s; every *.safetensors file has a whole header
    covering the file (safetensors checks it without reading the tensors); and every tensor whose name the
    config's model has has that model's shape (the model is built on the meta device, no memory): transformers
    would otherwise read gigabytes before refusing a mismatch, with a report table and a traceback.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.exists():
        return  # not a checkpoint directory: from_pretrained says so in its own words
    config = parse_json(read_text(config_file, "checkpoint config"), f"checkpoint config {config_file}")
    if not isinstance(config, dict):
        raise UserError(f"checkpoint config {config_file} is not a JSON object")
    text_config = config.get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        raise UserError(f"checkpoint config {config_file}: text_config is a {type(text_config).__name__}, not an object")
    for part in (config, text_config or {}):
        vocab = part.get("vocab_size")
        if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1):
            raise UserError(f"checkpoint config {config_file}: vocab_size {vocab!r} is not a positive whole number")
    checkpoint_window_of(checkpoint_metadata(directory))
    shapes: dict[str, tuple[int, ...]] = {}
    for weights in sorted(directory.glob("*.safetensors")):
        problem = not_a_regular_file(weights)
        if problem is not None:
            raise UserError(f"checkpoint weights {weights} {problem}")
        try:
            with safe_open(str(weights), "pt") as handle:
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
        except Exception as exc:  # SafetensorError: truncated, garbage, a header that lies about the file
            raise UserError(f"checkpoint weights {weights} are not a whole safetensors file "
                            f"({str(exc).strip()[:120]})") from None
    if shapes:
        _check_shapes(directory, shapes)


def _check_shapes(directory: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"), transformers_progress_off():
            expected = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception as exc:  # a config transformers cannot build a model from: its loader says it in one line
        raise UserError(f"checkpoint {directory}: config.json does not describe a model transformers can build "
                        f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__})") from None
    wrong = [(name, shape, expected[name]) for name, shape in shapes.items() if name in expected and shape != expected[name]]
    if wrong:
        name, shape, want = wrong[0]
        raise UserError(f"checkpoint {directory}: tensor {name} is {list(shape)} in the weights but {list(want)} for "
                        f"the model config.json describes" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
