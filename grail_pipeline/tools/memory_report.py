"""The memory breakdown (inference/memory.py) as one line, for the benchmark's and calibrate's tables.

Free of torch: the commands import it for their output before anything heavy loads.
"""

from __future__ import annotations

MARK = {"exact": "", "measured": "", "computed": "~"}  # a computed size is a bound or an estimate


def breakdown_line(memory: dict | None) -> str:
    """`weights 6.17, kv_cache 14.49, ... GB (~ computed); peak 27.50 GB reserved, 1.20 unattributed`."""
    if not memory:
        return "-"
    parts = ", ".join(f"{c['name']} {MARK.get(c['how'], '')}{c['gb']:.2f}" for c in memory["components"])
    if memory.get("peak_reserved_gb") is None:
        return f"{parts} GB (~ computed; no GPU, nothing measured)"
    return (f"{parts} GB (~ computed); peak {memory['peak_reserved_gb']:.2f} GB reserved, "
            f"{memory['unattributed_gb']:.2f} unattributed")
