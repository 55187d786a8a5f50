"""Prometheus metrics of one worker (`mine --metrics-port`), served over HTTP by prometheus-client.

Nothing here runs on the generation path or in the event loop's hot spots. Two sources, both values the daemon
keeps anyway:
- **The status files' updates** (`StatusFile.listen`, one feed per hotkey's status): each window's record
  (`last_window`), the self-check, the target, the fleet part and the state go into counters and gauges in the
  thread that wrote the status (a few additions).
- **A collector read at scrape time**, in the HTTP server's thread: the pipeline's stage counters, queue depths
  and GPU idle time, the engine's decode counters, torch's and the driver's GPU memory, the checkpoint and its
  rotations. Reads of numbers another thread writes; nothing is locked that generation waits on.

Names follow Prometheus's conventions (`_total` counters, `_seconds`, `_bytes`, ratios 0..1), every series
labelled with a `hotkey`, the `worker` (GRAIL_WORKER_ID) and the `gpu` (CUDA_VISIBLE_DEVICES, or `cpu`).
A window's own numbers are gauges of the last window written (`grail_window_*`, with `grail_window_start`
naming it) and counters over the run (`grail_rollouts_on_time_total`, ...), so no series is made per window.

Several hotkeys on one engine (`mine --hotkeys`, mining/hotkeys.py): what is a hotkey's own (its state and
current window, its windows' files, cut and redrawn groups, self-check, target) is labelled with that hotkey,
from its own status file. What the engine does for all of them (stages, queues, decode steps and occupancy, GPU
memory, rollouts signed, the checkpoint, spare capacity, `grail_worker_info`) is one series per worker, labelled
with the worker's hotkey: the first listed, whose unit runs the others. Not a made-up value such as `all`: a
worker of one hotkey (every fleet worker) keeps the labels it always had, an engine series keeps one identity
whether the engine serves one hotkey or several, and `hotkey` always names a real hotkey; `grail_worker_info`'s
`hotkeys` label lists every hotkey the engine serves, in fill order. So `sum by (hotkey)` is meaningful for a
hotkey's own series only; an engine series is joined to its hotkeys by `worker` and `gpu`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from grail_pipeline import __version__
from grail_pipeline.common.errors import UserError
from grail_pipeline.mining.status import STATES, StatusFile

if TYPE_CHECKING:
    from grail_pipeline.mining.daemon import Daemon

logger = logging.getLogger("grail_pipeline")

LABELS = ("hotkey", "worker", "gpu")
FLEET_OUTCOMES = ("stored", "duplicate", "late", "spilled", "released")
INFO_FIELDS = ("model_name", "engine", "batch_size", "hotkeys")  # grail_worker_info's labels, from the status


class MinerMetrics:
    """One worker's metrics: a registry of its own, fed by its hotkeys' status updates and read live from its
    daemon. `labels` are the worker's, with its (first) hotkey: the engine's series carry them."""

    def __init__(self, hotkey: str, worker: int, gpu: str) -> None:
        self.labels = {"hotkey": hotkey, "worker": str(worker), "gpu": gpu}
        self.registry = CollectorRegistry(auto_describe=True)
        self.daemon: Daemon | None = None
        self.feeds: list[_StatusFeed] = []
        self._info: dict[str, str] = {}
        r, names = self.registry, list(LABELS)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=r)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*names, *extra], registry=r)

        self.info = Info("grail_worker", "the worker's model, engine, version and the hotkeys its engine serves",
                         names, registry=r)
        self.state = Enum("grail_daemon_state", "the daemon's state (status file `state`)", names, states=list(STATES),
                          registry=r)
        self.current_window = gauge("grail_current_window", "start block of the window being mined")
        self.target = gauge("grail_target_rollouts", "rollouts per window at which the hotkey's file stops "
                            "(--target-rollouts; absent: as many as the deadline allows)")
        self.windows = counter("grail_windows_written", "window files written")
        self.on_time = counter("grail_rollouts_on_time", "rollouts in window files ready before their deadline")
        self.late = counter("grail_rollouts_late", "rollouts in window files ready after their deadline")
        self.cut = counter("grail_rollouts_cut", "rollouts generated but not in their window's file")
        self.redrawn = counter("grail_groups_redrawn", "groups drawn again after a dropped completion")
        self.lost = counter("grail_groups_lost", "problem indices that failed every draw (each ends its file)")
        self.write_s = counter("grail_write_seconds", "seconds spent writing window files")
        self.write_b = counter("grail_written_bytes", "bytes of window files written")
        self.last = {key: gauge(f"grail_window_{key}", doc) for key, doc in (
            ("start", "start block of the last window written"),
            ("rollouts_on_time", "rollouts in the last window's file (0 when it was late)"),
            ("rollouts_cut", "rollouts of the last window generated but cut"),
            ("groups_redrawn", "groups of the last window drawn again"),
            ("groups_lost", "problem indices of the last window that failed every draw"),
            ("margin_seconds", "seconds the last window's file was ready before its deadline (negative: late)"),
            ("write_seconds", "seconds the last window's file took to write"),
            ("file_bytes", "size of the last window's file"),
            ("gpu_idle_seconds", "seconds the GPU side had no group between the last two files"),
            ("rollouts_per_second", "on-time rollouts per second of the last window"),
        )}
        self.spare = {key: gauge(f"grail_spare_capacity_{name}", doc) for key, name, doc in (
            ("window_start", "window", "the latest window whose every hotkey's file is in (mining/fill.py)"),
            ("spare_rollouts", "rollouts", "rollouts the engine could still have made in that window, past every "
             "hotkey's target (0 when one fell short)"),
            ("spare_s", "seconds", "seconds from that window's last file to its cut"),
            ("more_hotkeys", "hotkeys", "whole targets in the spare rollouts: more hotkeys the engine could serve"),
        )}
        self.checked = counter("grail_self_check_rollouts_checked", "rollouts re-verified by --verify-sample")
        self.passed = counter("grail_self_check_rollouts_passed", "re-verified rollouts that passed")
        self.pass_ratio = gauge("grail_self_check_pass_ratio", "the last window's self-check pass rate (0..1)")
        self.fleet_leader = gauge("grail_fleet_leader", "1 while this worker holds the fleet's leader lease")
        self.fleet_claims = gauge("grail_fleet_claims_held", "problem indices claimed and not yet delivered")
        self.fleet_lapsed = counter("grail_fleet_claims_lapsed", "claims whose lease lapsed to another worker")
        self.fleet_reissued = counter("grail_fleet_claims_reissued", "claims taken over from a worker whose lease lapsed")
        self.fleet_groups = counter("grail_fleet_groups", "signed groups handed to the fleet, by outcome", ("outcome",))
        self.fleet_spill = gauge("grail_fleet_spilled_groups", "signed groups waiting in the local spill")
        self.fleet_outage = gauge("grail_fleet_redis_outage_seconds", "seconds Redis has not answered (0: it answers)")
        self.fleet_outages = counter("grail_fleet_redis_outages", "times Redis stopped answering")
        self.registry.register(_LiveCollector(self))

    def watch(self, status: StatusFile, hotkey: str | None = None) -> None:
        """Feed the metrics from one hotkey's status file (`hotkey`: the worker's own when None), from now on."""
        feed = _StatusFeed(self, self.labels["hotkey"] if hotkey is None else hotkey)
        self.feeds.append(feed)
        feed.observe(status.data)
        status.listen(feed.observe)

    def _engine_fields(self, fields: dict[str, Any]) -> None:
        """What every hotkey's status repeats about the engine, taken from the worker's own hotkey's only."""
        if any(k in fields for k in INFO_FIELDS):
            for key in INFO_FIELDS:
                if key in fields and fields[key] is not None:
                    value = fields[key]
                    self._info[key] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            self.info.labels(**self.labels).info({"version": __version__, **self._info})
        spare = fields.get("spare_capacity")
        if isinstance(spare, dict):
            for key, gauge in self.spare.items():
                if isinstance(spare.get(key), int | float):
                    gauge.labels(**self.labels).set(float(spare[key]))

    # -- serving ------------------------------------------------------------------------------------------
    def serve(self, port: int, address: str) -> None:
        """Serve /metrics on `address:port` from a daemon thread; a port in use is one UserError line."""
        try:
            start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            raise UserError(f"--metrics-port {port}: cannot serve metrics on {address}:{port} "
                            f"({exc.strerror or exc})") from None
        logger.info("Prometheus metrics on http://%s:%d/metrics", address, port)


