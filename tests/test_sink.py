"""The window sink and the status file: the hotkey's one file per window, groups 0..N-1 contiguous, redraws,
the cut, partial windows, late groups, temporaries."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import anyio
import pyarrow.parquet as pq
import pytest

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.chain import WindowContext, WorkerSlot
from grail_pipeline.mining.hotkey_log import hotkey_logger
from grail_pipeline.mining.messages import ProblemTask, SignedGroup
from grail_pipeline.mining.sink import MAX_DRAWS, WindowReport, WindowSink, remove_stale_temporaries
from grail_pipeline.mining.source import WindowClose
from grail_pipeline.mining.status import (
    StatusFile,
    default_status_path,
    read_status,
    remove_stale_status_temporaries,
)
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import (
    ROW_GROUP_ROWS,
    WindowFileWriter,
    build_rollout_record,
    read_window_file,
    write_window_file,
)

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


def close(win: WindowContext, indices: list[int], partial: bool = False, abandoned: tuple[int, ...] = ()) -> WindowClose:
    return WindowClose(win, tuple(indices), partial, opened=0.0, closed=1.0, abandoned=abandoned)


def make_sink(tmp_path: Path, **kwargs) -> tuple[WindowSink, list]:
    written: list[tuple[WindowReport, list[dict]]] = []

    async def on_written(report: WindowReport, sample: list[dict]) -> None:
        written.append((report, sample))

    sink = WindowSink(tmp_path, HOTKEY, WorkerSlot(0, 1), 30, on_written=on_written,
                      extra_metadata={"checkpoint_window": 7, "model_name": "dummy:tiny"}, **kwargs)
    return sink, written


def groups_in(path: Path) -> list[int]:
    records, _ = read_window_file(path)
    return [r["rollout_group"] for r in records]


def test_window_written_once_complete_as_the_protocols_file(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, sample_size=5)
    w0, w30 = window(0), window(30)

    async def main() -> None:
        await sink.put(group(w0, 2))
        await sink.put(group(w0, 0))
        await sink.put(group(w30, 0))  # the next window's first group overtakes the last of this one
        await sink.close_window(close(w0, [0, 1, 2, 3]))
        assert not sink.path_for(0).exists()  # 1 and 3 still out
        await sink.put(group(w0, 3))
        await sink.put(group(w0, 1))
        assert sink.path_for(0).exists()
        assert sink.pending() == {30: (1, None)}
        await sink.close_window(close(w30, [0]))  # everything already there: written on close

    anyio.run(main)
    assert [r.window_start for r, _ in written] == [0, 30]
    path = sink.path_for(0)
    assert path.name == f"{HOTKEY}-window-0.parquet"
    records, meta = read_window_file(path)
    assert [(r["rollout_group"], r["rollout_index"]) for r in records] == [(g, i) for g in range(4) for i in range(16)]
    assert meta["partial"] == "false" and meta["groups"] == "4" and meta["cut_rollouts"] == "0"
    assert meta["inference_count"] == "64" and meta["wallet"] == HOTKEY and meta["window_length"] == "30"
    assert meta["checkpoint_window"] == "7" and meta["model_name"] == "dummy:tiny" and meta["worker_id"] == "0"
    report, sample = written[0]
    assert (report.rollouts, report.groups, report.cut_rollouts, report.issued_groups) == (64, 4, 0, 4)
    assert report.solved == 16 and report.success_pct == 25.0 and not report.partial and report.trigger == "complete"
    assert report.file_bytes == path.stat().st_size and report.on_time  # no plan: no deadline
    assert len(sample) == 5 and all(r["window_start"] == 0 for r in sample)
    assert sink.groups_sunk == 5
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_a_dropped_group_is_redrawn_and_the_file_has_no_gap(tmp_path: Path) -> None:
    redrawn: list[tuple[int, int]] = []
    sink, written = make_sink(tmp_path, redraw=lambda task: redrawn.append((task.index, task.attempt)) is None)
    w = window(0)

    async def main() -> None:
        await sink.put(group(w, 0))
        await sink.put(group(w, 1, dropped=True))
        await sink.put(group(w, 2))
        await sink.close_window(close(w, [0, 1, 2]))
        assert not sink.path_for(0).exists()  # index 1 is being drawn again
        await sink.put(group(w, 1))

    anyio.run(main)
    assert redrawn == [(1, 0)]
    assert groups_in(sink.path_for(0)) == [g for g in range(3) for _ in range(16)]
    assert written[0][0].redraws == 1 and written[0][0].failed_indices == []


@pytest.mark.parametrize("several", [False, True])
def test_a_sinks_lines_name_its_hotkey_when_several_share_the_process(tmp_path: Path, caplog, several: bool) -> None:
    """With several hotkeys on one engine a drop or a partial window says whose it was (mining/hotkey_log.py);
    with one, the lines are as they were."""
    sink, _ = make_sink(tmp_path, redraw=lambda task: True, log=hotkey_logger(HOTKEY, several))
    w = window(0)

    async def main() -> None:
        await sink.put(group(w, 0, dropped=True))
        await sink.finish("SIGTERM")

    with caplog.at_level(logging.INFO, logger="grail_pipeline"):
        anyio.run(main)
    lines = [r.getMessage() for r in caplog.records if "window 0" in r.getMessage()]
    assert any(m.endswith("window 0 group 0 dropped (completion of 3 tokens): drawing again (2 of 3)") for m in lines), lines
    assert all(m.startswith(f"[{HOTKEY[:8]}] window 0") == several for m in lines), lines


def test_an_index_that_keeps_failing_ends_the_file_before_it(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, redraw=lambda task: True)
    w = window(0)

    async def main() -> None:
        await sink.put(group(w, 0))
        await sink.put(group(w, 2))
        await sink.put(group(w, 3))
        await sink.close_window(close(w, [0, 1, 2, 3]))
        for _ in range(MAX_DRAWS):
            await sink.put(group(w, 1, dropped=True))

    anyio.run(main)
    assert set(groups_in(sink.path_for(0))) == {0}  # F would seed groups 2 and 3 from indices 1 and 2: cut
    report = written[0][0]
    assert report.failed_indices == [1] and report.groups == 1 and report.cut_groups == 2
    assert report.cut_rollouts == 32 and report.redraws == MAX_DRAWS - 1


def test_the_cut_writes_the_contiguous_prefix_and_counts_the_rest(tmp_path: Path) -> None:
    late: list[tuple[int, int, int]] = []

    async def on_late(window_start: int, index: int, rollouts: int) -> None:
        late.append((window_start, index, rollouts))

    sink, written = make_sink(tmp_path, on_late=on_late)
    w = window(0)

    async def main() -> None:
        for i in (0, 1, 3):
            await sink.put(group(w, i))
        await sink.close_window(close(w, [0, 1, 2, 3, 4]))
        report = await sink.cut(0)
        assert report is not None and report.trigger == "cut"
        assert await sink.cut(0) is None  # written once
        await sink.put(group(w, 2))  # too late for the file

    anyio.run(main)
    _, meta = read_window_file(sink.path_for(0))
    assert set(groups_in(sink.path_for(0))) == {0, 1}
    report = written[0][0]
    assert report.missing_groups == [2, 4] and report.cut_groups == 3 and report.cut_rollouts == 48
    assert meta["cut_rollouts"] == "48" and meta["missing_groups"] == "2,4" and meta["partial"] == "false"
    assert report.gaps == [{"index": 2, "state": "in flight", "rollouts_cut_after": 16},
                           {"index": 4, "state": "in flight", "rollouts_cut_after": 0}]
    assert late == []  # group 2 was counted at the write, as missing: not counted again


def test_the_file_grows_with_the_prefix_and_the_cut_adds_the_rest(tmp_path: Path) -> None:
    """Out-of-order groups: once the contiguous prefix holds a row group's rows they are in the file's temporary
    (nothing under the final name yet), groups after a gap are not; the cut adds the rest of the prefix and the
    footer, and the file is the one the whole-file write gives (same rows, same metadata, read back)."""
    sink, written = make_sink(tmp_path)
    w = window(0)
    per_row_group = ROW_GROUP_ROWS // PROFILE.rollouts_per_problem
    order = list(range(per_row_group + 5))
    random.Random(3).shuffle(order)
    order.remove(per_row_group + 2)  # a gap: what comes after it is cut

    async def main() -> None:
        for index in order:
            await sink.put(group(w, index))
        temporaries = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temporaries) == 1 and not sink.path_for(0).exists()
        assert temporaries[0].stat().st_size > 1000  # the first row group, encoded; the footer comes at the cut
        await sink.close_window(close(w, list(range(per_row_group + 5))))
        report = await sink.cut(0)
        assert report is not None and report.groups == per_row_group + 2
        assert report.cut_groups == 3  # the missing index and the two after it

    anyio.run(main)
    assert groups_in(sink.path_for(0)) == [i for i in range(per_row_group + 2) for _ in range(16)]
    assert [p.name for p in tmp_path.iterdir()] == [sink.path_for(0).name]
    row_groups = pq.ParquetFile(sink.path_for(0)).metadata
    assert [row_groups.row_group(i).num_rows for i in range(row_groups.num_row_groups)] == [ROW_GROUP_ROWS, 32]
    records, meta = read_window_file(sink.path_for(0))
    again = tmp_path / "again.parquet"
    write_window_file(again, records, meta)  # the same rows and metadata written whole
    assert again.read_bytes() == sink.path_for(0).read_bytes()
    assert meta["cut_groups"] == "3" and meta["inference_count"] == str(len(records)) and written[0][0].rollouts == len(records)


def test_a_failed_write_as_the_file_grows_loses_no_group(tmp_path: Path, monkeypatch, caplog) -> None:
    """A disk that fails while the file grows (full, say) loses nothing: the temporary goes, a warning says so, and
    the file is begun again from group 0 with the next group (the sink still holds every group)."""
    failures = []

    def append(self, tables):
        if not failures:
            failures.append(1)
            self.abort()
            raise OSError(28, "No space left on device")
        return real_append(self, tables)

    real_append = WindowFileWriter.append
    monkeypatch.setattr(WindowFileWriter, "append", append)
    sink, written = make_sink(tmp_path)
    w = window(0)
    count = ROW_GROUP_ROWS // PROFILE.rollouts_per_problem + 2

    async def main() -> None:
        for index in range(count):
            await sink.put(group(w, index))
        assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the second writer's
        await sink.cut(0)

    anyio.run(main)
    assert failures and "writing the file as it grows failed" in caplog.text
    assert groups_in(sink.path_for(0)) == [i for i in range(count) for _ in range(16)]
    assert [p.name for p in tmp_path.iterdir()] == [sink.path_for(0).name]


def test_every_late_group_is_counted_once(tmp_path: Path) -> None:
    """Cut groups that arrive after their window's file (the cut came while the window was still issuing, or
    found nothing) were logged and kept in a dict nobody read: 14 of 35 such groups in 40 random stops were
    missing from the status record, the totals and the stopped line."""
    late: list[tuple[int, int, int]] = []

    async def on_late(window_start: int, index: int, rollouts: int) -> None:
        late.append((window_start, index, rollouts))

    sink, written = make_sink(tmp_path, on_late=on_late)
    w0, w30 = window(0), window(30)

    async def main() -> None:
        await sink.put(group(w0, 0))
        await sink.cut(0)  # still issuing: group 1 is in flight and no index list tells the sink so
        await sink.put(group(w0, 1))  # cut, and counted now
        await sink.close_window(close(w0, [0, 1]))  # after the cut: nothing to do
        assert await sink.cut(30) is None  # nothing arrived: no file, no report
        await sink.put(group(w30, 0))
        await sink.put(group(w30, 1, dropped=True))  # no rollout to count

    anyio.run(main)
    assert [r.window_start for r, _ in written] == [0] and written[0][0].cut_rollouts == 0
    assert late == [(0, 1, 16), (30, 0, 16)]
    assert not sink.path_for(30).exists()


def test_a_source_abandoned_redraw_counts_as_failed(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, redraw=lambda task: True)
    w = window(0)

    async def main() -> None:
        await sink.put(group(w, 0))
        await sink.put(group(w, 1, dropped=True))
        await sink.close_window(close(w, [0, 1], abandoned=(1,)))

    anyio.run(main)
    assert written[0][0].failed_indices == [1] and set(groups_in(sink.path_for(0))) == {0}


def test_partial_window_on_stop_and_finish(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path)
    w = window(60)

    async def main() -> None:
        await sink.put(group(w, 0))
        await sink.close_window(close(w, [0, 1, 2], partial=True))
        await sink.put(group(w, 2))
        assert not sink.path_for(60).exists()
        # drain timeout: group 1 never comes
        reports = await sink.finish("drain timeout")
        assert [r.window_start for r in reports] == [60]
        await sink.put(group(w, 1))  # too late: refused, counted as late

    anyio.run(main)
    records, meta = read_window_file(sink.path_for(60))
    assert sorted({r["rollout_group"] for r in records}) == [0]
    assert meta["partial"] == "true" and meta["missing_groups"] == "1" and meta["issued_groups"] == "3"
    assert written[0][0].partial and written[0][0].missing_groups == [1] and written[0][0].trigger == "drain timeout"
    assert sink.groups_sunk == 2


def test_finish_returns_after_a_cut_under_way_has_reported_its_window(tmp_path: Path) -> None:
    """The daemon closes its self-check queue when `finish` returns, and its cut timer runs beside the pipeline: a
    cut that wrote the last window as the pipeline drained must have reported it (`on_written`, with the sample)
    by then, or that window's self-check is lost."""
    reported: list[tuple[int, int]] = []
    in_report, release = anyio.Event(), anyio.Event()

    async def on_written(report: WindowReport, sample: list[dict]) -> None:
        in_report.set()
        await release.wait()  # the report under way (a status write on a loaded machine)
        reported.append((report.window_start, len(sample)))

    sink = WindowSink(tmp_path, HOTKEY, WorkerSlot(0, 1), 30, on_written=on_written, sample_size=2)
    w = window(0)
    finished: list[list[tuple[int, int]]] = []

    async def finish() -> None:
        await sink.finish("end of run")
        finished.append(list(reported))

    async def main() -> None:
        await sink.put(group(w, 0))
        async with anyio.create_task_group() as tg:
            tg.start_soon(sink.cut, 0)
            await in_report.wait()  # the file is written, its report not yet done
            tg.start_soon(finish)
            await anyio.wait_all_tasks_blocked()
            assert not finished  # finish waits for the report
            release.set()

    anyio.run(main)
    assert finished == [[(0, 2)]] and sink.path_for(0).exists()


