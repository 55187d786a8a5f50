"""The window sink and the status file: complete windows only, index order, partial and late groups, temporaries."""

from __future__ import annotations

import json
import random
from pathlib import Path

import anyio
import pytest

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.chain import WindowContext, WorkerSlot
from grail_pipeline.mining.messages import ProblemTask, SignedGroup
from grail_pipeline.mining.sink import (
    WindowReport,
    WindowSink,
    remove_stale_temporaries,
    window_file_name,
)
from grail_pipeline.mining.source import WindowClose
from grail_pipeline.mining.status import (
    StatusFile,
    default_status_path,
    read_status,
    remove_stale_status_temporaries,
)
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import build_rollout_record, read_window_file

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


def window(start: int) -> WindowContext:
    return WindowContext(window_start=start, block_hash=f"0x{start:064x}", randomness=f"{start + 1:064x}")


def group(win: WindowContext, index: int, dropped: bool = False) -> SignedGroup:
    task = ProblemTask(window=win, index=index, seed=index, problem=None, prompt_ids=[1, 2], targets=[None] * 16)
    records = []
    if not dropped:
        for i in range(PROFILE.rollouts_per_problem):
            nonce = PROFILE.nonce(index, i)
            tokens = [1, 2, 3, 4]
            records.append(build_rollout_record(
                window_start=win.window_start, block=win.window_start + 1, block_hash=win.block_hash,
                randomness=win.randomness, use_drand=True, checkpoint_window=0, rollout_group=index,
                rollout_index=i, total_in_group=16, nonce=nonce, tokens=tokens, prompt_length=2,
                commitments=[{"sketch": 1, "indices": [0] * 32, "position": p} for p in range(4)],
                token_logprobs=[0.0, 0.0, -1.0, -2.0], model_name="dummy:tiny", commit_signature="ab",
                total_reward=0.1 * i, advantage=0.0, success=False, assignment=[], hotkey=HOTKEY,
                challenge=f"|{win.block_hash}|{nonce}", signature="cd"))
    n = PROFILE.rollouts_per_problem
    return SignedGroup(task, records, [0.1] * n, [False] * n, [i % 4 == 0 for i in range(n)], completion_tokens=2 * n,
                       generate_seconds=0.0, proof_seconds=0.0, sign_seconds=0.0,
                       dropped="completion of 3 tokens" if dropped else None)


def close(win: WindowContext, indices: list[int], partial: bool = False) -> WindowClose:
    return WindowClose(win, tuple(indices), partial, opened=0.0, closed=1.0)


def make_sink(tmp_path: Path, worker: WorkerSlot | None = None, **kwargs) -> tuple[WindowSink, list]:
    written: list[tuple[WindowReport, list[dict]]] = []

    async def on_written(report: WindowReport, sample: list[dict]) -> None:
        written.append((report, sample))

    sink = WindowSink(tmp_path, HOTKEY, worker or WorkerSlot(1, 2), 30, block_time_s=12.0, on_written=on_written,
                      **kwargs)
    return sink, written


def test_window_written_once_complete_in_index_order(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, sample_size=5)
    w0, w30 = window(0), window(30)

    async def main() -> None:
        await sink.put(group(w0, 5))
        await sink.put(group(w0, 1))
        await sink.put(group(w30, 1))  # the next window's first group overtakes the last of this one
        await sink.close_window(close(w0, [1, 3, 5, 7]))
        assert not sink.path_for(0).exists()  # 3 and 7 still out
        await sink.put(group(w0, 7, dropped=True))
        assert not sink.path_for(0).exists()
        await sink.put(group(w0, 3))
        assert sink.path_for(0).exists()
        assert sink.pending() == {30: (1, None)}
        await sink.close_window(close(w30, [1]))  # everything already there: written on close

    anyio.run(main)
    assert [r.window_start for r, _ in written] == [0, 30]
    path = tmp_path / window_file_name(HOTKEY, 0, 1)
    assert path.name == f"{HOTKEY}-window-0-worker-1.parquet"
    records, meta = read_window_file(path)
    assert [(r["rollout_group"], r["rollout_index"]) for r in records] == [(g, i) for g in (1, 3, 5) for i in range(16)]
    assert meta["partial"] == "false" and meta["worker_id"] == "1" and meta["total_workers"] == "2"
    assert meta["issued_groups"] == "4" and meta["dropped_groups"] == "1" and meta["missing_groups"] == ""
    assert meta["inference_count"] == "48" and meta["wallet"] == HOTKEY and meta["window_length"] == "30"
    report, sample = written[0]
    assert (report.rollouts, report.groups, report.dropped_groups, report.issued_groups) == (48, 4, 1, 4)
    assert report.solved == 12 and report.success_pct == 25.0 and not report.partial
    assert len(sample) == 5 and all(r["window_start"] == 0 for r in sample)
    assert sink.groups_sunk == 5
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_partial_window_on_stop_and_finish(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, worker=WorkerSlot(0, 1))
    w = window(60)

    async def main() -> None:
        await sink.put(group(w, 0))
        await sink.close_window(close(w, [0, 1, 2], partial=True))
        await sink.put(group(w, 2))
        assert not sink.path_for(60).exists()
        # drain timeout: group 1 never comes
        reports = await sink.finish("drain timeout")
        assert [r.window_start for r in reports] == [60]
        await sink.put(group(w, 1))  # too late: refused, not counted

    anyio.run(main)
    records, meta = read_window_file(sink.path_for(60))
    assert sorted({r["rollout_group"] for r in records}) == [0, 2]
    assert meta["partial"] == "true" and meta["missing_groups"] == "1" and meta["issued_groups"] == "3"
    assert written[0][0].partial and written[0][0].missing_groups == [1]
    assert sink.groups_sunk == 2


