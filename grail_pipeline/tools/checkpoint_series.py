"""A series of perturbed checkpoints, one per window, to rehearse checkpoint rotation without a hub or a trainer.

Each checkpoint is a base checkpoint (a dummy preset's, or any local safetensors checkpoint) with seeded
Gaussian noise added to every tensor (`noise` × the tensor's own spread, drawn from (seed, window), so the
same command writes the same numbers), saved in the base's dtype, with the base's config and tokenizer
and a `metadata.json` naming the window and the model name. It is laid out as `mine --checkpoint-dir`
reads (mining/checkpoint_dir.py): the folder `checkpoint-{window}` is written under a temporary name, its
files fsynced, renamed into place, and only then is its ready marker written, so a reader never takes a
half-written checkpoint. `ready_every_s` spaces the ready moments out in real time (a checkpoint published
during the run rather than before it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grail_pipeline import __version__
from grail_pipeline.common.atomic import publish_directory, write_atomically
from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.checkpoints import METADATA, check_checkpoint, checkpoint_metadata, dummy_checkpoint
from grail_pipeline.inference.model_ref import parse_model_ref
from grail_pipeline.mining.checkpoint_dir import READY_MARKER
from grail_pipeline.mining.rules import parse_whole
from grail_pipeline.protocol.profile import INT64_MAX

log = logging.getLogger("grail_pipeline")

WEIGHTS = "model.safetensors"


SEED_STRIDE = 1_000_003  # the noise of (seed, window) is drawn from seed x SEED_STRIDE + window
MAX_SERIES = 10_000  # checkpoints in one series: each is a whole model on disk
MAX_READY_EVERY_S = 86400.0  # a day between two checkpoints of a rehearsal; 1e19 s overflowed time.sleep


@dataclass(frozen=True)
class SeriesPlan:
    """What `write_series` writes: the base checkpoint, the windows, and how the weights are perturbed."""

    model: str  # a dummy preset or a local checkpoint directory with one model.safetensors
    out_dir: Path
    windows: tuple[int, ...]
    noise: float = 0.1
    seed: int = 0
    model_name: str | None = None  # a template with {window}; None: the base's model_name
    ready_every_s: float = 0.0


def folder_name(window: int) -> str:
    return f"checkpoint-{window}"


def base_checkpoint(model: str) -> Path:
    """The base's directory: a dummy preset's cached checkpoint, or a local directory holding model.safetensors."""
    ref = parse_model_ref(model)
    if ref.preset is not None:
        return dummy_checkpoint(ref.preset)
    path = Path(ref.raw)
    if ref.kind == "local":
        check_checkpoint(path)
    if ref.kind != "local" or not (path / WEIGHTS).is_file():
        raise UserError(f"--model {model}: a dummy preset or a local checkpoint directory with one {WEIGHTS} "
                        f"(sharded checkpoints are not supported here)")
    return path


def check_plan(plan: SeriesPlan) -> None:
    """Mistakes as one line, before anything is read or written."""
    if not plan.windows:
        raise UserError("no windows to write a checkpoint for")
    if len(set(plan.windows)) != len(plan.windows) or any(w < 0 for w in plan.windows):
        raise UserError(f"windows must be distinct whole numbers, at least 0: {list(plan.windows)[:10]}")
    if max(plan.windows) > INT64_MAX:
        raise UserError(f"window {max(plan.windows)} is beyond {INT64_MAX}: a window file's checkpoint_window is int64")
    if not 0 <= plan.seed * SEED_STRIDE + max(plan.windows) <= INT64_MAX:
        raise UserError(f"--seed {plan.seed} must be at least 0 and at most {(INT64_MAX - max(plan.windows)) // SEED_STRIDE}"
                        f" (the noise's generator is seeded with seed x {SEED_STRIDE} + window, a 64-bit number)")
    taken = [w for w in plan.windows if (plan.out_dir / folder_name(w)).exists()]
    if taken:
        raise UserError(f"{plan.out_dir / folder_name(taken[0])} exists already: a published checkpoint is never "
                        f"rewritten (choose other windows or another --out)")
    if not (math.isfinite(plan.noise) and plan.noise >= 0):
        raise UserError(f"--noise must be a finite number, at least 0, got {plan.noise}")
    if not 0 <= plan.ready_every_s <= MAX_READY_EVERY_S:
        raise UserError(f"--ready-every {plan.ready_every_s:g} must be from 0 to {MAX_READY_EVERY_S:g} seconds")
    if plan.model_name is not None:
        try:
            plan.model_name.format(window=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise UserError(f"--model-name {plan.model_name!r}: the only field it may name is {{window}} ({exc!r})") from None
    try:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {plan.out_dir} ({exc.strerror or exc})") from None


def perturbed(tensors: dict[str, torch.Tensor], noise: float, seed: int, window: int) -> dict[str, torch.Tensor]:
    """Each tensor plus N(0, (noise × its spread)²) noise, drawn in float32 from (seed, window), in its own dtype; the
    spread is its standard deviation, or its mean magnitude where it is constant (a norm's ones)."""
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + window)
    out = {}
    for name in sorted(tensors):
        t = tensors[name].float()
        spread = t.std().item() if t.numel() > 1 else 0.0
        spread = spread if spread > 0 else t.abs().mean().item()
        out[name] = (t + torch.randn(t.shape, generator=generator) * (noise * spread)).to(tensors[name].dtype)
        if not torch.isfinite(out[name]).all():  # e.g. --noise 1e308: a checkpoint no model can run
            raise UserError(f"--noise {noise:g} makes tensor {name} infinite in {tensors[name].dtype} "
                            f"(its spread is {spread:.3g}): choose a smaller --noise")
    return out


