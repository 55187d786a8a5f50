"""CPU benchmark of what the window file's write costs at the cut (bench/NOTES.md, "The window file's write").

Until now the sink wrote the whole file at the cut: a 360-s W1 window's 18,416 rollouts took 9.7-10.1 s on the
H200's host, seconds the deadline plan had to keep free of generation. Now the file is written as its contiguous
prefix grows (protocol/records.py's WindowFileWriter): the full row groups while the window runs, the last one
and the footer at the cut. This measures both on the same rows (W1-sized groups, host_levers.py's: 270 + 441
tokens, real commitment encoding) and checks that the two files are the same bytes.

    python bench/window_write.py --json window-write.json   # no GPU, no model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from host_levers import group

from grail_pipeline.protocol.records import ROW_GROUP_ROWS, WindowFileWriter, records_table

METADATA = {"timestamp": 1.7e9, "wallet": "h", "window_start": 0, "window_length": 30}


def measure(tables: list, folder: Path, repeat: int) -> dict:
    whole, during, tail = [], [], []
    for i in range(repeat):
        at_cut, grown = folder / f"whole-{i}.parquet", folder / f"grown-{i}.parquet"
        t0 = time.perf_counter()
        WindowFileWriter(at_cut).finish(METADATA, tables)  # the sink until now: every row at the cut
        whole.append(time.perf_counter() - t0)
        writer = WindowFileWriter(grown)
        t0 = time.perf_counter()
        for table in tables:  # one group at a time, as the prefix grows
            writer.append([table])
        during.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer.finish(METADATA)
        tail.append(time.perf_counter() - t0)
        if at_cut.read_bytes() != grown.read_bytes():
            raise SystemExit("the file written as it grew differs from the one written at the cut")
        size = at_cut.stat().st_size
        at_cut.unlink()
        grown.unlink()
    return {"rows": sum(t.num_rows for t in tables), "row_group_rows": ROW_GROUP_ROWS, "file_mb": round(size / 1e6, 1),
            "whole_file_at_cut_s": [round(x, 3) for x in whole], "encoded_during_window_s": [round(x, 3) for x in during],
            "tail_at_cut_s": [round(x, 3) for x in tail], "same_bytes": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=9728,
                        help="rollouts in the window, 16 per group (default: 9.5 row groups, the cut's mean tail)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    t0 = time.perf_counter()
    tables = [records_table(group(True, seed=g)) for g in range(args.rows // 16)]  # the sink converts on arrival
    made = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        result = measure(tables, Path(folder), args.repeat)
    result.update(groups_made_s=round(made, 1), host=platform.processor() or platform.machine(), cpus=os.cpu_count())
    print(f"{result['rows']} rows, {result['file_mb']} MB: whole file at the cut {min(result['whole_file_at_cut_s'])} s; "
          f"written as it grows: {min(result['encoded_during_window_s'])} s during the window, "
          f"{min(result['tail_at_cut_s'])} s at the cut (best of {args.repeat}); same bytes")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
