"""Model families: one module per decoder family, chosen from a transformers config.

The families here share one decoder (decoder.py: the sizes, the engine's fused weights and math, the
rotary table, the prover's op-for-op sequence and its per-row functions), which reads what differs between
them (q/k/v biases, per-head q/k norms, head_dim, a tied or untied head) from the modules. A family module
states which configs it runs (`unsupported(config)`), by model type and by what the shared decoder does not
do. A family with other math would bring a decoder module of its own; nothing else names a family.
"""

from __future__ import annotations

from types import ModuleType

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.models import llama, qwen2, qwen3

FAMILIES = (qwen2, qwen3, llama)


def find_family(config) -> ModuleType | None:
    """The family that runs a transformers config, or None. Reads the config only, so it can be asked before
    any weights are loaded (a config from `AutoConfig.from_pretrained` or `checkpoints.dummy_config`)."""
    return next((family for family in FAMILIES if family.unsupported(config) is None), None)


def why_not_fast(config) -> str | None:
    """Why the fast engine cannot run a config, as one line (None: a family runs it)."""
    if find_family(config) is not None:
        return None
    names = ", ".join(f.NAME for f in FAMILIES[:-1]) + f" and {FAMILIES[-1].NAME}"
    reasons = [f.unsupported(config) for f in FAMILIES if config.model_type in f.MODEL_TYPES]
    why = f" ({reasons[0]})" if reasons else ""
    return f"the fast engine runs {names} models; '{config.model_type}' needs --engine hf{why}"


def family_for(config) -> ModuleType:
    """`find_family`, where no family is a UserError that says why."""
    family = find_family(config)
    if family is None:
        raise UserError(why_not_fast(config))
    return family
