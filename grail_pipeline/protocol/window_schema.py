"""The window file's rule for every field of a row and of its metadata, in one place: what a file read from
outside (another miner's, a damaged one, a hostile one) must satisfy before any check reads it.

Parquet's schema (records.INFERENCE_SCHEMA) fixes the columns' types but lets any value be null, and three
fields are JSON text whose contents it does not type at all (commitments, beacon, trajectory): a row with a
null `commit`, integer commitments or a beacon that is a list passes Parquet and then broke whatever check
read it first. Each decoded row is validated here with pydantic (strict: no coercion, so `True` is not an
id and "3" is not a length) against the shape `build_rollout_record` makes and F's pydantic `Commit` schema
reads; a row that fails is one failed check at its file row, and no later check sees it. Pydantic because
it is the library made for this (F's validator uses it for the same schema), its errors name the field's
path, and its core is compiled: a W1 row of 700 commitments validates in about 0.2 ms.

Bounds that belong to the protocol, not to a check, are here too: token ids are unsigned 32-bit (the commit
binding packs them as big-endian uint32), a sketch is a residue mod the protocol's prime (one beyond int64
broke the proof check's tensor), lengths and indices cannot be negative, rewards and advantages are finite (a
NaN advantage would pass the group check's `abs(sum) > tol` comparison).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import MalformedRow

STRICT = ConfigDict(strict=True, allow_inf_nan=False)
NonNegative = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0, lt=2**32)]


@with_config(STRICT)
class Commitment(TypedDict):
    sketch: Annotated[int, Field(ge=0, lt=PROFILE.prime_q)]  # a sketch is a residue mod q (sketches.py)
    indices: list[NonNegative]  # below the model's hidden size: the proof check's rule (it knows the model)
    position: NonNegative


@with_config(STRICT)
class ModelField(TypedDict):
    name: str
    layer_index: int


@with_config(STRICT)
class Beacon(TypedDict):
    randomness: str


@with_config(STRICT)
class Rollout(TypedDict):
    trajectory: list[Any]  # F writes [[0, assignment, reward]]; no check reads further (U drops it)
    total_reward: float
    advantage: float
    success: bool
    token_logprobs: list[Annotated[float, Field(allow_inf_nan=True)]]  # judged by the proof check
    prompt_length: NonNegative
    completion_length: NonNegative
    satisfied_clauses: int
    assignment: list[bool]


@with_config(STRICT)
class Commit(TypedDict):
    tokens: list[TokenId]
    commitments: list[Commitment]
    proof_version: str
    model: ModelField
    signature: str
    beacon: Beacon
    rollout: Rollout


@with_config(STRICT)
class Row(TypedDict):
    window_start: NonNegative
    block: NonNegative
    nonce: int
    block_hash: str
    randomness: str
    use_drand: bool
    rollout_group: NonNegative
    rollout_index: NonNegative
    total_in_group: int
    checkpoint_window: NonNegative
    commit: Commit
    timestamp: float
    challenge: str
    hotkey: str
    signature: str


_ROW = TypeAdapter(Row)
_WHOLE = re.compile(r"[0-9]{1,18}")  # a window number as the metadata's text; 18 digits stay inside int64


def row_problem(record: Any) -> str | None:
    """Why a row read from a window file breaks the protocol's schema (its first problem, with the field's
    path; a MalformedRow's own reason), or None."""
    if isinstance(record, MalformedRow):
        return record.problem
    try:
        _ROW.validate_python(record)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "row"
        got = repr(first.get("input"))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{where}: {first['msg'].lower()}, got {got[:40] + '…' if len(got) > 40 else got}{more}"
    return None


def metadata_problems(metadata: Mapping[str, str]) -> list[str]:
    """What is wrong with a window file's numeric metadata (the keys' presence and the wallet are the metadata
    check's). Values that were not UTF-8 arrive with backslash escapes (records.read_window_file) and fail here."""
    problems = []
    for key in ("window_start", "window_length", "inference_count"):
        value = metadata.get(key)
        if value is not None and not _WHOLE.fullmatch(value):
            problems.append(f"metadata {key} {value[:40]!r} is not a whole number")
        elif key == "window_length" and value is not None and int(value) < 1:
            problems.append("metadata window_length is 0: a window has at least one block")
    return problems


def metadata_window(metadata: Mapping[str, str]) -> int | None:
    """The metadata's window_start as a number, None where it is absent or not a whole number."""
    value = metadata.get("window_start")
    return int(value) if value is not None and _WHOLE.fullmatch(value) else None
