"""`grail-pipeline verify PATH`: check a window file offline as F's validator does, and strictly, and summarise.

The checks are `tools.window_check`'s; this module reads the flags, loads the tokenizer and model the
file names (or --model), finds the deadline and the expected checkpoint window, and prints the report
as a table or JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grail_pipeline.cli.arguments import RawDescriptionHelpFormatter, whole_int
from grail_pipeline.common.errors import UserError

if TYPE_CHECKING:
    from grail_pipeline.tools.window_check import FileReport

EPILOG = """\
F = the GRAIL fork (github.com/Agile-Ascent-Limited/Grail at c66a3e4) whose validator these checks match.
checks (F = one of F's validator checks; the rest are ours):
  file          F  at least 200 bytes, named {wallet}-window-{window_start}.parquet
  deadline      F  file modified no later than the deadline: --status, else the file's 'deadline'
                   metadata; with neither it is reported as not run
  metadata      F  wallet, window_start, window_length, inference_count present, whole numbers, match the rows
  checkpoint    F  every checkpoint_window = the checkpoint's metadata.json window (or --checkpoint-window)
  structure     F  schema: every field of every row typed as the protocol says (a malformed row fails here, at
                   its file row, and no later check reads it); len(tokens) >= 10, 16 <= completion <= 2048,
                   lengths, proof version, top-k, hex beacon
  fields        F  one window, block hash and hotkey, no nonce twice; ours: nonce = group*100+index, challenge
  signatures    F  commit and rollout sr25519 signatures
  tokens        F  ids in [0, vocab size), length <= the model's context (a failing rollout stops here)
  prompt        F  the k-th group in file order holds problem k's prompt (F seeds by file position)
  reward        F  reward recomputed for that problem (rel 2 %)
  proofs        F  the validator's forward: F = 16 challenged positions, <= 1 logprob off; strict = all
  termination   F  completion of the maximum length, or last token EOS with probability >= 0.02
  distribution  F  soft: chosen-token probabilities n >= 30, median > 0.30, min > 1e-5, q10 and
                   q10 of the first 50 steps > 0.025; F gates at ceil(0.51 * checked) fails
  groups        F  16 rollouts per group, advantages sum ~0 and match the rewards
  order            groups 0..N-1, each contiguous, in file order

verdicts: 'validator' = F's rules on F's sample (<= 20 rollouts: all; else min(max(1, int(0.1*groups)), 2)
whole groups, drawn from sha256(hotkey:window randomness) over groups sorted by the digest of their
commits); 'strict' = every rollout, position and logprob, and our rules. The window randomness is
sha256 of the block hash (F's no-drand form: a dry run cannot know the drand round a validator mixes in).
On random weights (dummy:*) termination and distribution fail by design (EOS is forced): they are shown
and counted apart, outside both verdicts. Exit 0 when both verdicts pass, 1 when one fails.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("verify", help="check a window file offline as F's validator does, and strictly",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("path", help="a window Parquet file")
    p.add_argument("--model", default=None,
                   help="model for the model checks (hub id, local directory or dummy:*); default: the model "
                        "named in the file's commits")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--skip-proofs", action="store_true",
                   help="no model: no tokens, proofs, termination or distribution check (and no checkpoint "
                        "check without --checkpoint-window)")
    p.add_argument("--proof-sample", type=whole_int, default=0, metavar="N",
                   help="strict proof check on N rollouts spread over the file (default 0: all); F's sample is "
                        "always proved")
    p.add_argument("--status", default=None, metavar="PATH",
                   help="the daemon's status JSON: the deadline of this file's window comes from its 'windows'")
    p.add_argument("--checkpoint-window", type=whole_int, default=None, metavar="N",
                   help="the checkpoint window every rollout must name (default: the model's metadata.json window)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run)


def status_deadline(status_path: str, window_start: int | None) -> tuple[float, str]:
    """The deadline the daemon's status file records for this window, and where it came from."""
    from grail_pipeline.mining.status import read_status

    windows = read_status(status_path).get("windows")
    entry = windows.get(str(window_start)) if isinstance(windows, dict) else None
    deadline = entry.get("deadline") if isinstance(entry, dict) else None
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise UserError(f"status file {status_path} records no deadline for window {window_start}")
    return float(deadline), f"status file {status_path}"


def render(report: FileReport, out: Any = None) -> None:
    """The report as a rich table, then the two verdicts."""
    from rich.console import Console
    from rich.markup import escape

    from grail_pipeline.tools.tables import narrow_table

    console = Console(file=out or sys.stdout, width=None if (out or sys.stdout).isatty() else 160)
    console.print(f"[bold]{escape(report.path)}[/bold]")
    console.print(f"window {report.window_start}, hotkey {report.hotkey}, model {report.model}, "
                  f"{report.rollouts} rollouts in {report.groups} groups"
                  + (" [yellow]PARTIAL (the daemon stopped during this window)[/yellow]" if report.partial else ""))
    if report.model_path is not None:
        console.print(f"model checks ran the validator's forward on the model loaded from {report.model_path}")
    sample = report.sample
    console.print(f"F's sample: groups {sample['groups']} of {sample['of_groups']} ({sample['rollouts']} rollouts), "
                  f"window randomness {sample['randomness_from']}")
    table = narrow_table(None, ["Check", "F", "Strict", "Validator", "Result", "Detail (first problem when it fails)"],
                         left=("Check", "F", "Result", "Detail (first problem when it fails)"))
    for c in report.checks:
        if c.skipped:
            result = "[dim]not run[/dim]"
        elif c.ok:
            result = "[green]ok[/green]"
        else:
            result = "[yellow]fail, by design[/yellow]" if c.by_design else "[red]FAIL[/red]"
        validator = f"{c.validator.passed}/{c.validator.checked}" if c.f_rule and not c.skipped else "-"
        strict = f"{c.passed}/{c.checked}" if not c.skipped else "-"
        detail = c.skipped or (c.problems[0] if c.problems else c.what)
        table.add_row(c.name, "F" if c.f_rule else "", strict, validator, result, escape(detail))
    console.print(table)
    for verdict in report.verdicts.values():
        word = "[green]PASS[/green]" if verdict.passed else "[red]FAIL[/red]"
        console.print(f"{verdict.name}: {word} ({verdict.rules}; {verdict.rollouts_checked} rollouts)"
                      + "".join(f"\n  {escape(name)}: {escape(why)}" for name, why in verdict.failed.items()))
    by_design = [c for c in report.checks if c.by_design and not c.ok]
    if by_design:
        console.print("[yellow]random weights:[/yellow] " + ", ".join(f"{c.name} {c.passed}/{c.checked}" for c in by_design)
                      + f" — {by_design[0].by_design}; counted apart, outside both verdicts")
    not_run = [c.name for c in report.checks if c.skipped]
    if not_run:
        console.print(f"not run: {', '.join(not_run)}")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from grail_pipeline.cli.progress import rate_progress
    from grail_pipeline.inference.loading import load_model, load_tokenizer
    from grail_pipeline.protocol.records import read_window_file
    from grail_pipeline.protocol.window_schema import metadata_window, row_problem
    from grail_pipeline.tools.window_check import check_window_file

    if args.proof_sample < 0:
        raise UserError("--proof-sample takes a number of rollouts, at least 0")
    if args.checkpoint_window is not None and args.checkpoint_window < 0:
        raise UserError("--checkpoint-window takes a window number, at least 0")
    path = Path(args.path)
    contents = read_window_file(path)  # an unreadable file is one line before any model loads
    rows, metadata = contents
    first = next((r for r in rows if row_problem(r) is None), None)  # malformed rows are failed checks, later
    window_start = first["window_start"] if first else metadata_window(metadata)
    deadline = status_deadline(args.status, window_start) if args.status else None  # also before the model
    model_ref = args.model or (first["commit"]["model"]["name"] if first else None)
    tokenizer = load_tokenizer(model_ref) if model_ref else None  # an empty file has nothing to score
    # progress on stdout (stderr under --json, which owns stdout): a bar on a terminal, lines in a log; only where
    # a model loads and proves (minutes on a CPU): without proofs the checks take seconds and say nothing
    progress_console = Console(file=sys.stderr if args.json else sys.stdout)
    proving = not args.skip_proofs and first is not None
    shown = rate_progress(progress_console) if proving else Progress(console=progress_console, disable=True)
    with shown as progress:
        loaded = None
        if proving:
            task = progress.add_task(f"loading {model_ref} for the validator's forward", total=None, rate="")
            loaded = load_model(model_ref, args.device)
            progress.stop_task(task)
        task = progress.add_task(f"checking {len(rows)} rollouts" + (" (proofs: every position)" if loaded else ""),
                                 total=len(rows), rate="")
        report = check_window_file(path, tokenizer, loaded, args.proof_sample, contents=contents,
                                   expected_checkpoint_window=args.checkpoint_window, deadline=deadline,
                                   on_row=lambda i, n: progress.update(task, completed=i))
        progress.update(task, completed=len(rows))
        progress.stop_task(task)
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(report)
    return 0 if report.passed else 1
