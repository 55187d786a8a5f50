"""Prometheus metrics (`mine --metrics-port`, mining/metrics.py): what a status update turns into, and a real
Prometheus server (Debian's `prometheus`) scraping dry-run workers as emit-pm2 configured them, read back
through its HTTP query API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import block_time_for, run_cli, write_wallet
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_mine import running_daemon, signal_and_wait
from test_pm2 import entry, load_apps, need

from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.metrics import MinerMetrics
from grail_pipeline.mining.status import StatusFile
from grail_pipeline.protocol.records import read_window_file
from grail_pipeline.tools.calibration_file import save_entry
from grail_pipeline.tools.window_report import LATE, ON_TIME, load, timeline_figure

HOTKEY = "5FakeHotkeyForMetricsTests"


def samples(metrics: MinerMetrics) -> dict[tuple[str, frozenset], float]:
    """Every sample the worker would serve, by name and labels."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: MinerMetrics, name: str, **extra: str) -> float:
    labels = frozenset({"hotkey": HOTKEY, "worker": "3", "gpu": "cpu", **extra}.items())
    return samples(metrics)[(name, labels)]


def window_record(start: int, rollouts: int, cut: int, on_time: bool = True) -> dict:
    return {"window_start": start, "rollouts": rollouts, "cut_rollouts": cut, "redraws": 1, "failed_indices": [7],
            "on_time": on_time, "margin_s": 12.5 if on_time else -1.0, "write_seconds": 0.25, "file_bytes": 4096,
            "idle_gpu_s": 3.0, "rollouts_per_s": 2.0}