def test_a_stopped_window_with_everything_arrived_is_partial_but_complete(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)
    w = window(0)

    async def main() -> None:
        await sink.close_window(close(w, [0], partial=True))
        await sink.put(group(w, 0))

    anyio.run(main)
    records, meta = read_window_file(sink.path_for(0))
    assert len(records) == 16 and meta["partial"] == "true" and meta["missing_groups"] == ""


def test_a_window_with_no_rollout_in_its_prefix_has_no_file(tmp_path: Path) -> None:
    """A 0-row file scores nothing and passed `verify`; the report still says what was cut and why."""
    sink, written = make_sink(tmp_path)
    w0, w30 = window(0), window(30)

    async def main() -> None:
        await sink.put(group(w0, 0, dropped=True))  # no redraw offered: failed at once
        await sink.close_window(close(w0, [0]))
        await sink.put(group(w30, 1))
        await sink.close_window(close(w30, [0, 1]))
        await sink.cut(30)  # index 0 never came: nothing before the gap

    anyio.run(main)
    assert not sink.path_for(0).exists() and not sink.path_for(30).exists()
    (empty, _), (cut, _) = written
    assert empty.file is None and empty.rollouts == 0 and empty.failed_indices == [0] and empty.file_bytes == 0
    assert cut.file is None and cut.cut_rollouts == 32 and cut.missing_groups == [0]
    assert cut.gaps == [{"index": 0, "state": "in flight", "rollouts_cut_after": 16}]


