"""A new checkpoint of the same architecture copied into a loaded model's existing tensors, in place.

Why in place: the fast engine's fused weights are the storage the transformers modules view
(models/decoder.py `fuse_weights` sets each q/k/v, gate/up parameter's `.data` to a slice of one fused
tensor), its CUDA graphs hold those tensors' addresses, and its compiled kernels take them as inputs. A
`copy_` into each parameter writes the engine's storage: the same addresses, new numbers, so nothing is
recompiled or recaptured, and the prover, which runs the transformers modules, sees the same numbers.

Why tensor by tensor from host memory: the checkpoint is read one tensor at a time from its safetensors
files (memory-mapped) and copied straight into the parameter, so the GPU never holds a second copy of
the weights. The copy gives the numbers `from_pretrained` gives (bf16 on the GPU: the same bits; float32 on
the CPU: bf16 widened exactly, as `from_pretrained` widens it).

A checkpoint whose config differs in anything but its name, dtype or writer, or whose tensors differ in
name or shape, is refused before a single tensor is written (`WeightsMismatch`): the caller restarts the
engine for it instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedModel

# config fields that say nothing about the architecture (where it was loaded from, the dtype it was saved in,
# the transformers version that wrote it)
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "dtype", "torch_dtype", "transformers_version"})


class WeightsMismatch(ValueError):
    """The checkpoint is not the loaded model's architecture (config or tensor shapes): one line says where."""


@dataclass(frozen=True)
class CopyReport:
    """What a copy did: tensors and bytes read from the checkpoint, and how long it took (read and copy)."""

    tensors: int
    bytes: int
    seconds: float


def architecture_difference(model: PreTrainedModel, directory: str | Path) -> str | None:
    """Why the checkpoint in `directory` is another architecture than `model` (None: the same), from its config.json."""
    try:
        theirs = AutoConfig.from_pretrained(str(directory)).to_dict()
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise WeightsMismatch(f"{directory}: no readable config.json ({reason})") from None
    ours = model.config.to_dict()
    for key in sorted((set(ours) | set(theirs)) - IGNORED_CONFIG_KEYS):
        if ours.get(key) != theirs.get(key):
            return f"config {key}: {theirs.get(key)!r} where the loaded model has {ours.get(key)!r}"
    return None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [directory / name for name in sorted(set(weight_map.values()))]
    return sorted(directory.glob("*.safetensors"))


def copy_checkpoint_weights(model: PreTrainedModel, directory: str | Path) -> CopyReport:
    """Copy the checkpoint in `directory` into `model`'s tensors; WeightsMismatch (nothing written) where it does
    not fit. The caller makes sure nothing runs on the model meanwhile (on a GPU: no kernel queued on it)."""
    directory = Path(directory)
    why = architecture_difference(model, directory)
    if why is not None:
        raise WeightsMismatch(f"{directory} is another architecture ({why})")
    files = _safetensors_files(directory)
    if not files:
        raise WeightsMismatch(f"{directory} holds no .safetensors file")
    targets = model.state_dict(keep_vars=True)  # parameters and persistent buffers by name (a tied head twice)
    t0 = time.perf_counter()
    handles = [safe_open(str(path), framework="pt", device="cpu") for path in files]
    where: dict[str, object] = {}
    for handle in handles:  # every name and shape checked before anything is written
        for key in handle.keys():
            target = targets.get(key)
            if target is None:
                raise WeightsMismatch(f"{directory}: tensor {key} is not a tensor of the loaded model")
            shape = list(handle.get_slice(key).get_shape())
            if shape != list(target.shape):
                raise WeightsMismatch(f"{directory}: tensor {key} has shape {shape}, the loaded model's {list(target.shape)}")
            where[key] = handle
    covered = {targets[key].data_ptr() for key in where}
    missing = [key for key, t in targets.items() if t.data_ptr() not in covered and isinstance(t, torch.nn.Parameter)]
    if missing:
        raise WeightsMismatch(f"{directory}: no tensor for {missing[0]} ({len(missing)} parameter(s) missing)")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # whatever the engine queued last has finished reading the old numbers
    nbytes = 0
    with torch.no_grad():
        for key, handle in where.items():
            tensor = handle.get_tensor(key)  # type: ignore[attr-defined]
            targets[key].copy_(tensor)
            nbytes += tensor.numel() * tensor.element_size()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return CopyReport(len(where), nbytes, time.perf_counter() - t0)