def test_status_updates_become_counters_and_last_window_gauges(tmp_path) -> None:
    status = StatusFile(tmp_path / "status.json", 3, 4, hotkey=HOTKEY)
    metrics = MinerMetrics(HOTKEY, 3, "cpu")
    metrics.watch(status)
    status.update(state="mining", current_window=60, checkpoint_window=30, model_name="dummy:tiny", engine="fast")
    status.update(last_window=window_record(30, 64, 16), windows_written=1)
    status.update(last_window=window_record(30, 64, 16))  # the same window again (a later update keeps it): once
    status.update(last_window=window_record(60, 32, 0, on_time=False), windows_written=2)
    status.update(self_check={"window_start": 60, "rollouts_checked": 4, "rollouts_passed": 3})
    status.update(fleet={"leader": True, "claims_held": 5, "claims_lost": 2, "claims_reissued": 1,
                         "groups": {"stored": 9, "spilled": 1}, "spilled": 1, "redis_outages": 1,
                         "redis_outage_s": 2.5, "beat_at": time.time() - 4})
    status.update(fleet={"leader": False, "claims_held": 0, "claims_lost": 3, "claims_reissued": 1,
                         "groups": {"stored": 12, "spilled": 1}, "spilled": 0, "redis_outages": 1,
                         "redis_outage_s": None, "beat_at": time.time()})
    assert value(metrics, "grail_windows_written_total") == 2
    assert value(metrics, "grail_rollouts_on_time_total") == 64  # the late file's 32 are late, not on time
    assert value(metrics, "grail_rollouts_late_total") == 32
    assert value(metrics, "grail_rollouts_cut_total") == 16
    assert value(metrics, "grail_groups_redrawn_total") == 2 and value(metrics, "grail_groups_lost_total") == 2
    assert value(metrics, "grail_write_seconds_total") == 0.5 and value(metrics, "grail_written_bytes_total") == 8192
    assert value(metrics, "grail_window_start") == 60 and value(metrics, "grail_window_rollouts_on_time") == 0
    assert value(metrics, "grail_window_margin_seconds") == -1.0
    assert value(metrics, "grail_current_window") == 60
    assert value(metrics, "grail_daemon_state", grail_daemon_state="mining") == 1
    assert value(metrics, "grail_self_check_pass_ratio") == 0.75
    assert value(metrics, "grail_fleet_claims_lapsed_total") == 3 and value(metrics, "grail_fleet_claims_held") == 0
    assert value(metrics, "grail_fleet_groups_total", outcome="stored") == 12
    assert value(metrics, "grail_fleet_redis_outages_total") == 1 and value(metrics, "grail_fleet_leader") == 0
    assert 0 <= value(metrics, "grail_fleet_heartbeat_age_seconds") < 60
    info = value(metrics, "grail_worker_info", model_name="dummy:tiny", engine="fast", version="0.1.0")
    assert info == 1


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = MinerMetrics(HOTKEY, 0, "cpu")
        with pytest.raises(UserError, match=f"--metrics-port {port}: cannot serve metrics"):
            metrics.serve(port, "127.0.0.1")


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """/metrics over HTTP, as Prometheus reads it: every sample by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def by_hotkey(scraped: dict[tuple[str, frozenset], float], name: str) -> dict[str, float]:
    return {dict(labels)["hotkey"]: v for (n, labels), v in scraped.items() if n == name}


def test_several_hotkeys_each_have_their_own_series_and_the_engine_one(tmp_path) -> None:
    """Two hotkeys' statuses on one worker (mine --hotkeys), served over HTTP: each hotkey's windows, files, cut,
    state, target and self-check under its own label, with its own values, even where both wrote the same window;
    the engine's (worker info, spare capacity, which every status repeats) once, under the first hotkey."""
    first, second = HOTKEY, "5SecondFakeHotkeyForMetrics"
    common = {"target_rollouts": 32, "hotkeys": [first, second]}
    statuses = [StatusFile(tmp_path / f"status-{hk}.json", 3, 1, hotkey=hk, **common) for hk in (first, second)]
    metrics = MinerMetrics(first, 3, "cpu")
    for hk, status in zip((first, second), statuses):
        metrics.watch(status, hk)
    port = free_ports(1)
    metrics.serve(port, "127.0.0.1")
    spare = {"window_start": 30, "hotkeys": 2, "target_rollouts": 32, "rollouts": 64, "short": {}, "busy_s": 10.0,
             "rollouts_per_s": 6.4, "spare_s": 5.0, "spare_rollouts": 32, "more_hotkeys": 1}
    for status in statuses:
        status.update(state="mining", current_window=60, engine="fast", batch_size=16, model_name="dummy:tiny")
    statuses[0].update(last_window=window_record(30, 32, 0), spare_capacity=spare)
    statuses[1].update(last_window=window_record(30, 16, 16), spare_capacity=spare)  # the same window: counted
    statuses[1].update(last_window=window_record(60, 48, 0, on_time=False), state="draining")
    statuses[1].update(self_check={"window_start": 60, "rollouts_checked": 4, "rollouts_passed": 4})
    scraped = scrape(port)
    assert by_hotkey(scraped, "grail_windows_written_total") == {first: 1, second: 2}
    assert by_hotkey(scraped, "grail_rollouts_on_time_total") == {first: 32, second: 16}
    assert by_hotkey(scraped, "grail_rollouts_late_total") == {second: 48}  # a series once it counts
    assert by_hotkey(scraped, "grail_rollouts_cut_total") == {first: 0, second: 16}
    assert by_hotkey(scraped, "grail_window_start") == {first: 30, second: 60}
    assert by_hotkey(scraped, "grail_window_rollouts_on_time") == {first: 32, second: 0}
    assert by_hotkey(scraped, "grail_target_rollouts") == {first: 32, second: 32}
    assert by_hotkey(scraped, "grail_current_window") == {first: 60, second: 60}
    assert by_hotkey(scraped, "grail_self_check_pass_ratio") == {second: 1.0}
    states = {(dict(labels)["hotkey"], dict(labels)["grail_daemon_state"]) for (n, labels), v in scraped.items()
              if n == "grail_daemon_state" and v == 1}
    assert states == {(first, "mining"), (second, "draining")}
    # the engine's: one series each, the first hotkey's labels; the info names every hotkey it serves
    assert by_hotkey(scraped, "grail_spare_capacity_rollouts") == {first: 32}
    assert by_hotkey(scraped, "grail_spare_capacity_hotkeys") == {first: 1}
    info = [dict(labels) for (n, labels), _ in scraped.items() if n == "grail_worker_info"]
    assert info == [{"hotkey": first, "worker": "3", "gpu": "cpu", "version": "0.1.0", "model_name": "dummy:tiny",
                     "engine": "fast", "batch_size": "16", "hotkeys": f"{first},{second}"}]