def test_duplicate_group_is_a_bug(tmp_path: Path) -> None:
    sink, _ = make_sink(tmp_path)

    async def main() -> None:
        await sink.put(group(window(0), 1))
        await sink.put(group(window(0), 1))

    with pytest.raises(RuntimeError, match="arrived twice"):
        anyio.run(main)


def test_sample_is_uniform_over_the_file(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path, sample_size=8)
    w = window(0)

    async def main() -> None:
        for i in range(20):
            await sink.put(group(w, i))
        await sink.close_window(close(w, list(range(20))))

    anyio.run(main)
    sample = written[0][1]
    assert len(sample) == 8 and len({(r["rollout_group"], r["rollout_index"]) for r in sample}) == 8
    assert max(r["rollout_group"] for r in sample) > 2  # not just the first groups


def test_stale_temporaries_of_this_hotkey_only(tmp_path: Path) -> None:
    mine = tmp_path / f".{HOTKEY}-window-30.parquet.0123456789ab.tmp"
    other_key = tmp_path / ".5Other-window-30.parquet.0123456789ab.tmp"
    final = tmp_path / f"{HOTKEY}-window-0.parquet"
    for p in (mine, other_key, final):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, HOTKEY) == [mine]
    assert not mine.exists() and other_key.exists() and final.exists()
    assert remove_stale_temporaries(tmp_path / "missing", HOTKEY) == []


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


