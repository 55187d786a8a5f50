"""A signed group as the bytes a fleet stores in Redis: its Arrow rows as one IPC stream, its counts beside them.

A worker converts the group's records to rows of the window file's schema once (`records_table`, what the
solo sink keeps too) and ships those rows as an Arrow IPC stream: no field is re-encoded, and the leader
concatenates the decoded tables in index order and writes them with the solo sink's writer. The numbers
the window's report sums (completion tokens, solved, the validator's success, rewards, when it was
signed) travel in the stream's schema metadata, so the leader needs nothing else from the worker.
"""

from __future__ import annotations

import json

import pyarrow as pa

from grail_pipeline.mining.sink import GroupRows

META_KEY = b"grail_group"


def encode_group(rows: GroupRows) -> bytes:
    """The group's rows and counts as one Arrow IPC stream."""
    counts = {"rollouts": rows.rollouts, "completion_tokens": rows.completion_tokens, "solved": rows.solved,
              "validator_success": rows.validator_success, "reward_sum": rows.reward_sum, "arrived": rows.arrived}
    table = rows.table.replace_schema_metadata({META_KEY: json.dumps(counts).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_group(payload: bytes) -> GroupRows:
    """What `encode_group` wrote; the table without the counts in its metadata (ready to concatenate)."""
    table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
    counts = json.loads((table.schema.metadata or {})[META_KEY])
    return GroupRows(table.replace_schema_metadata(None), int(counts["rollouts"]), int(counts["completion_tokens"]),
                     int(counts["solved"]), int(counts["validator_success"]), float(counts["reward_sum"]),
                     float(counts["arrived"]))