@pytest.mark.slow
def test_a_two_hotkey_daemon_serves_each_hotkeys_windows(tmp_path, group_seconds) -> None:
    """`mine --dry-run --hotkeys cold/hot1,cold/hot2 --metrics-port` on the CPU, its /metrics read over HTTP while it
    mines: each hotkey's rollouts counted are its own files' rows and its last window's gauge names one of its
    files; the engine's series (decode, queues, signed rollouts) are one, under the first hotkey."""
    root = tmp_path / "wallets"
    first, second = write_wallet(root, "cold", "hot1"), write_wallet(root, "cold", "hot2")
    out, log, port = tmp_path / "windows", tmp_path / "mine.log", free_ports(1)
    env = {"BT_WALLET_PATH": str(root), "GRAIL_HOTKEYS": "cold/hot1,cold/hot2"}
    # both hotkeys' groups in one batch, the deadline plan's latency (about a group: 6.8 s of a 12-s window when a
    # slow box's groups took 6 s, and every window was cut, 2026-12-03), and room
    block = block_time_for(group_seconds("fast"), groups=6)
    with running_daemon(out, env, log, "--engine", "fast", "--batch-size", "32", "--block-time", block,
                        "--target-rollouts", "16", "--metrics-port", str(port)) as proc:

        def settled() -> dict[tuple[str, frozenset], float] | None:
            """A scrape where both hotkeys wrote a file and every file's rows are counted (none written since)."""
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                scraped = scrape(port)
            except OSError:
                return None  # not serving yet
            counted = Counter(by_hotkey(scraped, "grail_rollouts_on_time_total"))
            counted.update(by_hotkey(scraped, "grail_rollouts_late_total"))
            rows = {hk: sum(file_rollouts(out, hk).values()) for hk in (first, second)}
            return scraped if all(rows.values()) and counted == rows else None

        deadline = time.monotonic() + 180
        while (scraped := settled()) is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        signal_and_wait(proc, signal.SIGTERM, timeout=60)
    for hk, start in by_hotkey(scraped, "grail_window_start").items():
        assert int(start) in file_rollouts(out, hk), (hk, start)  # that hotkey's file, not the other's
    assert set(by_hotkey(scraped, "grail_window_start")) == {first, second}
    assert by_hotkey(scraped, "grail_target_rollouts") == {first: 16, second: 16}
    for name in ("grail_decode_steps_total", "grail_rollouts_signed_total", "grail_gpu_idle_seconds_total",
                 "grail_kv_pages", "grail_kv_pages_peak", "grail_kv_preemptions_total"):
        assert set(by_hotkey(scraped, name)) == {first}, name
    # the default cache: pages for every slot's longest sequence, some held, none ever short
    pages = by_hotkey(scraped, "grail_kv_pages")[first]
    assert 0 < by_hotkey(scraped, "grail_kv_pages_peak")[first] < pages
    assert by_hotkey(scraped, "grail_kv_preemptions_total")[first] == 0
    (info,) = [dict(labels) for (n, labels), _ in scraped.items() if n == "grail_worker_info"]
    assert info["hotkey"] == first and info["hotkeys"] == f"{first},{second}"


# --- emit-pm2's ports and scrape configuration -------------------------------------------------------------------


def cpu_calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.yaml"
    save_entry(path, entry("cpu", "fast", 16, model="dummy:tiny", max_new_tokens=16, length_profile="fixed:16"))
    return path