def write_series(plan: SeriesPlan, sleep: Callable[[float], None] = time.sleep) -> list[Path]:
    """Write every checkpoint of the plan (each whole, then marked ready); their folders."""
    check_plan(plan)
    base = base_checkpoint(plan.model)
    base_meta = checkpoint_metadata(base)
    tensors = load_file(str(base / WEIGHTS))
    written = []
    for i, window in enumerate(plan.windows):
        if i and plan.ready_every_s:
            sleep(plan.ready_every_s)
        name = (plan.model_name or str(base_meta.get("model_name") or plan.model)).format(window=window)
        metadata = dict(model_name=name, window=window, base=str(base), base_model_name=base_meta.get("model_name"),
                        noise=plan.noise, seed=plan.seed, written_by=f"grail-pipeline {__version__} make-checkpoints")
        if "preset" in base_meta:  # still random weights: checks that need a trained model say so (window_check.py)
            metadata["preset"] = base_meta["preset"]
        written.append(_write_checkpoint(plan.out_dir / folder_name(window), base,
                                         perturbed(tensors, plan.noise, plan.seed, window), metadata))
        log.info("checkpoint %d ready: %s (%s)", window, written[-1], name)
    return written


def _write_checkpoint(final: Path, base: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """One checkpoint folder: written under a temporary name, fsynced, renamed, then its ready marker."""
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.mkdir()
        for item in base.iterdir():  # config, generation config, tokenizer: everything but the weights and metadata
            if item.is_file() and item.name not in (WEIGHTS, METADATA) and not item.name.endswith(".safetensors"):
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        publish_directory(tmp, final)
    except OSError as exc:  # a full disk: copy2's error names the file it copied from, not where it failed
        raise UserError(f"cannot write the checkpoint {final} ({exc.strerror or exc}); nothing of it is left") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    write_atomically(final / READY_MARKER, b"")
    return final


def windows_from(spec: str | None, count: int | None, first: int, every_blocks: int) -> tuple[int, ...]:
    """`--windows 0,30,60`, or `--count N` windows `first`, `first + every_blocks`, …; one of the two."""
    if (spec is None) == (count is None):
        raise UserError("give either --windows LIST or --count N")
    if spec is not None:
        windows = tuple(parse_whole(part) for part in spec.split(",") if part.strip())
        if None in windows:
            raise UserError(f"--windows {spec!r} must be a comma list of whole numbers (window start blocks)")
        return windows  # type: ignore[return-value]
    if (count or 0) > MAX_SERIES:
        raise UserError(f"--count {count} is more than {MAX_SERIES} checkpoints")
    return tuple(first + i * every_blocks for i in range(count or 0))
