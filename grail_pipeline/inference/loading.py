"""Loading the policy model: a hub id, a local checkpoint, or a random-initialised preset.

Dummy presets (inference/model_ref.py) carry the exact architecture of the model they stand in for, so
that speed and memory measured on them hold for the real weights (the values do not change the arithmetic).
"""

from __future__ import annotations

import copy
import logging
import os
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
from grail_pipeline.inference.model_ref import PRESETS, ModelRef, parse_model_ref, unavailable
from grail_pipeline.protocol.tokenizer import CHAT_TEMPLATE, builtin_tokenizer

log = logging.getLogger("grail_pipeline")

DUMMY_SEED = 1234


@dataclass
class LoadedModel:
    """A model ready for generation and proofs, with the name that goes into every commit."""

    model: PreTrainedModel
    name: str
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


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


def dummy_config(preset: str) -> PreTrainedConfig:
    """The transformers config of a preset (model_ref.PRESETS), its fields copied: the table stays as written."""
    entry = PRESETS[preset]
    return AutoConfig.for_model(entry.model_type, **copy.deepcopy(dict(entry.config)))


def attention_implementation(device: torch.device, env: dict[str, str] | None = None) -> str:
    """`GRAIL_USE_FLASH_ATTENTION=1` asks for flash-attention 2 where it can run; otherwise sdpa."""
    env = os.environ if env is None else env
    if env.get("GRAIL_USE_FLASH_ATTENTION", "0") != "1":
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


def wants_multi_gpu(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("GRAIL_MULTI_GPU", "0") == "1" and torch.cuda.device_count() > 1


def load_model(model: str, device: str = "auto") -> LoadedModel:
    """Load `--model` for inference: bf16 on GPU, float32 on CPU, eval mode, no gradients."""
    ref = parse_model_ref(model)
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    attn = attention_implementation(dev)
    multi = dev.type == "cuda" and wants_multi_gpu()
    if ref.is_dummy:
        net = _build_dummy(ref, dev, dtype, attn, multi)
        name = ref.raw
    else:
        net = _load_pretrained(ref, dev, dtype, attn, multi)
        name = str(net.name_or_path or ref.raw)
    net.eval()
    net.requires_grad_(False)
    if multi:
        dev = torch.device("cuda:0")  # inputs go to the first shard
    return LoadedModel(model=net, name=name, device=dev, dtype=dtype, attn_implementation=attn)


def _build_dummy(ref: ModelRef, dev: torch.device, dtype: torch.dtype, attn: str, multi: bool) -> PreTrainedModel:
    config = dummy_config(ref.preset or "tiny")
    torch.manual_seed(DUMMY_SEED)
    build_device = torch.device("cpu") if multi else dev
    with torch.device(build_device):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    if multi:
        return _spread_over_gpus(net)
    return net


def _load_pretrained(ref: ModelRef, dev: torch.device, dtype: torch.dtype, attn: str, multi: bool) -> PreTrainedModel:
    kwargs: dict = dict(dtype=dtype, attn_implementation=attn, use_safetensors=True)
    if multi:
        kwargs["device_map"] = "auto"
    try:
        net = AutoModelForCausalLM.from_pretrained(ref.raw, **kwargs)
    except (OSError, ValueError) as exc:
        raise unavailable(ref, exc) from None
    return net if multi else net.to(dev)


def _spread_over_gpus(net: PreTrainedModel) -> PreTrainedModel:
    """One model over all visible GPUs (`GRAIL_MULTI_GPU=1`), layer by layer."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise UserError("GRAIL_MULTI_GPU=1 needs the 'accelerate' package (pip install accelerate)") from None
    device_map = infer_auto_device_map(net, no_split_module_classes=net._no_split_modules)
    return dispatch_model(net, device_map=device_map)


def load_tokenizer(model_ref: str) -> PreTrainedTokenizerFast:
    """The tokenizer for a `--model` value, with the protocol chat template, as the miner sets it up."""
    ref = parse_model_ref(model_ref)
    if ref.is_dummy:
        return builtin_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.raw)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "not loadable here"
        raise unavailable(ref, exc) from exc
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