def test_a_stopped_window_with_everything_arrived_is_partial_but_complete(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path, worker=WorkerSlot(0, 1))
    w = window(0)

    async def main() -> None:
        await sink.close_window(close(w, [0], partial=True))
        await sink.put(group(w, 0))

    anyio.run(main)
    records, meta = read_window_file(sink.path_for(0))
    assert len(records) == 16 and meta["partial"] == "true" and meta["missing_groups"] == ""


def test_window_of_only_dropped_groups_is_an_empty_file(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, worker=WorkerSlot(0, 1))
    w = window(0)

    async def main() -> None:
        await sink.put(group(w, 0, dropped=True))
        await sink.close_window(close(w, [0]))

    anyio.run(main)
    records, meta = read_window_file(sink.path_for(0))
    assert records == [] and meta["inference_count"] == "0" and meta["dropped_groups"] == "1"
    assert written[0][0].rollouts_per_s == 0.0


def test_duplicate_group_is_a_bug(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)

    async def main() -> None:
        await sink.put(group(window(0), 1))
        await sink.put(group(window(0), 1))

    with pytest.raises(RuntimeError, match="arrived twice"):
        anyio.run(main)


def test_sample_is_uniform_over_the_window(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, worker=WorkerSlot(0, 1), sample_size=8)
    w = window(0)

    async def main() -> None:
        for i in range(20):
            await sink.put(group(w, i))
        await sink.close_window(close(w, list(range(20))))

    anyio.run(main)
    sample = written[0][1]
    assert len(sample) == 8 and len({(r["rollout_group"], r["rollout_index"]) for r in sample}) == 8
    assert max(r["rollout_group"] for r in sample) > 2  # not just the first groups


def test_stale_temporaries_of_this_worker_only(tmp_path: Path) -> None:
    mine = tmp_path / f".{HOTKEY}-window-30-worker-1.parquet.0123456789ab.tmp"
    other_worker = tmp_path / f".{HOTKEY}-window-30-worker-11.parquet.0123456789ab.tmp"
    other_key = tmp_path / ".5Other-window-30-worker-1.parquet.0123456789ab.tmp"
    final = tmp_path / f"{HOTKEY}-window-0-worker-1.parquet"
    for p in (mine, other_worker, other_key, final):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, HOTKEY, 1) == [mine]
    assert not mine.exists() and other_worker.exists() and other_key.exists() and final.exists()
    assert remove_stale_temporaries(tmp_path / "missing", HOTKEY, 1) == []


def test_status_file_round_trip(tmp_path: Path) -> None:
    path = default_status_path(tmp_path, 3)
    assert path.name == "status-worker-3.json"
    status = StatusFile(path, 3, 4, hotkey=HOTKEY)
    status.update(state="mining", current_window=30)
    data = read_status(path)
    for key in ("worker_id", "total_workers", "pid", "state", "current_window", "windows_written", "last_window",
                "updated"):
        assert key in data
    assert (data["worker_id"], data["total_workers"], data["state"], data["current_window"]) == (3, 4, "mining", 30)
    with pytest.raises(ValueError):
        status.update(state="sleeping")
    assert not list(tmp_path.glob(".*"))
    mine = tmp_path / ".status-worker-3.json.0123456789ab.tmp"
    other = tmp_path / ".status-worker-31.json.0123456789ab.tmp"
    mine.write_text("{")
    other.write_text("{")
    assert remove_stale_status_temporaries(path) == [mine] and other.exists()


@pytest.mark.parametrize("content, words", [(None, "does not exist"), ("{", "not readable JSON"),
                                            ('{"state": "x"}', "not a grail-pipeline daemon status")])
def test_read_status_errors(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "status.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=words):
        read_status(path)


def test_random_arrival_order_and_interleaved_windows(tmp_path: Path) -> None:
    """Many windows, groups arriving shuffled across them: each file holds exactly its window's groups in order."""
    rng = random.Random(4)
    sink, written = make_sink(tmp_path, worker=WorkerSlot(2, 3))
    plan = {ws: [i for i in range(2, 40, 3)][: rng.randint(1, 6)] for ws in (0, 30, 60, 90)}
    events = [("put", ws, i) for ws, idx in plan.items() for i in idx] + [("close", ws, None) for ws in plan]
    rng.shuffle(events)

    async def main() -> None:
        for kind, ws, i in events:
            if kind == "put":
                await sink.put(group(window(ws), i, dropped=rng.random() < 0.2))
            else:
                await sink.close_window(close(window(ws), plan[ws]))

    anyio.run(main)
    assert sorted(r.window_start for r, _ in written) == sorted(plan)
    for ws, idx in plan.items():
        records, meta = read_window_file(sink.path_for(ws))
        groups = [r["rollout_group"] for r in records]
        assert groups == sorted(groups) and set(groups) <= set(idx)
        assert int(meta["dropped_groups"]) + len(set(groups)) == len(idx)
        assert json.loads(json.dumps(meta))["partial"] == "false"