def test_emit_pm2_gives_each_worker_a_port_and_writes_the_scrape_configuration(tmp_path, capsys) -> None:
    out = tmp_path / "node" / "dry-run.config.js"
    rc, stdout, err = run_cli(capsys, "emit-pm2", "--calibration", str(cpu_calibration(tmp_path)), "--target",
                              "dry-run", "--gpus", "0,1,2", "--gpu-kind", "cpu", "--wallet-cold", "c", "--wallet-hot",
                              "h", "--cwd", str(tmp_path), "--redis-url", "redis://hub:6379/0", "--no-redis-app",
                              "--metrics-port", "9500", "--metrics-host", "node-7.example", "--scrape-interval", "2",
                              "--out", str(out))
    assert rc == 0 and stdout == "", err
    apps = load_apps(out.read_text(), tmp_path)
    assert [a["args"][a["args"].index("--metrics-port") + 1] for a in apps] == ["9500", "9501", "9502"]
    # another host than this one scrapes them: every worker listens on every interface
    assert all(a["args"][a["args"].index("--metrics-address") + 1] == "0.0.0.0" for a in apps)
    scrape = out.parent / "prometheus.yml"  # beside the ecosystem file
    config = yaml.safe_load(scrape.read_text())
    assert config["global"]["scrape_interval"] == "2s"
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"node-7.example:{p}" for p in (9500, 9501, 9502)]
    check = subprocess.run([need("promtool"), "check", "config", str(scrape)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr  # Prometheus's own checker accepts it


@pytest.mark.parametrize(("flags", "message"), [
    (["--target", "grail", "--engine", "hf", "--metrics-port", "9400"], "--metrics-port is for --target dry-run"),
    (["--target", "dry-run", "--metrics-port", "65535"], "passes port 65535"),
    (["--target", "dry-run", "--metrics-port", "70000"], "is not a port"),
])
def test_bad_metrics_flags_are_one_line(tmp_path, capsys, flags, message) -> None:
    rc, out, err = run_cli(capsys, "emit-pm2", "--calibration", str(cpu_calibration(tmp_path)), "--gpus", "0,1",
                           "--gpu-kind", "cpu", "--wallet-cold", "c", "--wallet-hot", "h", "--redis-url",
                           "redis://hub:6379/0", *flags)
    assert rc == 2 and message in err and err.count("\n") == 1 and out == "", err
    assert not (tmp_path / "prometheus.yml").exists()


# --- a real Prometheus ------------------------------------------------------------------------------------------


def free_ports(count: int) -> int:
    """The first of `count` consecutive free local ports."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            held = []
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no consecutive free ports")


class Prometheus:
    """A real Prometheus server with a given configuration, its data in a temp dir."""

    def __init__(self, config: Path, directory: Path) -> None:
        self.port = free_ports(1)
        self.log = directory / "prometheus.log"
        with open(self.log, "w") as handle:
            self.process = subprocess.Popen(
                [need("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=handle, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except OSError:
            return []  # not listening yet
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def by_worker(self, expr: str) -> dict[str, float]:
        return {r["metric"]["worker"]: float(r["value"][1]) for r in self.query(expr)}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def file_rollouts(out: Path, hotkey: str) -> dict[int, int]:
    """Rollouts in each window file: window start -> rows."""
    return {int(p.name.rsplit("-", 1)[1].split(".")[0]): len(read_window_file(p)[0])
            for p in out.glob(f"{hotkey}-window-*.parquet")}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_prometheus_scrapes_the_workers_emit_pm2_configured(tmp_path, capsys, redis_server, workers) -> None:
    """emit-pm2's apps (run as it wrote them, without PM2) and its scrape configuration (1-s scrapes) with a real
    Prometheus: every worker shows, the last window's on-time rollouts are what that window's file holds, and
    the run's on-time rollouts summed over the workers are the files' rows."""
    hotkey = write_wallet(tmp_path / "wallets")
    calibration = tmp_path / "calibration.yaml"
    save_entry(calibration, entry("cpu", "fast", 16, model="dummy:tiny", max_new_tokens=16, length_profile="fixed:16"))
    fleet = ["--redis-url", redis_server.url, "--no-redis-app"] if workers > 1 else []
    rc, _, err = run_cli(capsys, "emit-pm2", "--calibration", str(calibration), "--target", "dry-run",
                         "--gpus", ",".join(map(str, range(workers))), "--gpu-kind", "cpu", "--wallet-cold", "cold",
                         "--wallet-hot", "hot", "--wallet-path", str(tmp_path / "wallets"), "--cwd", str(tmp_path),
                         "--block-time", "0.8", "--drain-timeout", "30", "--env", "OMP_NUM_THREADS=1",
                         "--metrics-port", str(free_ports(workers)), "--scrape-interval", "1", *fleet,
                         "--out", str(tmp_path / "ecosystem.config.js"))
    assert rc == 0, err
    scrape = tmp_path / "prometheus.yml"
    assert f"Prometheus scrape configuration for the workers' metrics: {scrape}" in err
    apps = load_apps((tmp_path / "ecosystem.config.js").read_text(), tmp_path)
    out = tmp_path / "dry-run"
    prometheus = Prometheus(scrape, tmp_path)
    procs, logs = [], []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BT_WALLET", "GRAIL_", "CUDA_VISIBLE"))}
    try:
        for app in apps:
            logs.append(tmp_path / f"{app['name']}.log")
            with open(logs[-1], "w") as handle:
                procs.append(subprocess.Popen([app["script"], *app["args"], "--warmup-problems", "0"],
                                              env={**env, **app["env"]}, cwd=app["cwd"], stdout=handle,
                                              stderr=subprocess.STDOUT))

        def settled() -> bool:
            """Every worker scraped, and the on-time rollouts Prometheus holds are the files' rows."""
            assert all(p.poll() is None for p in procs), "\n".join(p.read_text()[-3000:] for p in logs)
            if len(prometheus.by_worker("grail_worker_info")) < workers:
                return False
            if workers > 1 and len(prometheus.by_worker("grail_fleet_heartbeat_age_seconds")) < workers:
                return False  # each worker's fleet part (written with every third heartbeat)
            files = file_rollouts(out, hotkey) if out.exists() else {}
            total = sum(prometheus.by_worker("grail_rollouts_on_time_total").values())
            return bool(files) and total == sum(files.values()) > 0

        deadline = time.monotonic() + 240
        while not settled():
            assert time.monotonic() < deadline, (prometheus.log.read_text()[-2000:] + "\n".join(
                p.read_text()[-3000:] for p in logs))
            time.sleep(1)
        files = file_rollouts(out, hotkey)
        assert set(prometheus.by_worker("grail_worker_info")) == {str(w) for w in range(workers)}
        last = prometheus.by_worker("grail_window_start")
        on_time = prometheus.by_worker("grail_window_rollouts_on_time")
        assert last, "no worker reported a window"
        for worker, start in last.items():  # the writer(s) of the files: its last window is that file
            assert on_time[worker] == files[int(start)], (worker, start, files)
        labels = prometheus.query("grail_rollouts_signed_total")[0]["metric"]
        assert labels["hotkey"] == hotkey and labels["gpu"] in {str(w) for w in range(workers)}
        assert labels["job"] == "grail-pipeline" and labels["node"] == "0"
        assert prometheus.by_worker("grail_decode_steps_total") and prometheus.by_worker("grail_queue_depth")
        assert set(prometheus.by_worker("grail_checkpoint_window").values()) == {0.0}  # dummy:tiny's window
        if workers > 1:  # the fleet's view from each worker: at most one leader, claims and heartbeats
            assert sum(prometheus.by_worker("grail_fleet_leader").values()) <= 1
            assert set(prometheus.by_worker("grail_fleet_claims_held")) == {"0", "1"}
            assert all(age < 60 for age in prometheus.by_worker("grail_fleet_heartbeat_age_seconds").values())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        prometheus.stop()
    # the same run's status files drawn by `report`: a bar per window each worker wrote, their rollouts the files'
    statuses = sorted(str(p) for p in out.glob("status-worker-*.json"))
    assert len(statuses) == workers
    rc, text, err = run_cli(capsys, "report", *statuses, "--html", str(tmp_path / "report.html"))
    assert rc == 0 and (out / "windows.png").is_file() and (tmp_path / "report.html").is_file(), err
    rollouts = timeline_figure(load(statuses)).axes[0]
    drawn = sum(p.get_height() for c in rollouts.containers if c.get_label().startswith((ON_TIME, LATE))
                for p in c.patches)
    assert drawn == sum(file_rollouts(out, hotkey).values())
