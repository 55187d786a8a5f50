"""A matplotlib figure as PNG bytes: what `calibrate` and `report` write (atomically) or inline in a page."""

from __future__ import annotations

import io

from matplotlib.figure import Figure

DPI = 100


def png_bytes(figure: Figure) -> bytes:
    """The figure drawn on the Agg canvas (no display, no pyplot state) as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
