"""calibration.yaml: what `calibrate` chose per GPU kind and engine, and what `emit-pm2` reads back.

One file serves a fleet with several GPU kinds, so entries are keyed by the GPU's name as the driver
reports it ("cpu" off the GPU) and then by engine; writing one entry keeps every other, under a lock so
that two GPU kinds can be calibrated at the same time. Anything missing, corrupt or non-numeric is one
UserError line naming the file and the field.
"""

from __future__ import annotations

import fcntl
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grail_pipeline.common.atomic import write_atomically
from grail_pipeline.common.errors import UserError
from grail_pipeline.common.input_file import read_text

KIND = "grail-pipeline-calibration"
FORMAT = 1
CPU_KIND = "cpu"
HEADER = (
    "# Written by `grail-pipeline calibrate`; read by `grail-pipeline emit-pm2`.\n"
    "# calibrations: GPU name -> engine -> the sweep (rows) and the chosen batch size.\n"
    "# A new calibration replaces only its own GPU kind and engine.\n"
)


@dataclass(frozen=True)
class Choice:
    """What a PM2 app needs from one entry."""

    gpu: str
    engine: str
    batch_size: int
    attention: str
    model: str
    max_new_tokens: int
    max_prompt_tokens: int
    length_profile: str
    kv_cache_gb: float | None = None  # the fast engine's KV cache the sweep ran with (None: every slot's longest)


def load_calibrations(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The `calibrations` mapping of a file, or a UserError if it is missing or not ours."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"calibration file {file} does not exist; run `grail-pipeline calibrate` first")
    text = read_text(file, "calibration file")
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"calibration file {file} is nested too deep to read") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"calibration file {file} is not valid YAML{line}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UserError(f"{file} is not a grail-pipeline calibration file (no 'kind: {KIND}')")
    if data.get("format") != FORMAT:
        raise UserError(f"{file} has calibration format {data.get('format')!r}; this version reads {FORMAT}")
    calibrations = data.get("calibrations")
    if not isinstance(calibrations, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in calibrations.items()):
        raise UserError(f"{file}: 'calibrations' must map GPU names to engines")
    return calibrations


def save_entry(path: str | os.PathLike[str], entry: Mapping[str, Any]) -> None:
    """Add or replace `entry` (keyed by its gpu.name and engine), keeping every other entry."""
    file = Path(path)
    with _locked(file):
        calibrations = load_calibrations(file) if file.exists() else {}
        calibrations.setdefault(entry["gpu"]["name"], {})[entry["engine"]] = dict(entry)
        document = dict(kind=KIND, format=FORMAT, calibrations=calibrations)
        text = HEADER + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)
        write_atomically(file, text.encode("utf-8"))


@contextmanager
def _locked(file: Path) -> Iterator[None]:
    """Serialise read-merge-write across processes through `.{name}.lock`, removed by its holder before it lets
    go (nothing is left behind). A process that waited on a lock file its holder removed finds that the name no
    longer points at the file it locked, and locks again."""
    file.parent.mkdir(parents=True, exist_ok=True)
    path = file.with_name(f".{file.name}.lock")
    while True:
        with open(path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                continue
            try:
                yield
            finally:
                path.unlink(missing_ok=True)
            return


def engines_for(calibrations: Mapping[str, Any], gpu: str) -> list[str]:
    return sorted(calibrations.get(gpu, {}))


def read_choice(calibrations: Mapping[str, Any], path: str | os.PathLike[str], gpu: str, engine: str) -> Choice:
    """The chosen settings for one GPU kind and engine, each field checked."""
    if gpu not in calibrations:
        known = ", ".join(f"'{k}'" for k in sorted(calibrations)) or "none"
        raise UserError(f"GPU kind '{gpu}' is not in {path} (calibrated: {known}); "
                        f"run `grail-pipeline calibrate` on that GPU kind")
    if engine not in calibrations[gpu]:
        raise UserError(f"{path} has no '{engine}' calibration for '{gpu}' (has: "
                        f"{', '.join(engines_for(calibrations, gpu)) or 'none'}); "
                        f"run `grail-pipeline calibrate --engine {engine}` on that GPU kind")
    entry = calibrations[gpu][engine]
    where = f"{path}: {gpu} / {engine}"
    if not isinstance(entry, dict) or entry.get("chosen") is None:
        raise UserError(f"{where}: no batch size was chosen; calibrate again")
    return Choice(gpu=gpu, engine=engine,
                  batch_size=_field(entry, "chosen.batch_size", int, where),
                  attention=_field(entry, "attention", str, where),
                  model=_field(entry, "model", str, where),
                  max_new_tokens=_field(entry, "workload.max_new_tokens", int, where),
                  max_prompt_tokens=_field(entry, "workload.max_prompt_tokens", int, where),
                  length_profile=_field(entry, "workload.length_profile", str, where),
                  kv_cache_gb=_kv_cache_gb(entry, where))


def _kv_cache_gb(entry: Mapping[str, Any], where: str) -> float | None:
    """workload.kv_cache_gb: absent or null (every slot's longest sequence, and files written before it existed), or
    a positive finite number of GB."""
    value = (entry.get("workload") or {}).get("kv_cache_gb") if isinstance(entry.get("workload"), dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: workload.kv_cache_gb must be a positive number of GB or null, got {value!r}")
    return float(value)


def _field(entry: Mapping[str, Any], dotted: str, kind: type, where: str) -> Any:
    value: Any = entry
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where}: {dotted} must be a whole number of at least 1, got {value!r}")
    elif not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {dotted} must be a non-empty string, got {value!r}")
    return value
