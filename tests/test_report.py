"""`grail-pipeline report`: the window timeline drawn from real status files (what the figure is made of, not its
pixels), the self-contained page, and bad input as one line."""

from __future__ import annotations

import base64
import re

from conftest import run_cli

from grail_pipeline.mining.sink import WindowReport
from grail_pipeline.mining.status import StatusFile
from grail_pipeline.tools.window_report import CHECKPOINT, CUT, IDLE, LATE, MARGIN, ON_TIME, load, timeline_figure


def record(start: int, rollouts: int, cut: int, margin: float, idle: float, checkpoint: int) -> dict:
    """A window record as the daemon writes it (WindowReport.as_dict plus the daemon's idle time)."""
    deadline = 1000.0 + start
    report = WindowReport(window_start=start, file=f"/x/hk-window-{start}.parquet", partial=False, gaps=[],
                          issued_groups=(rollouts + cut) // 16, groups=rollouts // 16, rollouts=rollouts,
                          cut_groups=cut // 16, cut_rollouts=cut, failed_indices=[], redraws=0, missing_groups=[],
                          completion_tokens=rollouts * 20, solved=0, validator_success=0, reward_sum=0.0,
                          seconds=10.0, deadline=deadline, ready_at=deadline - margin, write_seconds=0.1,
                          file_bytes=1000 * rollouts, trigger="complete", checkpoint_window=checkpoint)
    return {**report.as_dict(), "idle_gpu_s": idle}


def status_file(tmp_path, worker: int, records: list[dict]) -> str:
    status = StatusFile(tmp_path / f"status-worker-{worker}.json", worker, 2, hotkey="hk", model="dummy:tiny")
    status.update(state="mining", windows={str(r["window_start"]): r for r in records}, windows_written=len(records),
                  window_blocks=30,
                  engine="fast", batch_size=16, self_check={"rollouts_checked": 4, "rollouts_passed": 4})
    return str(status.path)


def bars(axes, label: str) -> list[tuple[float, float]]:
    """(x, height) of each bar of the container labelled `label`."""
    container = next(c for c in axes.containers if c.get_label() == label)
    return [(p.get_x() + p.get_width() / 2, p.get_height()) for p in container.patches]


def test_one_bar_per_window_and_worker_and_a_line_per_checkpoint_change(tmp_path, capsys) -> None:
    first = [record(0, 64, 16, 12.5, 3.0, 0), record(30, 48, 0, 20.0, 1.5, 0), record(90, 32, 32, -2.0, 0.5, 30),
             record(150, 16, 0, 5.0, 0.5, 30)]  # window 120: no worker wrote a file
    second = [record(60, 80, 0, 8.0, 2.0, 0)]  # a fleet: the other worker led window 60
    paths = [status_file(tmp_path, 0, first), status_file(tmp_path, 1, second)]
    figure = timeline_figure(load(paths))
    rollouts, margin, idle = figure.axes
    for worker, records in (("worker 0", first), ("worker 1", second)):
        on_time = bars(rollouts, f"{ON_TIME} · {worker}")
        assert len(on_time) == len(records)  # one bar per window
        assert [h for _, h in on_time] == [r["rollouts"] if r["on_time"] else 0 for r in records]
        assert [h for _, h in bars(rollouts, f"{CUT} · {worker}")] == [r["cut_rollouts"] for r in records]
        assert [h for _, h in bars(margin, f"{MARGIN} · {worker}")] == [r["margin_s"] for r in records]
        assert [h for _, h in bars(idle, f"{IDLE} · {worker}")] == [r["idle_gpu_s"] for r in records]
    assert [h for _, h in bars(rollouts, f"{LATE} · worker 0")] == [0, 0, 32, 0]  # window 90's file was late
    # windows in order on one axis: 0, 30, 60 (worker 1), 90
    xs = sorted([x for x, _ in bars(rollouts, f"{ON_TIME} · worker 0")] +
                [x for x, _ in bars(rollouts, f"{ON_TIME} · worker 1")])
    assert [round(x) for x in xs] == [0, 1, 2, 3, 5]  # window 120 (position 4) is a gap
    assert [t.get_text() for t in rollouts.texts if t.get_text() == "no file"] == ["no file"]
    assert [t.get_text() for t in idle.get_xticklabels()] == ["0", "30", "60", "90", "120", "150"]
    changes = [line.get_xdata()[0] for line in rollouts.get_lines() if line.get_label() == CHECKPOINT]
    assert changes == [2.5]  # between window 60 (checkpoint 0) and window 90 (checkpoint 30)

    page = tmp_path / "report.html"
    rc, out, err = run_cli(capsys, "report", *paths, "--html", str(page))
    assert rc == 0, err
    assert out.startswith("5 window(s) of 2 worker(s): picture ") and err == ""
    png = (tmp_path / "windows.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    text = page.read_text()
    inlined = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(inlined) == png  # the page holds the picture itself: nothing beside it to lose
    assert "<td>-2.0</td>" in text and "<td>4/4</td>" in text and "worker 1: 1 window(s)" in text


def test_bad_status_files_are_one_line(tmp_path, capsys) -> None:
    rc, out, err = run_cli(capsys, "report", str(tmp_path / "nope.json"))
    assert rc == 2 and "does not exist" in err and err.count("\n") == 1 and out == ""
    (tmp_path / "other.json").write_text('{"some": "thing"}')
    rc, _, err = run_cli(capsys, "report", str(tmp_path / "other.json"))
    assert rc == 2 and "is not a grail-pipeline daemon status" in err
    path = status_file(tmp_path, 0, [])
    rc, _, err = run_cli(capsys, "report", path, path)
    assert rc == 2 and "name the same worker" in err
