"""`grail-pipeline fleet-status`: one view of a hotkey's fleet, or of several hotkeys' fleets, read from their Redis.

Each worker's rate, claims and the time left on its soonest lease (from its heartbeat and the claim
leases), the leader, and per window the on-time rollouts (the contiguous prefix 0..N−1), the cut rollouts
and the margin before the deadline of the written file. A table by default, refreshed in place with `--watch`
(rich's Live display) until Ctrl-C, `--json` for programs; an unreachable Redis is one line (exit 2) at the
start, and a line in the table while watching.

Workers that mine several hotkeys (`mine --hotkeys`, GRAIL_HOTKEYS) are one worker of each hotkey's fleet, each
fleet under its own keys (fleet/keys.py), so one view shows them all: `--hotkey` repeated or a comma list of
addresses and/or `--hotkeys cold/hot,...` wallet names (default GRAIL_HOTKEYS, as `mine` reads it, else the
wallet's one hotkey). The table has one section per hotkey, in the order given. `--json` prints one hotkey's
snapshot as it always has; several hotkeys' snapshots come as one object keyed by hotkey address (each value that
hotkey's snapshot), so a program reading one hotkey's shape is never handed the other without asking for it.
Every hotkey is checked (address form, wallet, named once) before Redis is asked.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from grail_pipeline.cli.arguments import positive_float, whole_int
from grail_pipeline.common.errors import UserError
from grail_pipeline.protocol.profile import PROFILE

if TYPE_CHECKING:
    import redis

    from grail_pipeline.fleet.keys import FleetKeys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fleet-status", help="a fleet's workers and windows, read from its Redis",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default=None, help="default $GRAIL_REDIS_URL")
    p.add_argument("--hotkey", action="append", default=None, metavar="SS58[,SS58...]",
                   help="the fleet's hotkey address; repeated or a comma list for several fleets (with --hotkeys too). "
                        "Default: the hotkeys of --hotkeys, else $GRAIL_HOTKEYS, else the wallet's "
                        "(BT_WALLET_COLD, BT_WALLET_HOT)")
    p.add_argument("--hotkeys", default=None, metavar="COLD/HOT[,COLD/HOT...]",
                   help="the fleets of these wallets' hotkeys (names under BT_WALLET_PATH, as `mine --hotkeys` takes "
                        "them; default $GRAIL_HOTKEYS when no --hotkey is given)")
    p.add_argument("--windows", type=whole_int, default=3, help="how many recent windows to show (default 3)")
    p.add_argument("--json", action="store_true",
                   help="the snapshot as JSON; with several hotkeys one object keyed by hotkey address, each value "
                        "that hotkey's snapshot")
    p.add_argument("--watch", type=positive_float, nargs="?", const=5.0, default=None, metavar="SECONDS",
                   help="refresh the table in place every SECONDS (default 5) until Ctrl-C")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import redis

    from grail_pipeline.fleet.connection import ENV_REDIS_URL, connect, redis_url_from_env
    from grail_pipeline.fleet.keys import FleetKeys

    if args.windows < 1:
        raise UserError("--windows must be at least 1")
    if args.watch is not None and args.json:
        raise UserError("--watch refreshes the table; --json prints one snapshot (run it again for another)")
    url = args.redis_url or redis_url_from_env(os.environ)
    if url is None:
        raise UserError(f"no fleet to show: give --redis-url or set {ENV_REDIS_URL}")
    if args.redis_url is not None:
        redis_url_from_env({ENV_REDIS_URL: url})  # the same form check as the daemon's
    hotkeys = _hotkeys(args)
    client = connect(url)

    def snapshot(hotkey: str) -> dict:
        keys = FleetKeys(hotkey)
        try:
            return _snapshot(args, client, keys)
        except redis.ResponseError as exc:  # WRONGTYPE: another program wrote one of the fleet's keys as another type
            raise UserError(f"a key of the fleet under {keys.prefix}: in Redis is not what the fleet writes ({exc}); "
                            f"stop the fleet and delete the keys matching '{keys.prefix}:*'") from None
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # a window's keys hold garbage (the context
            # and the heartbeats have their own rule)
            raise UserError(f"a key of the fleet under {keys.prefix}: in Redis holds what the fleet does not write "
                            f"({type(exc).__name__}: {str(exc)[:80]})") from None

    def tables() -> str:
        return "\n\n".join(table(snapshot(hotkey)) for hotkey in hotkeys)

    if args.watch is not None:
        return _watch(tables, args.watch)
    if args.json:
        shown = snapshot(hotkeys[0]) if len(hotkeys) == 1 else {hotkey: snapshot(hotkey) for hotkey in hotkeys}
        print(json.dumps(shown, indent=2, sort_keys=True))
    else:
        print(tables())
    return 0


def _hotkeys(args: argparse.Namespace) -> list[str]:
    """The addresses of --hotkey, then the hotkeys of --hotkeys' wallets (else GRAIL_HOTKEYS' when no --hotkey is
    given; else the wallet's one hotkey), each once: every mistake is one line, before Redis is asked."""
    from grail_pipeline.mining.settings import wallet_names
    from grail_pipeline.protocol.wallet import load_signers, parse_hotkey_addresses

    addresses = parse_hotkey_addresses(args.hotkey or [], "--hotkey")
    wallets = wallet_names(args.hotkeys, os.environ) if args.hotkeys is not None or not addresses else []
    if not addresses and not wallets:
        return [_wallet_hotkey()]
    for (cold, hot), signer in zip(wallets, load_signers(wallets), strict=True):
        if signer.ss58_address in addresses:
            raise UserError(f"wallet {cold}/{hot} holds hotkey {signer.ss58_address}, already named by --hotkey")
        addresses.append(signer.ss58_address)
    return addresses


