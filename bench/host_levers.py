"""CPU micro-benchmark of two host levers of issue #15, on W1-sized groups (16 rollouts, ~270 + 441 tokens).

1. The sink's second JSON encoding of every commitment: `json.dumps` of the dicts in the parent's sink
   against the binding's text reordered in the signing worker (records.commitments_file_text).
2. The parent's unpickling per signed group: pickled record dicts (today) against the group's rows as
   Arrow IPC bytes (what `records_table` would give the sink) read back with `pa.ipc`.

    python bench/host_levers.py            # prints JSON; no GPU, no model
"""

from __future__ import annotations

import json
import pickle
import platform
import time

import numpy as np
import pyarrow as pa

from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import (
    EncodedCommitments,
    build_rollout_record,
    commitments_file_text,
    records_table,
)
from grail_pipeline.protocol.sketches import commitments_with_json

PROMPT, COMPLETION, GROUP = 270, 441, 16


def group(encoded: bool, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(GROUP):
        n = PROMPT + COMPLETION
        commitments, binding = commitments_with_json(rng.integers(0, PROFILE.prime_q, n, dtype=np.int64),
                                                     rng.integers(0, 151936, (n, PROFILE.proof_topk), dtype=np.int64))
        if encoded:
            commitments = EncodedCommitments(commitments, commitments_file_text(binding))
        out.append(build_rollout_record(
            window_start=0, block=1, block_hash="0x" + "ab" * 32, randomness="cd" * 32, use_drand=True,
            checkpoint_window=0, rollout_group=0, rollout_index=i, total_in_group=GROUP, nonce=i,
            tokens=rng.integers(0, 151936, n).tolist(), prompt_length=PROMPT, commitments=commitments,
            token_logprobs=[0.0] * PROMPT + (-rng.random(COMPLETION)).tolist(), model_name="m",
            commit_signature="ab" * 64, total_reward=0.5, advantage=0.1, success=True, assignment=[True] * 20,
            hotkey="h", challenge="c", signature="cd" * 64))
    return out


def best_ms(fn, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def main() -> None:
    plain, encoded = group(False), group(True)
    binding = [commitments_with_json(np.asarray([c["sketch"] for c in r["commit"]["commitments"]]),
                                     np.asarray([c["indices"] for c in r["commit"]["commitments"]]))[1]
               for r in plain]
    table = records_table(encoded)
    ipc = pa.BufferOutputStream()
    with pa.ipc.new_stream(ipc, table.schema) as writer:
        writer.write_table(table)
    ipc_bytes = ipc.getvalue().to_pybytes()
    pickled = pickle.dumps(encoded, protocol=pickle.HIGHEST_PROTOCOL)
    pickled_plain = pickle.dumps(plain, protocol=pickle.HIGHEST_PROTOCOL)
    out = dict(
        host=platform.node(), python=platform.python_version(), pyarrow=pa.__version__,
        group=dict(rollouts=GROUP, prompt=PROMPT, completion=COMPLETION, topk=PROFILE.proof_topk),
        json=dict(
            sink_encodes_dicts_ms=best_ms(lambda: records_table(plain)),
            sink_with_carried_text_ms=best_ms(lambda: records_table(encoded)),
            worker_reorders_binding_text_ms=best_ms(lambda: [commitments_file_text(b) for b in binding]),
            worker_dumps_dicts_ms=best_ms(lambda: [json.dumps(r["commit"]["commitments"], separators=(",", ":"))
                                                   for r in plain])),
        transfer=dict(
            pickled_dicts_bytes=len(pickled_plain), pickled_dicts_with_text_bytes=len(pickled),
            ipc_bytes=len(ipc_bytes),
            unpickle_dicts_ms=best_ms(lambda: pickle.loads(pickled_plain)),
            unpickle_dicts_with_text_ms=best_ms(lambda: pickle.loads(pickled)),
            read_ipc_ms=best_ms(lambda: pa.ipc.open_stream(ipc_bytes).read_all()),
            worker_builds_table_and_ipc_ms=best_ms(lambda: records_table(encoded))),
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