class _StatusFeed:
    """One hotkey's status updates (StatusFile.listen) into the metrics, under that hotkey's label; what it
    has counted already (a window, a self-check, the fleet's running totals) is its own, so a hotkey's update
    never hides another's. The engine's fields only through the worker's own hotkey's feed."""

    def __init__(self, metrics: MinerMetrics, hotkey: str) -> None:
        self.metrics = metrics
        self.labels = {**metrics.labels, "hotkey": hotkey}
        self.feeds_engine = hotkey == metrics.labels["hotkey"]
        self.fleet: dict[str, Any] = {}
        self._seen_window: int | None = None
        self._seen_check: int | None = None
        self._fleet_counted: dict[str, int] = {}

    def observe(self, fields: dict[str, Any]) -> None:
        """One status update: the fields it changed."""
        m, labels = self.metrics, self.labels
        if self.feeds_engine:
            m._engine_fields(fields)
        if fields.get("state") in STATES:
            m.state.labels(**labels).state(fields["state"])
        if isinstance(fields.get("current_window"), int):
            m.current_window.labels(**labels).set(fields["current_window"])
        if isinstance(fields.get("target_rollouts"), int):
            m.target.labels(**labels).set(fields["target_rollouts"])
        if isinstance(fields.get("last_window"), dict):
            self._window(fields["last_window"])
        if isinstance(fields.get("self_check"), dict):
            self._self_check(fields["self_check"])
        if isinstance(fields.get("fleet"), dict):
            self._fleet_part(fields["fleet"])

    def _window(self, w: dict[str, Any]) -> None:
        if w.get("window_start") == self._seen_window:
            return
        self._seen_window = w["window_start"]
        m, labels = self.metrics, self.labels
        on_time = bool(w.get("on_time", True))
        rollouts, lost = int(w.get("rollouts", 0)), len(w.get("failed_indices") or [])
        m.windows.labels(**labels).inc()
        (m.on_time if on_time else m.late).labels(**labels).inc(rollouts)
        m.cut.labels(**labels).inc(int(w.get("cut_rollouts", 0)))
        m.redrawn.labels(**labels).inc(int(w.get("redraws", 0)))
        m.lost.labels(**labels).inc(lost)
        m.write_s.labels(**labels).inc(float(w.get("write_seconds", 0.0)))
        m.write_b.labels(**labels).inc(int(w.get("file_bytes", 0)))
        values = {"start": w["window_start"], "rollouts_on_time": rollouts if on_time else 0,
                  "rollouts_cut": w.get("cut_rollouts", 0), "groups_redrawn": w.get("redraws", 0),
                  "groups_lost": lost, "margin_seconds": w.get("margin_s"), "write_seconds": w.get("write_seconds"),
                  "file_bytes": w.get("file_bytes"), "gpu_idle_seconds": w.get("idle_gpu_s"),
                  "rollouts_per_second": w.get("rollouts_per_s")}
        for key, value in values.items():
            if value is not None:
                m.last[key].labels(**labels).set(float(value))

    def _self_check(self, check: dict[str, Any]) -> None:
        if "rollouts_checked" not in check or check.get("window_start") == self._seen_check:
            return
        self._seen_check = check.get("window_start")
        m, labels = self.metrics, self.labels
        checked, passed = int(check["rollouts_checked"]), int(check["rollouts_passed"])
        m.checked.labels(**labels).inc(checked)
        m.passed.labels(**labels).inc(passed)
        if checked:
            m.pass_ratio.labels(**labels).set(passed / checked)

    def _fleet_part(self, fleet: dict[str, Any]) -> None:
        """The fleet part of the status (FleetWorker.describe): its running totals become counters by difference."""
        self.fleet = fleet
        m, labels = self.metrics, self.labels
        m.fleet_leader.labels(**labels).set(1 if fleet.get("leader") else 0)
        m.fleet_claims.labels(**labels).set(int(fleet.get("claims_held", 0)))
        m.fleet_spill.labels(**labels).set(int(fleet.get("spilled", 0)))
        m.fleet_outage.labels(**labels).set(float(fleet.get("redis_outage_s") or 0.0))
        totals = {"lapsed": fleet.get("claims_lost", 0), "reissued": fleet.get("claims_reissued", 0),
                  "outages": fleet.get("redis_outages", 0),
                  **{f"groups:{k}": (fleet.get("groups") or {}).get(k, 0) for k in FLEET_OUTCOMES}}
        for key, total in totals.items():
            grown = int(total) - self._fleet_counted.get(key, 0)
            if grown <= 0:
                continue
            self._fleet_counted[key] = int(total)
            if key.startswith("groups:"):
                m.fleet_groups.labels(**labels, outcome=key.split(":", 1)[1]).inc(grown)
            else:
                {"lapsed": m.fleet_lapsed, "reissued": m.fleet_reissued,
                 "outages": m.fleet_outages}[key].labels(**labels).inc(grown)


