"""calibration.png: the calibration file's sweeps as pictures, written by `calibrate` beside the YAML.

One row of three panels per GPU kind and engine in the file: rollouts/s against the batch size, the on-time
rollouts per scoring window at that rate (the benchmark's projection), and the peak memory against the budget
line (total − headroom) and the total; the chosen size is marked in each, and every other size is listed
under them with the reason it was rejected. Drawn with matplotlib's object interface on the Agg canvas (no
pyplot, no display); only `calibrate` imports this module, never `mine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.tools.pictures import png_bytes
from grail_pipeline.tools.projection import WindowSpec, on_time_at

# artist labels the tests (and a reader of the figure's objects) find the data by
RATE, ON_TIME, PEAK, BUDGET, TOTAL = "rollouts/s", "on time per window", "peak GB", "budget", "total"
CHOSEN, REJECTED = "chosen", "rejected"


def measured(entry: Mapping[str, Any]) -> list[dict]:
    """The rows that ran and made rollouts (what the panels plot), smallest batch first."""
    return sorted((r for r in entry.get("rows") or [] if r.get("status") == "ok" and r.get("rollouts_per_s")),
                  key=lambda r: r["batch_size"])


def calibration_figure(calibrations: Mapping[str, Mapping[str, Any]]) -> Figure:
    """The figure of every entry with measured rows (a file's placeholder entries have none)."""
    entries = [(gpu, engine, entry) for gpu, engines in sorted(calibrations.items())
               for engine, entry in sorted(engines.items()) if measured(entry)]
    figure = Figure(figsize=(13, 4.6 * max(1, len(entries))), layout="constrained")
    if not entries:
        figure.text(0.5, 0.5, "no measured calibration in this file", ha="center")
        return figure
    grid = figure.add_gridspec(2 * len(entries), 3, height_ratios=[4, 1] * len(entries))
    spec = WindowSpec()
    for k, (gpu, engine, entry) in enumerate(entries):
        rows = measured(entry)
        sizes = [r["batch_size"] for r in rows]
        chosen = (entry.get("chosen") or {}).get("batch_size")
        best = next((r for r in rows if r["batch_size"] == chosen), None)
        rate, on_time, peak = (figure.add_subplot(grid[2 * k, c]) for c in range(3))
        on_time_values = [on_time_at(spec, r["batch_size"], r["rollouts_per_s"]) for r in rows]
        for axes, values, label, unit in ((rate, [r["rollouts_per_s"] for r in rows], RATE, "rollouts/s"),
                                          (on_time, on_time_values, ON_TIME,
                                           f"on-time rollouts per {spec.seconds:g}-s window"),
                                          (peak, [r["peak_gb"] for r in rows], PEAK, "peak memory (GB)")):
            axes.plot(sizes, values, "o-", label=label, color="tab:blue")
            if best is not None:
                axes.plot([chosen], [values[rows.index(best)]], "*", markersize=18, color="tab:green", label=CHOSEN)
            rejected = [(r["batch_size"], v) for r, v in zip(rows, values, strict=True) if r is not best]
            if rejected:
                axes.plot(*zip(*rejected, strict=True), "x", markersize=10, color="tab:red", label=REJECTED)
            axes.set_xscale("log", base=2)
            axes.set_xticks(sizes, [str(s) for s in sizes])
            axes.set_xlabel("batch size" + (" (decode slots)" if engine == "fast" else " (prompts per generate)"))
            axes.set_ylabel(unit)
            axes.grid(alpha=0.3)
        memory = entry.get("memory") or {}
        if memory.get("budget_gb") is not None:
            peak.axhline(memory["budget_gb"], color="tab:red", linestyle="--", label=BUDGET)
        total = (entry.get("gpu") or {}).get("total_memory_gb")
        if total is not None:
            peak.axhline(total, color="grey", linestyle=":", label=TOTAL)
        peak.legend(loc="upper left", fontsize=8)
        rate.set_title(f"{gpu} · {engine} engine · {entry.get('model_name') or entry.get('model')}", loc="left",
                       fontsize=10)
        on_time.set_title(f"at that rate, {spec.describe()}", loc="left", fontsize=9)
        peak.set_title(f"budget {memory.get('budget_gb', '?')} GB = total − {memory.get('headroom_gb', '?')} GB "
                       "headroom", loc="left", fontsize=9)
        notes = figure.add_subplot(grid[2 * k + 1, :])
        notes.axis("off")
        lines = [f"batch {r['batch_size']}: {r.get('verdict', '?')} – {r.get('reason', '')}"
                 for r in sorted(entry.get("rows") or [], key=lambda r: r["batch_size"])]
        notes.text(0, 1, "\n".join(lines), va="top", fontsize=8, family="monospace", transform=notes.transAxes)
    return figure


def calibration_png_path(calibration: str | Path) -> Path:
    """`calibration.yaml` -> `calibration.png`, beside it."""
    return Path(calibration).expanduser().with_suffix(".png")


def write_calibration_png(calibrations: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Draw and write the picture atomically (a reader never sees half a PNG)."""
    write_atomically(path, png_bytes(calibration_figure(calibrations)))
    return path
