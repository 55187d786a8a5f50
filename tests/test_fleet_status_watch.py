"""`fleet-status --watch`: the table refreshed in place (rich Live) from a fleet's real Redis until Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from grail_pipeline.fleet.context import FleetContext
from grail_pipeline.fleet.member import FleetMember
from grail_pipeline.mining.fleet_worker import timings_for
from grail_pipeline.protocol.wallet import ephemeral_signer


def test_watch_refreshes_the_table_in_place_until_ctrl_c(tmp_path, redis_server) -> None:
    hotkey = ephemeral_signer().ss58_address  # a fleet of its own in the shared Redis
    member = FleetMember.join(redis_server.url, hotkey, FleetContext(
        genesis=time.time() - 5, run_seed=0, block_time_s=0.4, window_blocks=30, checkpoint="ckpt"),
        tmp_path / "spill", timings_for(12.0), worker="w-a")
    member.heartbeats.beat(worker_id=0, rollouts_per_s=12.5, groups_stored=3, spilled=0, redis_outage_s=None)
    # TTY_INTERACTIVE/TTY_COMPATIBLE: rich treats the pipe as the terminal an operator watches in
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "grail_pipeline", "fleet-status", "--redis-url", redis_server.url,
                             "--hotkey", hotkey, "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    shown: list[str] = []
    reader = threading.Thread(target=lambda: shown.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 60  # a loaded machine may take seconds to import and draw
        while text not in "".join(shown):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(shown) + proc.stderr.read()
            time.sleep(0.1)

    try:
        wait_for("12.50")
        member.heartbeats.beat(worker_id=0, rollouts_per_s=25.0, groups_stored=5, spilled=0, redis_outage_s=None)
        wait_for("25.00")  # the beat's change reached the table
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = "".join(shown), proc.stderr.read()
    assert proc.returncode == 0, err  # Ctrl-C is how a watch ends
    assert "\x1b[" in out and "Ctrl-C to stop" in out  # redrawn in place (cursor movement), not appended
    assert err == ""
