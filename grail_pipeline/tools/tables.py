"""The commands' tables, made to fit an 80-column terminal: no outer frame, one space between a cell and the next
column's rule, headers that break before their unit (`Time\\n(s)`), and cells folded onto a second line rather
than cut with `…` (at 80 columns rich cut `Start-up(s)` to `Start-…` in the framed tables)."""

from __future__ import annotations

from rich import box
from rich.table import Table


def narrow_table(title: str | None, columns: list[str], left: tuple[str, ...] = ()) -> Table:
    """A table with `columns` (numbers right-aligned; those named in `left` left-aligned)."""
    table = Table(title=title, title_justify="left", box=box.SQUARE, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0))
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right", overflow="fold",
                         min_width=max(map(len, name.split())))  # a header word is never folded
    return table
