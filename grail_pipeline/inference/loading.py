"""Loading the policy model: a hub id, a local checkpoint, or a random-initialised preset, all one way.

Every model is loaded as the protocol's `get_model` and every validator load it: `from_pretrained` with
bf16 (float32 on the CPU) into host memory, then `.to(device)`. A dummy preset (inference/model_ref.py)
is first written as a checkpoint directory (inference/checkpoints.py says why) and then loaded from it
like any other. The name that goes into every commit is the checkpoint's `metadata.json` `model_name`
where it has one (as `get_model` sets it), else the path or hub id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.checkpoints import (
    check_checkpoint,
    checkpoint_metadata,
    checkpoint_window_of,
    dummy_checkpoint,
    dummy_config,
    transformers_progress_off,
)
from grail_pipeline.inference.model_ref import ModelRef, parse_model_ref, unavailable
from grail_pipeline.protocol.tokenizer import CHAT_TEMPLATE, builtin_tokenizer

log = logging.getLogger("grail_pipeline")


@dataclass
class LoadedModel:
    """A model ready for generation and proofs, with the name that goes into every commit.

    `source` is what `from_pretrained` was given (a checkpoint directory or a hub id): a check that must
    not share state with this object loads its own model from there (proving/validator_process.py).
    """

    model: PreTrainedModel
    name: str
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    source: str
    checkpoint_window: int = 0  # metadata.json `window`: every rollout mined with this model names it

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


@dataclass(frozen=True)
class CheckpointSource:
    """What `--model` names, known before any weight loads: the directory or hub id `from_pretrained` reads, the
    name every commit carries and the checkpoint's window (a fleet refuses a worker on another one by these,
    before it spends seconds to minutes loading)."""

    source: str
    name: str
    checkpoint_window: int


def checkpoint_source(model: str) -> CheckpointSource:
    """`--model` resolved to its checkpoint (a dummy preset's written once first) and its metadata."""
    ref = parse_model_ref(model)
    source = str(dummy_checkpoint(ref.preset)) if ref.preset else ref.raw
    metadata = checkpoint_metadata(source)
    return CheckpointSource(source, str(metadata.get("model_name") or source), checkpoint_window_of(metadata))


def resolve_device(device: str) -> torch.device:
    """`auto` picks the first GPU when there is one; an unusable device is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device '{device}' ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device '{device}' is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but no CUDA GPU is visible")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        visible = ("1 GPU is visible (cuda:0)" if count == 1
                   else f"{count} GPUs are visible (cuda:0 to cuda:{count - 1})")
        raise UserError(f"device '{device}' requested but only {visible}")
    return dev


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (any case; unset is off). Anything else
    is one line: `GRAIL_USE_FLASH_ATTENTION=true` used to mean off without a word."""
    value = env.get(name, "").strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise UserError(f"{name}={env[name]!r} must be 1 or 0 (true/false, yes/no, on/off)")


def attention_implementation(device: torch.device, env: Mapping[str, str] | None = None) -> str:
    """`GRAIL_USE_FLASH_ATTENTION=1` asks for flash-attention 2 where it can run; otherwise sdpa."""
    env = os.environ if env is None else env
    if not env_flag(env, "GRAIL_USE_FLASH_ATTENTION"):
        return "sdpa"
    if device.type != "cuda":
        log.warning("GRAIL_USE_FLASH_ATTENTION=1 ignored: flash-attention needs a CUDA GPU; using sdpa")
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        log.warning("GRAIL_USE_FLASH_ATTENTION=1 but flash-attn is not installed; using sdpa")
        return "sdpa"
    return "flash_attention_2"


def wants_multi_gpu(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env_flag(env, "GRAIL_MULTI_GPU") and torch.cuda.device_count() > 1


def load_config(model: str) -> PreTrainedConfig:
    """The transformers config of a `--model` value without its weights: what the engine choice reads first."""
    ref = parse_model_ref(model)
    if ref.preset:
        return dummy_config(ref.preset)
    if ref.kind == "local":
        check_checkpoint(ref.raw)  # a damaged checkpoint is one line before anything else reads it
    try:
        return AutoConfig.from_pretrained(ref.raw)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "not loadable here"
        raise unavailable(ref, exc) from None


def vocab_size_of(config: PreTrainedConfig) -> int | None:
    """The model's vocabulary (its embedding's rows), on the config or its text_config (multimodal configs)."""
    for part in (config, getattr(config, "text_config", None)):
        value = getattr(part, "vocab_size", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model loads in on `device`: bf16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(model: str, device: str | torch.device = "auto",
               checkpoint: CheckpointSource | None = None) -> LoadedModel:
    """Load `--model` for inference: bf16 on GPU, float32 on CPU, eval mode, no gradients. `device` and
    `checkpoint` may come resolved already (mining/choices.py)."""
    ref = parse_model_ref(model)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = model_dtype(dev)
    attn = attention_implementation(dev)
    multi = dev.type == "cuda" and wants_multi_gpu()
    checkpoint = checkpoint or checkpoint_source(model)
    if ref.kind == "local":
        check_checkpoint(checkpoint.source)
    net = _load_pretrained(ref, checkpoint.source, dev, dtype, attn, multi)
    net.eval()
    net.requires_grad_(False)
    if multi:
        dev = torch.device("cuda:0")  # inputs go to the first shard
    return LoadedModel(model=net, name=checkpoint.name, device=dev, dtype=dtype, attn_implementation=attn,
                       source=checkpoint.source, checkpoint_window=checkpoint.checkpoint_window)


def _load_pretrained(ref: ModelRef, source: str, dev: torch.device, dtype: torch.dtype, attn: str,
                     multi: bool) -> PreTrainedModel:
    """`from_pretrained` into host memory, then the device (`GRAIL_MULTI_GPU=1`: spread over every GPU)."""
    kwargs: dict = dict(dtype=dtype, attn_implementation=attn, use_safetensors=True)
    if multi:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise UserError("GRAIL_MULTI_GPU=1 needs the 'accelerate' package (pip install accelerate)") from None
        kwargs["device_map"] = "auto"
    try:
        with transformers_progress_off():
            net = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # a checkpoint from outside fails in transformers' own ways (OSError, ValueError, ...)
        raise unavailable(ref, exc) from None
    return net if multi else net.to(dev)


def load_tokenizer(model_ref: str) -> PreTrainedTokenizerFast:
    """The tokenizer for a `--model` value, with the protocol chat template, as the miner sets it up."""
    ref = parse_model_ref(model_ref)
    if ref.is_dummy:
        return builtin_tokenizer()
    if ref.kind == "local":
        check_checkpoint(ref.raw)  # the tokenizer reads config.json too
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.raw)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "not loadable here"
        raise unavailable(ref, exc) from exc
    if len(tokenizer) <= 1 or tokenizer.eos_token_id is None:  # what a directory without tokenizer files loads
        raise UserError(f"model '{ref.raw}' has no tokenizer ({len(tokenizer)} token(s) loaded): the checkpoint "
                        f"needs its tokenizer files (tokenizer.json, tokenizer_config.json)")
    try:
        vocab = vocab_size_of(load_config(model_ref))
    except UserError:  # a tokenizer without a model's config (verify --skip-proofs reads only the tokenizer)
        vocab = None
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"model '{ref.raw}' embeds {vocab} token ids but its tokenizer has {len(tokenizer)}: prompts "
                        f"would hold ids the model cannot embed (a vocab_size or a tokenizer of another model)")
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
