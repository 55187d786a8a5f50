"""`report`: the window timeline of one worker's status file, or of a fleet's, as a picture and a page.

Each status file (`mine`'s `status-worker-<id>.json`) holds a record per window its worker wrote (in a fleet, the
windows it wrote as the leader). The timeline puts them side by side per window: on-time rollouts with the cut
ones stacked on top, the margin before the deadline, the GPU side's idle seconds, and a line where the
checkpoint changed; one bar per window and worker, and a gap marked "no file" for a window none of them wrote.
The page (`--html`) is one file with the picture inlined (base64) and the numbers in tables, so it can be
mailed or archived as is. matplotlib's object interface on the Agg canvas; `mine` never imports this.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.status import read_status

ON_TIME, LATE, CUT = "on time", "late", "cut"
MARGIN, IDLE, CHECKPOINT = "margin", "GPU idle", "checkpoint change"
COLORS = ("tab:green", "tab:blue", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:grey")


@dataclass
class WorkerWindows:
    """One status file: its worker and its window records, oldest first."""

    path: str
    status: dict[str, Any]
    windows: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return f"worker {self.status.get('worker_id', '?')}"


def load(paths: list[str]) -> list[WorkerWindows]:
    """The status files, each checked (read_status: one line for a missing or foreign file)."""
    workers = []
    for path in paths:
        status = read_status(path)
        records = status.get("windows") or {}
        if not isinstance(records, dict):
            raise UserError(f"status file {path}: 'windows' is not a mapping of window records")
        windows = sorted((r for r in records.values() if isinstance(r, dict) and "window_start" in r),
                         key=lambda r: r["window_start"])
        workers.append(WorkerWindows(str(path), status, windows))
    names = [w.name for w in workers]
    if len(set(names)) != len(names):
        raise UserError(f"two status files name the same worker ({', '.join(names)}): give each worker's once")
    return workers


def window_starts(workers: list[WorkerWindows]) -> list[int]:
    """Every window from the first to the last written, those without a file included (they show as gaps)."""
    written = sorted({r["window_start"] for w in workers for r in w.windows})
    step = next((w.status["window_blocks"] for w in workers if isinstance(w.status.get("window_blocks"), int)
                 and w.status["window_blocks"] > 0), None)
    if not written or step is None:
        return written
    return sorted(set(range(written[0], written[-1] + 1, step)) | set(written))


def checkpoint_changes(workers: list[WorkerWindows]) -> list[tuple[int, int]]:
    """(window start, checkpoint) where a window was mined on another checkpoint than the window before it."""
    by_window = {r["window_start"]: r.get("checkpoint_window") for w in workers for r in w.windows
                 if r.get("checkpoint_window") is not None}
    changes, previous = [], None
    for start in sorted(by_window):
        if previous is not None and by_window[start] != previous:
            changes.append((start, by_window[start]))
        previous = by_window[start]
    return changes


def timeline_figure(workers: list[WorkerWindows]) -> Figure:
    """Three panels over the windows: rollouts (on time, cut stacked on top), margin, GPU idle; a bar per window
    and worker, labelled '<series> · <worker>'."""
    starts = window_starts(workers)
    figure = Figure(figsize=(max(8.0, 0.5 * len(starts) * len(workers) + 4), 9), layout="constrained")
    rollouts, margin, idle = figure.subplots(3, 1, sharex=True)
    if not starts:
        rollouts.text(0.5, 0.5, "no window written yet", ha="center", transform=rollouts.transAxes)
    position = {start: i for i, start in enumerate(starts)}
    width = 0.8 / max(1, len(workers))
    for k, worker in enumerate(workers):
        x = [position[r["window_start"]] - 0.4 + width * (k + 0.5) for r in worker.windows]
        color = COLORS[k % len(COLORS)]
        on_time = [r.get("rollouts", 0) if r.get("on_time", True) else 0 for r in worker.windows]
        late = [0 if r.get("on_time", True) else r.get("rollouts", 0) for r in worker.windows]  # a file after its
        rollouts.bar(x, on_time, width, color=color, label=f"{ON_TIME} · {worker.name}")  # deadline counts nothing
        if any(late):
            rollouts.bar(x, late, width, color="tab:red", label=f"{LATE} · {worker.name}")
        rollouts.bar(x, [r.get("cut_rollouts", 0) for r in worker.windows], width,
                     bottom=[a + b for a, b in zip(on_time, late, strict=True)], color="tab:orange", alpha=0.8,
                     hatch="//", label=f"{CUT} · {worker.name}")
        margin.bar(x, [r.get("margin_s") or 0.0 for r in worker.windows], width, color=color,
                   label=f"{MARGIN} · {worker.name}")
        idle.bar(x, [r.get("idle_gpu_s") or 0.0 for r in worker.windows], width, color=color,
                 label=f"{IDLE} · {worker.name}")
    written = {r["window_start"] for w in workers for r in w.windows}
    for start in starts:
        if start not in written:
            rollouts.annotate("no file", (position[start], 0), xytext=(0, 4), textcoords="offset points",
                              ha="center", fontsize=8, color="tab:red")
    rollouts.set_ylim(top=rollouts.get_ylim()[1] * 1.15)
    margin.axhline(0, color="tab:red", linewidth=1)
    for start, checkpoint in checkpoint_changes(workers):
        for axes in (rollouts, margin, idle):
            axes.axvline(position[start] - 0.5, color="black", linestyle=":", label=CHECKPOINT)
        rollouts.annotate(f"checkpoint {checkpoint}", (position[start] - 0.5, 1), xycoords=("data", "axes fraction"),
                          xytext=(3, -12), textcoords="offset points", fontsize=8)
    rollouts.set_ylabel("rollouts per window")
    rollouts.set_title("on-time rollouts (in a file ready before its deadline; a late file's in red), cut ones "
                       "stacked on top", loc="left", fontsize=10)
    margin.set_ylabel("seconds")
    margin.set_title("file ready before the deadline (below 0: late)", loc="left", fontsize=10)
    idle.set_ylabel("seconds")
    idle.set_title("GPU side idle between files (no group generating or proving)", loc="left", fontsize=10)
    idle.set_xlabel("window (start block)")
    step = max(1, len(starts) // 24)
    idle.set_xticks(range(0, len(starts), step), [str(s) for s in starts[::step]], rotation=45)
    if starts:  # beside the panel, where it hides no bar
        rollouts.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def summary_rows(workers: list[WorkerWindows]) -> list[dict[str, Any]]:
    """Per worker: its state and totals (what the page's first table shows)."""
    out = []
    for w in workers:
        s = w.status
        check = s.get("self_check") or {}
        out.append({"worker": w.name, "state": s.get("state"), "model": s.get("model_name") or s.get("model"),
                    "engine": s.get("engine"), "batch size": s.get("batch_size"),
                    "windows written": s.get("windows_written"),
                    "on-time rollouts": sum(r.get("rollouts", 0) for r in w.windows if r.get("on_time", True)),
                    "cut rollouts": sum(r.get("cut_rollouts", 0) for r in w.windows),
                    "self-check": (f"{check['rollouts_passed']}/{check['rollouts_checked']}"
                                   if "rollouts_checked" in check else "-"),
                    "status file": w.path})
    return out


WINDOW_COLUMNS = (("window", "window_start"), ("rollouts", "rollouts"), ("groups", "groups"),
                  ("cut rollouts", "cut_rollouts"), ("redrawn", "redraws"), ("margin s", "margin_s"),
                  ("GPU idle s", "idle_gpu_s"), ("write s", "write_seconds"), ("bytes", "file_bytes"),
                  ("checkpoint", "checkpoint_window"), ("written", "trigger"))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('-' if v is None else str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def html_page(workers: list[WorkerWindows], png: bytes, command: str) -> str:
    """One self-contained page: the timeline (inlined PNG) and the numbers behind it."""
    summary = summary_rows(workers)
    parts = [f"<h1>grail-pipeline window report</h1><p>{html.escape(command)} · "
             f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>",
             _table(list(summary[0]), [list(row.values()) for row in summary]) if summary else "",
             f'<p><img alt="window timeline" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>']
    for w in workers:
        parts.append(f"<h2>{html.escape(w.name)}: {len(w.windows)} window(s)</h2>")
        parts.append(_table([h for h, _ in WINDOW_COLUMNS], [[r.get(k) for _, k in WINDOW_COLUMNS]
                                                              for r in w.windows]))
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>grail-pipeline window report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def default_picture_path(paths: list[str]) -> Path:
    """`windows.png` beside the (first) status file it describes."""
    return Path(paths[0]).expanduser().resolve().parent / "windows.png"