class _LiveCollector(Collector):
    """What changes between status updates, read from the daemon when Prometheus scrapes."""

    def __init__(self, metrics: MinerMetrics) -> None:
        self.metrics = metrics
        self._rollouts: tuple[float, int] | None = None  # (time, rollouts signed) at the previous scrape
        self._decoded: tuple[int, float, int, int] | None = None  # the engine's decode counters then
        self._nvml: Any = None

    def describe(self) -> Iterator:
        return iter(())  # dynamic: what a scrape finds (a pipeline, a GPU, a fleet) depends on the moment

    def collect(self) -> Iterator:
        metrics = self.metrics
        daemon = metrics.daemon
        names, values = list(LABELS), [metrics.labels[k] for k in LABELS]
        beats = [feed for feed in metrics.feeds if feed.fleet.get("beat_at")]
        if beats:
            age = GaugeMetricFamily("grail_fleet_heartbeat_age_seconds", "seconds since this worker's last heartbeat "
                                    "reached Redis", labels=names)
            for feed in beats:
                age.add_metric([feed.labels[k] for k in LABELS], max(0.0, time.time() - float(feed.fleet["beat_at"])))
            yield age
        if daemon is None:
            return
        pipeline, engine = daemon.pipeline, daemon.engine
        if pipeline is not None:
            busy = CounterMetricFamily("grail_stage_busy_seconds", "busy seconds of each pipeline stage (generate: "
                                       "the engine's prefill and decode)", labels=[*names, "stage"])
            for stage, seconds in pipeline.stage_seconds().items():
                busy.add_metric([*values, stage], seconds)
            yield busy
            depth = GaugeMetricFamily("grail_queue_depth", "items waiting in front of each stage",
                                      labels=[*names, "queue"])
            for queue, items in pipeline.queue_depths().items():
                depth.add_metric([*values, queue], items)
            yield depth
            idle = CounterMetricFamily("grail_gpu_idle_seconds", "seconds no group was generating or proving",
                                       labels=names)
            idle.add_metric(values, pipeline.idle.seconds())
            yield idle
            rollouts = pipeline.times.rollouts
            signed = CounterMetricFamily("grail_rollouts_signed", "rollouts signed (before the window's file)",
                                         labels=names)
            signed.add_metric(values, rollouts)
            yield signed
            rate = GaugeMetricFamily("grail_rollouts_per_second", "rollouts signed per second since the previous "
                                     "scrape", labels=names)
            rate.add_metric(values, self._rate(rollouts))
            yield rate
        if engine is not None:
            yield from self._decode(engine.stats, names, values)
            yield from self._kv_pages(engine, names, values)
        runtime = daemon.runtime
        if runtime is not None:
            checkpoint = GaugeMetricFamily("grail_checkpoint_window", "the window of the checkpoint in use (a "
                                           "rotation copies a new one in as its window opens)", labels=names)
            checkpoint.add_metric(values, runtime.loaded.checkpoint_window)
            yield checkpoint
            yield from self._gpu_memory(runtime.loaded.device, names, values)
        if daemon.rotation is not None:
            switches = list(daemon.rotation.switches)
            count = CounterMetricFamily("grail_checkpoint_rotations", "checkpoint changes", labels=names)
            count.add_metric(values, len(switches))
            yield count
            if switches:
                last = GaugeMetricFamily("grail_checkpoint_rotation_seconds", "seconds the last checkpoint change "
                                         "took (weights copied, or the engine restarted)", labels=names)
                last.add_metric(values, switches[-1].seconds)
                yield last

    def _rate(self, rollouts: int) -> float:
        now, before = time.monotonic(), self._rollouts
        self._rollouts = (now, rollouts)
        if before is None or now <= before[0] or rollouts < before[1]:  # the first scrape, or a new pipeline
            return 0.0
        return (rollouts - before[1]) / (now - before[0])

    def _decode(self, stats: Any, names: list[str], values: list[str]) -> Iterator:
        steps, seconds = stats.decode_steps, stats.decode_seconds
        slots, occupied = stats.slot_steps, stats.occupied_slot_steps
        for name, doc, value in (("grail_decode_steps", "decode steps", steps),
                                 ("grail_decode_seconds", "seconds in decode steps", seconds),
                                 ("grail_generated_tokens", "tokens generated", stats.generated_tokens),
                                 ("grail_kv_preemptions", "groups preempted for want of KV pages (run again from "
                                  "their prompt: more --kv-cache-gb if it keeps rising)", stats.preemptions),
                                 ("grail_kv_preempted_tokens", "tokens the preempted groups had generated, dropped",
                                  stats.preempted_tokens)):
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family
        before, self._decoded = self._decoded, (steps, seconds, slots, occupied)
        if before is not None and steps > before[0]:
            step_s = (seconds - before[1]) / (steps - before[0])
            occupancy = (occupied - before[3]) / max(1, slots - before[2])
        else:
            step_s = seconds / steps if steps else 0.0
            occupancy = stats.occupancy
        step = GaugeMetricFamily("grail_decode_step_seconds", "mean decode step time since the previous scrape",
                                 labels=names)
        step.add_metric(values, step_s)
        yield step
        occ = GaugeMetricFamily("grail_decode_slot_occupancy", "share of decode slots holding a rollout since the "
                                "previous scrape (0..1)", labels=names)
        occ.add_metric(values, occupancy)
        yield occ

    def _kv_pages(self, engine: Any, names: list[str], values: list[str]) -> Iterator:
        """The fast engine's paged KV cache: its pages and the most held at once (how full --kv-cache-gb runs)."""
        pages = getattr(engine, "kv_pages", None)
        if pages is None:
            return  # the hf engine: no cache of ours
        for name, doc, value in (("grail_kv_pages", "pages of the fast engine's KV cache (64 positions each, the "
                                  "scratch page included)", pages),
                                 ("grail_kv_pages_peak", "most KV pages held at once so far", engine.stats.peak_kv_pages)):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family

    def _gpu_memory(self, device: Any, names: list[str], values: list[str]) -> Iterator:
        if getattr(device, "type", None) != "cuda":
            return
        import torch  # loaded already: the daemon runs on it

        from grail_pipeline.inference.devices import load_nvml, process_gpu_memory_gb

        index = device.index if device.index is not None else torch.cuda.current_device()
        reserved = GaugeMetricFamily("grail_gpu_memory_reserved_bytes", "GPU memory torch's allocator holds",
                                     labels=names)
        reserved.add_metric(values, torch.cuda.memory_reserved(index))
        yield reserved
        if self._nvml is None:
            self._nvml = load_nvml() or False
        used = process_gpu_memory_gb(self._nvml, index) if self._nvml else None
        if used is not None:
            process = GaugeMetricFamily("grail_gpu_memory_process_bytes", "this process's GPU memory (NVML)",
                                        labels=names)
            process.add_metric(values, used * 1e9)
            yield process