@pytest.mark.parametrize("content, words", [(None, "does not exist"), ("{", "status.json is not JSON"),
                                            ('{"state": "x"}', "not a grail-pipeline daemon status")])
def test_read_status_errors(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "status.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=words):
        read_status(path)


def test_random_arrival_order_and_interleaved_windows(tmp_path: Path) -> None:
    """Many windows, groups arriving shuffled across them, some dropped and redrawn: each file holds exactly
    its window's groups 0..N-1 in order."""
    rng = random.Random(4)
    sink, written = make_sink(tmp_path, redraw=lambda task: True)
    sizes = {ws: rng.randint(1, 8) for ws in (0, 30, 60, 90)}
    events = [("put", ws, i) for ws, n in sizes.items() for i in range(n)] + [("close", ws, None) for ws in sizes]
    rng.shuffle(events)

    async def main() -> None:
        for kind, ws, i in events:
            if kind == "put":
                if rng.random() < 0.3:
                    await sink.put(group(window(ws), i, dropped=True))
                await sink.put(group(window(ws), i))
            else:
                await sink.close_window(close(window(ws), list(range(sizes[ws]))))

    anyio.run(main)
    assert sorted(r.window_start for r, _ in written) == sorted(sizes)
    for ws, n in sizes.items():
        records, meta = read_window_file(sink.path_for(ws))
        assert [r["rollout_group"] for r in records] == [g for g in range(n) for _ in range(16)]
        assert json.loads(json.dumps(meta))["partial"] == "false" and meta["groups"] == str(n)


def test_a_cut_with_nothing_arrived_writes_no_file_and_later_groups_are_late(tmp_path: Path) -> None:
    sink, written = make_sink(tmp_path)
    w = window(0)

    async def main() -> None:
        assert await sink.cut(0) is None and sink.written(0)
        await sink.put(group(w, 0))
        await sink.close_window(close(w, [0]))  # the source closes after the cut: nothing more to write

    anyio.run(main)
    assert not sink.path_for(0).exists() and written == []  # the late group: test_every_late_group_is_counted_once


def test_the_sample_is_drawn_from_the_written_files_rows(tmp_path: Path) -> None:
    """The self-check's sample is drawn at the write from the rows in the file (sink.file_sample, which a fleet's
    leader shares): groups cut after a gap are never drawn and the sample is still full, and each sampled record is
    the file's row as the validator reads it. Drawn as groups arrived (the old reservoir) and then filtered, a window
    with a gap got fewer than asked: here 40 of its 80 rollouts were after the gap."""
    sink, written = make_sink(tmp_path, sample_size=40, run_seed=3)
    w = window(0)

    async def main() -> None:
        for i in (0, 1, 2, 4, 5):
            await sink.put(group(w, i))
        await sink.cut(0)

    anyio.run(main)
    report, sample = written[0]
    assert report.groups == 3 and report.cut_groups == 2
    records, _ = read_window_file(sink.path_for(0))
    by_position = {(r["rollout_group"], r["rollout_index"]): r for r in records}
    assert len(sample) == 40 and len({(r["rollout_group"], r["rollout_index"]) for r in sample}) == 40
    assert all(r == by_position[r["rollout_group"], r["rollout_index"]] for r in sample)