def _snapshot(args: argparse.Namespace, client: redis.Redis, keys: FleetKeys) -> dict:
    """Everything fleet-status shows, read from the fleet's keys."""
    from grail_pipeline.fleet.claims import Claims
    from grail_pipeline.fleet.context import SharedContext
    from grail_pipeline.fleet.member import FleetTimings
    from grail_pipeline.fleet.plan import WindowPlans
    from grail_pipeline.fleet.results import Results
    from grail_pipeline.fleet.status import FleetView, server_now_ms

    context = SharedContext(client, keys).current()
    timings = FleetTimings()
    windows: list[int] = []
    if context is not None and context.genesis is not None:
        now_s = server_now_ms(client) / 1000
        block = max(0, int((now_s - context.genesis) // context.block_time_s))
        current = block // context.window_blocks * context.window_blocks
        shown = min(args.windows, current // context.window_blocks + 1)  # windows before block 0 do not exist
        windows = [current - k * context.window_blocks for k in range(shown)]
    view = FleetView(client, keys, Claims(client, keys, "fleet-status", 1.0, timings.window_ttl_s),
                     Results(client, keys, timings.window_ttl_s), WindowPlans(client, keys, timings.window_ttl_s))
    return {"hotkey": keys.hotkey, "context": None if context is None else json.loads(context.to_json()),
            **view.snapshot(sorted(windows))}


def _watch(render: Callable[[], str], interval_s: float) -> int:
    """The table refreshed in place (rich Live) every `interval_s` until Ctrl-C, which ends it with exit 0; Redis
    going away mid-watch is a line in place of the table until it answers again."""
    import redis
    from rich.live import Live
    from rich.text import Text

    def frame() -> Text:
        try:
            text = render()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            text = f"Redis does not answer ({exc}); trying again every {interval_s:g} s"
        return Text(f"{text}\n(refreshed {time.strftime('%H:%M:%S')} every {interval_s:g} s; Ctrl-C to stop)")

    try:
        with Live(frame(), auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0


def _wallet_hotkey() -> str:
    from grail_pipeline.protocol.wallet import load_signer

    try:
        return load_signer(required=True).ss58_address
    except UserError as exc:
        raise UserError(f"{exc} (or give --hotkey or --hotkeys)") from None


def table(snapshot: dict) -> str:
    """The snapshot as a plain-text table: the fleet, its workers, its windows."""
    lines = [f"fleet of {snapshot['hotkey']}: " + (f"leader {snapshot['leader']}" if snapshot["leader"] else
                                                    "no leader (no worker running?)")]
    context = snapshot.get("context")
    if context:
        lines.append(f"checkpoint {context['checkpoint']}, genesis {context['genesis']:.3f}, "
                     f"{context['window_blocks']} blocks x {context['block_time_s']:g} s")
    lines.append("")
    lines.append(f"{'worker':<34} {'id':>3} {'rollouts/s':>10} {'stored':>7} {'claims':>6} {'lease s':>8} "
                 f"{'beat age':>8} {'spilled':>7}  redis")
    for name, beat in sorted(snapshot["workers"].items()):
        lease = beat.get("soonest_lease_s")
        outage = beat.get("redis_outage_s")
        lines.append(f"{name[:34]:<34} {beat.get('worker_id', '?')!s:>3} {beat.get('rollouts_per_s', 0):>10.2f} "
                     f"{beat.get('groups_stored', 0):>7} {beat.get('claims', 0):>6} "
                     f"{'-' if lease is None else f'{lease:.1f}':>8} {beat.get('age_s', 0):>8.1f} "
                     f"{beat.get('spilled', 0):>7}  {'ok' if outage is None else f'away {outage:.0f} s'}"
                     + ("  (leader)" if name == snapshot["leader"] else ""))
    for name, why in sorted(snapshot.get("unreadable_workers", {}).items()):
        lines.append(f"{name[:34]:<34} {why}")
    if not snapshot["workers"]:
        lines.append("(no worker has a heartbeat)")
    lines.append("")
    lines.append(f"{'window':>8} {'issued':>6} {'stored':>6} {'on-time rollouts':>16} {'cut rollouts':>12} "
                 f"{'leases':>6} {'margin s':>8}  file")
    for w in snapshot["windows"]:
        report = w.get("report") or {}
        margin = report.get("margin_s")
        file = (os.path.basename(report["file"]) if report.get("file") else
                "no file (no rollout)" if report.get("file_written") else "sealed" if report else "open")
        lines.append(f"{w['window_start']:>8} {w['issued']:>6} {w['stored_groups']:>6} {w['on_time_rollouts']:>16} "
                     f"{w['cut_rollouts']:>12} {w['leases']:>6} {'-' if margin is None else f'{margin:.1f}':>8}  "
                     f"{file}")
    lines.append(f"(on-time: groups 0..N-1 stored without a gap, {PROFILE.rollouts_per_problem} rollouts each; "
                 "margin: the file's time before the deadline)")
    return "\n".join(lines)
