"""Model families: one module per decoder family, chosen from a transformers config.

A family module holds everything the fast engine and the prefix prover know about its decoder: the
`unsupported(config)` check, the sizes (`Dims`), how the engine gets its fused weights from the
transformers modules (`fuse_weights`), the rotary table, the engine's math and the prover's op-for-op
sequence with the per-row functions it measures. A second family is a second module added to
`FAMILIES`; nothing else names a family.
"""

from __future__ import annotations

from types import ModuleType

from grail_pipeline.common.errors import UserError
from grail_pipeline.inference.models import qwen2

FAMILIES = (qwen2,)


def find_family(config) -> ModuleType | None:
    """The family that runs a transformers config, or None. Reads the config only, so it can be asked before
    any weights are loaded (a config from `AutoConfig.from_pretrained` or `checkpoints.dummy_config`)."""
    return next((family for family in FAMILIES if family.unsupported(config) is None), None)


def family_for(config) -> ModuleType:
    """`find_family`, where no family is a UserError that says why."""
    family = find_family(config)
    if family is not None:
        return family
    names = " and ".join(f.NAME for f in FAMILIES)
    reasons = [f.unsupported(config) for f in FAMILIES if f.MODEL_TYPE == config.model_type]
    why = f" ({reasons[0]})" if reasons else ""
    raise UserError(f"the fast engine runs {names} models; '{config.model_type}' needs --engine hf{why}")
