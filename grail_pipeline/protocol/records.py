"""The rollout record the miner uploads, and the window Parquet file that carries them.

Pure data: signatures come in as arguments (wallet.py makes them), so the shape of a record can be
tested without keys. The file layout is the reference's `INFERENCE_SCHEMA`, byte-compatible for
the validator's pyarrow reader. Files are written atomically: a crash at any point leaves either
the complete file or no file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grail_pipeline.common.atomic import AtomicFile, name_the_file
from grail_pipeline.common.errors import UserError
from grail_pipeline.common.input_file import not_a_regular_file
from grail_pipeline.protocol.profile import PROFILE, ProtocolProfile

_MODEL = pa.struct([("name", pa.string()), ("layer_index", pa.int32())])
_ROLLOUT = pa.struct([
    ("trajectory", pa.string()),  # JSON
    ("total_reward", pa.float64()),
    ("advantage", pa.float64()),
    ("success", pa.bool_()),
    ("token_logprobs", pa.list_(pa.float64())),
    ("prompt_length", pa.int32()),
    ("completion_length", pa.int32()),
    ("satisfied_clauses", pa.int32()),
    ("assignment", pa.list_(pa.bool_())),
])
_COMMIT = pa.struct([
    ("tokens", pa.list_(pa.int32())),
    ("commitments", pa.string()),  # JSON
    ("proof_version", pa.string()),
    ("model", _MODEL),
    ("signature", pa.string()),
    ("beacon", pa.string()),  # JSON
    ("rollout", _ROLLOUT),
])
INFERENCE_SCHEMA = pa.schema([
    ("window_start", pa.int64()),
    ("block", pa.int64()),
    ("nonce", pa.int64()),
    ("block_hash", pa.string()),
    ("randomness", pa.string()),
    ("use_drand", pa.bool_()),
    ("rollout_group", pa.int64()),
    ("rollout_index", pa.int32()),
    ("total_in_group", pa.int32()),
    ("checkpoint_window", pa.int64()),
    ("commit", _COMMIT),
    ("timestamp", pa.float64()),
    ("challenge", pa.string()),
    ("hotkey", pa.string()),
    ("signature", pa.string()),
])
"""One row per rollout (F `parquet_io.INFERENCE_SCHEMA`); window metadata is added when writing."""

_BINDING_ORDER = re.compile(rb'\{"indices":(\[[^\]]*\]),"position":(\d+),"sketch":(\d+)\}')


class EncodedCommitments(list):
    """A rollout's commitment dicts with their text in the file (`text`), made where the record is signed.

    The signer builds the commitments' sorted JSON for the commit binding anyway; the file's text is the
    same with each position's keys in the dicts' order, so `records_table` writes it instead of encoding
    hundreds of dicts again in the sink: on a W1 group (16 rollouts of 711 tokens) the sink's conversion
    took 35.4 ms of the parent's interpreter with the dicts and 1.3 ms with the text, for 9.6 ms of
    reordering in a signing worker; the text makes the pickled group 4.7 MB instead of 1.9 and its
    unpickling 25.7 ms instead of 22.2 (bench/host_levers.py, results/host_levers_cpu_2026-11-27.json,
    a shared 2-core CPU, best of 7: the figures move by tens of percent between runs). A plain list is encoded
    as before; the bytes of the file are the same either way (tests/test_commitments_text.py).
    """

    def __init__(self, commitments: Sequence[dict[str, Any]], text: str) -> None:
        super().__init__(commitments)
        self.text = text


def commitments_file_text(binding_json: bytes) -> str:
    """The file's text of commitments from their binding JSON (sorted keys, compact): `json.dumps(dicts,
    separators=(",", ":"))` of the dicts {"sketch", "indices", "position"}, byte for byte."""
    return _BINDING_ORDER.sub(rb'{"sketch":\3,"indices":\1,"position":\2}', binding_json).decode()


_JSON_FIELDS = frozenset({("commit", "commitments"), ("commit", "beacon"), ("commit", "rollout", "trajectory")})
REQUIRED_METADATA = ("wallet", "window_start", "window_length")


class WindowFileError(UserError):
    """A window file that cannot be read back (missing, truncated, corrupt, foreign schema)."""


def grpo_advantages(rewards: Sequence[float]) -> list[float]:
    """GRPO advantages as the validator recomputes them: (r − mean) / max(population std, 1e-8)."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [(r - mean) / max(std, 1e-8) for r in rewards]


def build_rollout_record(
    *,
    window_start: int,
    block: int,
    block_hash: str,
    randomness: str,
    use_drand: bool,
    checkpoint_window: int,
    rollout_group: int,
    rollout_index: int,
    total_in_group: int,
    nonce: int,
    tokens: Sequence[int],
    prompt_length: int,
    commitments: Sequence[dict[str, Any]],
    token_logprobs: Sequence[float],
    model_name: str,
    commit_signature: str,
    total_reward: float,
    advantage: float,
    success: bool,
    assignment: Sequence[bool],
    hotkey: str,
    challenge: str,
    signature: str,
    timestamp: float | None = None,
    profile: ProtocolProfile = PROFILE,
) -> dict[str, Any]:
    """One rollout exactly as F's miner packages it (`package_rollout_data` + `sign_rollout`).

    `commit_signature` is the hex signature over proof.commit_binding(...); `signature` the hex
    signature over `challenge` (wallet.rollout_challenge(block_hash, nonce)). `randomness` is the
    combined beacon hex, stored both at the top level and as `commit.beacon.randomness`.
    """
    if not len(tokens) == len(commitments) == len(token_logprobs):
        raise ValueError(f"tokens ({len(tokens)}), commitments ({len(commitments)}) and token_logprobs "
                         f"({len(token_logprobs)}) must have one entry per position")
    if not 0 < prompt_length < len(tokens):
        raise ValueError(f"prompt_length {prompt_length} must leave a completion in {len(tokens)} tokens")
    assignment = [bool(a) for a in assignment]
    return {
        "window_start": int(window_start),
        "block": int(block),
        "nonce": int(nonce),
        "block_hash": block_hash,
        "randomness": randomness,
        "use_drand": bool(use_drand),
        "rollout_group": int(rollout_group),
        "rollout_index": int(rollout_index),
        "total_in_group": int(total_in_group),
        "checkpoint_window": int(checkpoint_window),
        "commit": {
            "tokens": [int(t) for t in tokens],
            "commitments": commitments if isinstance(commitments, EncodedCommitments) else list(commitments),
            "proof_version": profile.proof_version,
            "model": {"name": model_name, "layer_index": profile.layer_index},
            "signature": commit_signature,
            "beacon": {"randomness": randomness},
            "rollout": {
                "trajectory": [[0, assignment, float(total_reward)]],
                "total_reward": float(total_reward),
                "advantage": float(advantage),
                "success": bool(success),
                "token_logprobs": [float(lp) for lp in token_logprobs],
                "prompt_length": int(prompt_length),
                "completion_length": len(tokens) - int(prompt_length),
                "satisfied_clauses": 0,  # the reference always sends 0; no check reads it
                "assignment": assignment,
            },
        },
        "timestamp": time.time() if timestamp is None else float(timestamp),
        "challenge": challenge,
        "hotkey": hotkey,
        "signature": signature,
    }


def _encode(value: Mapping[str, Any], struct: pa.Schema | pa.StructType, path: tuple[str, ...] = ()) -> dict:
    """A record as a Parquet row: the schema's keys exactly (a typo fails here), JSON fields as text."""
    fields = list(struct)  # a schema and a struct type both iterate over their fields
    names = [f.name for f in fields]
    if set(value) != set(names):
        where = ".".join(path) or "record"
        raise ValueError(f"{where}: missing {sorted(set(names) - set(value))}, unexpected {sorted(set(value) - set(names))}")
    row = {}
    for f in fields:
        key = (*path, f.name)
        if key in _JSON_FIELDS:
            text = getattr(value[f.name], "text", None)  # EncodedCommitments: encoded where it was signed
            row[f.name] = text if text is not None else json.dumps(value[f.name], separators=(",", ":"))
        elif pa.types.is_struct(f.type):
            row[f.name] = _encode(value[f.name], f.type, key)
        else:
            row[f.name] = value[f.name]
    return row


def _decode(row: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """The inverse of _encode: JSON text back to lists and dicts, nested structs recursively.

    Raises ValueError naming the field when its text is not JSON, or is nested too deep to decode."""
    for name, value in row.items():
        key = (*path, name)
        if key in _JSON_FIELDS:
            try:
                row[name] = json.loads(value) if isinstance(value, str) else value
            except (ValueError, RecursionError) as exc:
                detail = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
                raise ValueError(f"{'.'.join(key)} is not JSON ({detail[:80]})") from None
        elif isinstance(value, dict):
            _decode(value, key)
    return row


@dataclass(frozen=True)
class MalformedRow:
    """A row of a window file that cannot be decoded (a JSON field that is not JSON): where it is and why.

    read_window_file keeps it in its place so that `verify` reports it as a failed check at its file row;
    window_schema.row_problem judges every row that did decode."""

    row: int
    problem: str


def records_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Records as rows of INFERENCE_SCHEMA, without window metadata.

    A window's groups can be converted as they arrive (Arrow holds them far more compactly than the
    record dicts) and concatenated in file order for write_window_table.
    """
    return pa.Table.from_pylist([_encode(r, INFERENCE_SCHEMA) for r in records], schema=INFERENCE_SCHEMA)


def table_records(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of INFERENCE_SCHEMA back as records, shaped as build_rollout_record makes them (the inverse of
    records_table), for rows this process converted itself: a row whose JSON fields do not decode raises
    ValueError (read_window_file, reading a file from outside, keeps such a row as a MalformedRow instead)."""
    return [_decode(row) for row in table.to_pylist()]


def _file_metadata(metadata: Mapping[str, object], rows: int) -> dict[str, str]:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"window metadata needs {missing}")
    meta = {"timestamp": time.time(), **metadata, "inference_count": rows}
    return {str(k): str(v) for k, v in meta.items()}


# Rows per Parquet row group of a window file. A column chunk whose strings pass 2 GiB cannot be read back
# whole: pyarrow's reader (pq.read_table, what the validator and `verify` call) then fails with "Nested data
# conversions not implemented for chunked array outputs", because `commit` is a struct and its JSON
# `commitments` (~120 KB per W1 rollout before compression) overflow one chunk. Measured on an H200
# (bench/results/h200-2026-12-02/window-credit/): a 360-s W1 window at 512 slots wrote 18,416 rollouts in one
# row group and `verify` could not read the file. 1,024 rows keep a row group under ~400 MB of JSON even at
# the protocol's longest rollouts (2,048 new tokens), and any number of row groups reads back as one table.
ROW_GROUP_ROWS = 1024
WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": True, "write_statistics": True}


def write_window_file(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]],
                      metadata: Mapping[str, object]) -> None:
    """Write the window's rollouts atomically: temp file, fsync, rename, fsync of the directory.

    `metadata` needs wallet, window_start and window_length; timestamp defaults to now,
    inference_count is always len(records), and any extra keys (worker_id, partial) are kept as
    strings. The temp name is hidden and does not end in .parquet, so no reader picks it up.
    """
    write_window_table(path, records_table(records), metadata)  # conversion errors happen before any file exists


def write_window_table(path: str | os.PathLike[str], table: pa.Table, metadata: Mapping[str, object]) -> None:
    """write_window_file for rows already converted with records_table (and concatenated in file order)."""
    WindowFileWriter(path).finish(metadata, [table])


class WindowFileWriter:
    """A window file written as its rows arrive (`append`, in file order): each full row group is encoded at once,
    and `finish` adds the last one and the footer, with the metadata known only then (inference_count, what was
    cut). The cut then waits for fewer than ROW_GROUP_ROWS rows instead of the whole file: a 360-s W1 window's
    18,416 rows took 9.7-10.1 s to write on the H200's host (bench/NOTES.md), seconds the deadline plan kept
    free of generation. The bytes are `pq.write_table(table, row_group_size=ROW_GROUP_ROWS, **WRITE_OPTIONS)`'s
    (tests/test_records.py compares them): the same row groups, then a footer rebuilt around their metadata with
    the final schema. Rebuilt, because pyarrow reads a file's schema metadata from the Arrow schema serialised
    when its writer opened: metadata added at close reaches the footer but not `read_table().schema.metadata`,
    where our reader and the validator look (checked with pyarrow 26). Published atomically (common/atomic.py);
    a failure or `abort` removes the temporary.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.rows = 0  # given so far
        self.encoded_rows = 0  # in the row groups written so far
        self._pending: list[pa.Table] = []  # given, not yet in a row group
        self._pending_rows = 0
        self._file: AtomicFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._closed = False  # written or aborted: nothing more may be added

    def append(self, tables: Sequence[pa.Table]) -> None:
        """Rows of INFERENCE_SCHEMA (any metadata ignored), in file order after those given before."""
        if self._closed:
            raise RuntimeError(f"the writer of {self.path} is closed (written or aborted)")
        try:
            for table in tables:
                if not table.schema.remove_metadata().equals(INFERENCE_SCHEMA):
                    raise ValueError("window table does not have the GRAIL window schema")
                if table.num_rows:
                    self._pending.append(table)
                    self._pending_rows += table.num_rows
                    self.rows += table.num_rows
            self._encode(last=False)
        except BaseException as exc:
            self.abort()
            name_the_file(exc, self.path)
            raise

    def finish(self, metadata: Mapping[str, object], tables: Sequence[pa.Table] = ()) -> None:
        """The rest of the rows (`tables`), the footer with `metadata` (as write_window_file takes it), and the file
        in place under its final name."""
        try:
            file_metadata = _file_metadata(metadata, self.rows + sum(t.num_rows for t in tables))
            self.append(tables)
            self._close(file_metadata)
        except BaseException as exc:
            self.abort()
            name_the_file(exc, self.path)
            raise

    def abort(self) -> None:
        """Remove the temporary (a window given up, or a failed write); nothing is left under either name."""
        if self._writer is not None and self._writer.is_open:
            with contextlib.suppress(pa.ArrowException, OSError):  # a writer left open closes at exit, onto nothing
                self._writer.close()
        if self._file is not None:
            self._file.abort()
        self._file = self._writer = None
        self._closed = True

    def _parquet(self) -> pq.ParquetWriter:
        if self._writer is None:
            self._file = AtomicFile(self.path)
            self._writer = pq.ParquetWriter(self._file.handle, INFERENCE_SCHEMA, **WRITE_OPTIONS)
        return self._writer

    def _encode(self, last: bool) -> None:
        while self._pending_rows >= ROW_GROUP_ROWS or (last and self._pending_rows):
            table = pa.concat_tables(self._pending)  # no copy: the chunks as given, as write_table would see them
            group = min(ROW_GROUP_ROWS, table.num_rows)
            self._parquet().write_table(table.slice(0, group), row_group_size=ROW_GROUP_ROWS)
            self.encoded_rows += group
            rest = table.slice(group)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            if not last:  # on disk now, so that the cut's fsync waits for the last row group only
                self._file.handle.flush()
                os.fsync(self._file.handle.fileno())

    def _close(self, file_metadata: dict[str, str]) -> None:
        self._encode(True)
        writer = self._parquet()
        if self.rows == 0:
            writer.write_table(INFERENCE_SCHEMA.empty_table())  # one empty row group, as write_table writes
        writer.close()  # the row groups, then a footer with the schema the writer opened with
        handle = self._file.handle
        end = handle.seek(0, os.SEEK_END)
        handle.seek(end - 8)
        body = end - 8 - int.from_bytes(handle.read(4), "little")
        handle.seek(0)
        row_groups = pq.read_metadata(handle)
        empty = io.BytesIO()
        pq.ParquetWriter(empty, INFERENCE_SCHEMA.with_metadata(file_metadata), **WRITE_OPTIONS).close()
        footer = pq.read_metadata(io.BytesIO(empty.getvalue()))  # the final schema, no row group
        footer.append_row_groups(row_groups)
        rebuilt = io.BytesIO()
        footer.write_metadata_file(rebuilt)  # magic, footer, its length, magic
        handle.truncate(body)
        handle.seek(body)
        handle.write(rebuilt.getvalue()[4:])
        self._file.publish()
        self._file = self._writer = None
        self._closed = True


def read_window_file(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any] | MalformedRow], dict[str, str]]:
    """The records (shaped as build_rollout_record makes them) and the string metadata of a window file.

    A row whose JSON fields do not decode is a MalformedRow in its place; what the decoded rows hold is
    not checked here (window_schema.row_problem is the rule). Metadata that is not UTF-8 is decoded with
    backslash escapes, so that it can be shown and fails the metadata rules instead of raising. Anything
    but a regular file is refused before it is opened (a FIFO would block the reader forever).
    """
    problem = not_a_regular_file(path)
    if problem is not None:
        raise WindowFileError(f"window file {path} {problem}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WindowFileError(f"window file {path} is not a readable Parquet file ({reason[:160]})") from None
    if not table.schema.remove_metadata().equals(INFERENCE_SCHEMA):
        raise WindowFileError(f"window file {path} does not have the GRAIL window schema")
    metadata = {k.decode(errors="backslashreplace"): v.decode(errors="backslashreplace")
                for k, v in (table.schema.metadata or {}).items()}
    records: list[dict[str, Any] | MalformedRow] = []
    for i, row in enumerate(table.to_pylist()):
        try:
            records.append(_decode(row))
        except ValueError as exc:
            records.append(MalformedRow(i, str(exc)))
    return records, metadata

