"""`grail-pipeline verify PATH`: check a window file offline, as a validator would, and summarise.

The checks are `tools.window_check`'s; this module reads the flags, loads the tokenizer and model the
file names (or --model), and prints the report as a table or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grail_pipeline.common.errors import UserError

if TYPE_CHECKING:
    from grail_pipeline.tools.window_check import FileReport


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verify", help="check a window file offline (schema, signatures, rewards, proofs)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a window Parquet file")
    p.add_argument("--model", default=None,
                   help="model for the proof check (hub id, local directory or dummy:*); default: the model "
                        "named in the file's commits")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--skip-proofs", action="store_true", help="no model: everything but the proof check")
    p.add_argument("--proof-sample", type=int, default=0, metavar="N",
                   help="check proofs of N rollouts spread over the file (default 0: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run)


def render(report: FileReport, out: Any = None) -> None:
    """The report as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out or sys.stdout, width=None if (out or sys.stdout).isatty() else 140)
    meta = report.metadata
    worker = f"worker {meta['worker_id']} of {meta.get('total_workers', '?')}" if "worker_id" in meta else "no worker id"
    console.print(f"[bold]{report.path}[/bold]")
    console.print(f"window {report.window_start}, hotkey {report.hotkey}, {worker}, model {report.model}, "
                  f"{report.rollouts} rollouts in {report.groups} groups"
                  + (" [yellow]PARTIAL (the daemon stopped during this window)[/yellow]" if report.partial else ""))
    if report.model_path is not None:
        console.print(f"proofs checked with the validator's forward on the model loaded from {report.model_path}")
    table = Table(show_lines=False)
    for column in ("Check", "Checked", "Passed", "Result", "Detail (first problem when it fails)"):
        table.add_column(column, justify="right" if column in ("Checked", "Passed") else "left")
    for c in report.checks:
        if c.skipped:
            result = "[dim]skipped[/dim]"
        else:
            result = "[green]ok[/green]" if c.ok else "[red]FAIL[/red]"
        table.add_row(c.name, str(c.checked), str(c.passed), result,
                      c.skipped or (c.problems[0] if c.problems else c.what))
    console.print(table)
    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    console.print(f"{verdict}: {sum(c.passed for c in report.checks)} of {sum(c.checked for c in report.checks)} "
                  "checks passed (termination and token-distribution checks are not run)")


def run(args: argparse.Namespace) -> int:
    from grail_pipeline.inference.loading import load_model, load_tokenizer
    from grail_pipeline.protocol.records import read_window_file
    from grail_pipeline.tools.window_check import check_window_file

    if args.proof_sample < 0:
        raise UserError("--proof-sample takes a number of rollouts, at least 0")
    path = Path(args.path)
    contents = read_window_file(path)  # a broken file is one line before any model loads
    records = contents[0]
    model_ref = args.model or (records[0]["commit"]["model"]["name"] if records else None)
    tokenizer = load_tokenizer(model_ref) if model_ref else None  # an empty file has nothing to score
    loaded = None if args.skip_proofs or not records else load_model(model_ref, args.device)
    report = check_window_file(path, tokenizer, loaded, args.proof_sample, contents=contents)
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(report)
    return 0 if report.passed else 1

