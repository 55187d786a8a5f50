"""Bad input stops at the door: every flag of every command, and the environment `mine` reads, with the one line
and exit code each bad value gets, before any model loads (issue #16).

The table is walked against the commands' own parsers: a flag without a row fails `test_every_flag_has_a_row`,
so a new flag cannot be added without its bad values. Rows run in-process (each fails before the model loads;
that is the point); one case runs as a real process, where the shell's redirection matters. Beside the
table: what emit-pm2 writes, `mine` accepts (the same rules judge both), the zeros both accept, and every
command's --help renders.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_cli

from grail_pipeline.cli import main as cli
from grail_pipeline.common.errors import UserError
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.protocol.records import INFERENCE_SCHEMA, build_rollout_record, write_window_file
from grail_pipeline.protocol.wallet import ephemeral_signer
from grail_pipeline.tools.calibration_file import save_entry

CPU = "cpu"
MS_GENESIS = f"{time.time() * 1000:.0f}"  # a unix time in milliseconds, the mistake the issue saw
SCRUBBED = ("GRAIL_WORKER_ID", "GRAIL_TOTAL_WORKERS", "GRAIL_MINER_SAFETY_BLOCKS", "GRAIL_BLOCK_TIME",
            "GRAIL_GENERATION_BATCH_SIZE", "GRAIL_MULTI_GPU", "BT_WALLET_COLD", "BT_WALLET_HOT", "BT_WALLET_PATH",
            "CUDA_VISIBLE_DEVICES", "GRAIL_HOTKEYS")
FLEET_HOTKEY = "5H728gLgx4yuCSVEwGCAfLo3RtzTau9F6cTNqNJtrqqjACWq"  # fleet-status's rows: seed 0's key, no fleet
MINE_ENV = ("GRAIL_WORKER_ID", "GRAIL_TOTAL_WORKERS", "GRAIL_MINER_SAFETY_BLOCKS", "GRAIL_BLOCK_TIME",
            "GRAIL_GENERATION_BATCH_SIZE", "BT_WALLET_COLD", "BT_WALLET_HOT")


@dataclass(frozen=True)
class Case:
    """`grail-pipeline COMMAND <base flags> ARGS` with ENV ends in one line containing EXPECT and exit code CODE."""

    command: str
    args: tuple[str, ...]
    expect: str
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset
    calibration: dict[str, object] = field(default_factory=dict)  # emit-pm2: entry fields changed ("engine.dotted")
    code: int = 2

    @property
    def flag(self) -> str:
        """What the row covers: its first flag, else its environment variable, else the calibration field."""
        flags = [a.split("=")[0] for a in self.args if a.startswith("--") and a not in ("--engine", "--target")]
        flags = flags or [a for a in self.args if a.startswith("--")]
        return flags[0] if flags else next(iter(self.env), None) or "calibration:" + next(iter(self.calibration))

    @property
    def id(self) -> str:
        return f"{self.command} {' '.join(self.args)} {self.env or ''}{self.calibration or ''}".strip()


def C(command: str, *args: str, expect: str, **kw) -> Case:
    return Case(command, args, expect, **kw)


CASES = [
    # --- emit-pm2: the apps it would write, judged as the daemon judges them (issue #16's list first)
    C("emit-pm2", expect="bad length profile 'lognormal:x'", calibration={"fast.workload.length_profile": "lognormal:x"}),
    C("emit-pm2", expect="must be at least 16 (one problem's rollouts)", calibration={"fast.chosen.batch_size": 8}),
    C("emit-pm2", expect="draws up to 20 tokens, more than --max-new-tokens 10",
      calibration={"fast.workload.max_new_tokens": 10}),
    C("emit-pm2", expect="unknown model preset 'dummy:nope'", calibration={"fast.model": "dummy:nope"}),
    C("emit-pm2", expect="workload.kv_cache_gb must be a positive number of GB or null, got 'x'",
      calibration={"fast.workload.kv_cache_gb": "x"}),
    C("emit-pm2", expect="16 rollouts at their longest need", calibration={"fast.workload.kv_cache_gb": 1e-4}),
    C("emit-pm2", expect="model directory '/no/such/model' does not exist", calibration={"fast.model": "/no/such/model"}),
    C("emit-pm2", expect="at most 4096; got 1000000000000", calibration={"fast.chosen.batch_size": 10**12}),
    C("emit-pm2", expect="do not fit the 4096 positions of dummy:tiny",
      calibration={"fast.workload.max_new_tokens": 100_000_000}),
    C("emit-pm2", "--target", "grail", expect="hf engine's chosen.batch_size is its generate batch, 1 to 16",
      calibration={"hf.chosen.batch_size": 99_999_999}),
    C("emit-pm2", "--target", "grail", "--engine", "fast", expect="--target grail takes the hf calibration"),
    C("emit-pm2", "--safety-blocks", "100", expect="--safety-blocks 100 must be at least 0 and below the window's 30"),
    C("emit-pm2", "--safety-blocks", "-1", expect="argument --safety-blocks: '-1' cannot be negative"),
    C("emit-pm2", "--block-time", "inf", expect="argument --block-time: 'inf' is not a finite number"),
    C("emit-pm2", "--block-time", "1e9", expect="--block-time 1e+09 must be between 0.01 and 3600 seconds"),
    C("emit-pm2", "--genesis", "nan", expect="argument --genesis: 'nan' is not a finite number"),
    C("emit-pm2", "--genesis", MS_GENESIS, expect="it takes seconds, not milliseconds"),
    C("emit-pm2", "--genesis", "1e20", expect="days ahead of now"),
    C("emit-pm2", "--genesis", "-5", expect="must be a unix time in seconds"),
    C("emit-pm2", "--drain-timeout", "1e300", expect="--drain-timeout 1e+300 must be more than 0 and at most 3600"),
    C("emit-pm2", "--drain-timeout", "inf", expect="argument --drain-timeout: 'inf' is not a finite number"),
    C("emit-pm2", "--calibration", "missing.yaml", expect="does not exist; run `grail-pipeline calibrate` first"),
    C("emit-pm2", "--target", "prod", expect="argument --target: invalid choice: 'prod'"),
    C("emit-pm2", "--gpus", "0,0", expect="--gpus lists GPU 0 more than once"),
    C("emit-pm2", "--gpu-kind", "NVIDIA RTX 4090", expect="GPU kind 'NVIDIA RTX 4090' is not in"),
    C("emit-pm2", "--engine", "vllm", expect="argument --engine: invalid choice: 'vllm'"),
    C("emit-pm2", "--node-index", "1", expect="--node-index 1 is not in 0..0"),
    C("emit-pm2", "--nodes", "0", expect="argument --nodes: '0' must be at least 1"),
    C("emit-pm2", "--gpus-per-node", "2", expect="1 GPU(s) here but --gpus-per-node 2"),
    C("emit-pm2", "--wallet-cold", "", expect="the miner needs a wallet"),
    C("emit-pm2", "--wallet-hot", "", expect="the miner needs a wallet"),
    C("emit-pm2", "--wallet-path", expect="argument --wallet-path: expected one argument"),
    C("emit-pm2", "--flash-attention", "2", expect="argument --flash-attention: invalid choice: '2'"),
    C("emit-pm2", "--cwd", expect="argument --cwd: expected one argument"),
    C("emit-pm2", "--log-dir", expect="argument --log-dir: expected one argument"),
    C("emit-pm2", "--name-prefix", "a b/c", expect="--name-prefix 'a b/c' must be letters"),
    C("emit-pm2", "--max-memory-restart", "lots", expect="--max-memory-restart takes a size like 80G"),
    C("emit-pm2", "--grail-bin", expect="argument --grail-bin: expected one argument"),
    C("emit-pm2", "--target", "grail", "--out-dir", "x", expect="--out-dir, --block-time and --genesis are for"),
    C("emit-pm2", "--env", "GRAIL_BLOCK_TIME=inf", expect="--env GRAIL_BLOCK_TIME is set by emit-pm2 itself"),
    C("emit-pm2", "--env", "NOVALUE", expect="--env takes KEY=VALUE"),
    C("emit-pm2", "--out", "/proc/nope/ecosystem.config.js", expect="cannot write --out /proc/nope/ecosystem.config.js"),
    C("emit-pm2", "--redis-url", "http://hub:6379", expect="is not a Redis URL: it must start with redis://"),
    C("emit-pm2", "--redis-node", "3", expect="--redis-node 3 is not in 0..0"),
    C("emit-pm2", "--no-redis-app=yes", expect="argument --redis-app/--no-redis-app: ignored explicit argument 'yes'"),
    C("emit-pm2", "--redis-server", "/no/such/redis-server", "--redis-url", "redis://hub:6379/0",
      expect="--redis-server /no/such/redis-server is not an executable file"),
    C("emit-pm2", "--metrics-port", "70000", expect="--metrics-port 70000 is not a port"),
    C("emit-pm2", "--metrics-host", "a b", expect="--metrics-host 'a b' is not a host name or address"),
    C("emit-pm2", "--scrape-interval", "0", expect="argument --scrape-interval: '0' must be positive"),
    C("emit-pm2", "--hotkeys", "x", "--target", "dry-run", expect="--hotkeys: 'x' is not COLDKEY/HOTKEY"),
    C("emit-pm2", "--hotkeys-per-gpu", "0", expect="argument --hotkeys-per-gpu: '0' must be at least 1"),
    C("emit-pm2", "--fleet-hotkeys", "x", "--target", "dry-run", expect="--fleet-hotkeys: 'x' is not COLDKEY/HOTKEY"),
    C("emit-pm2", "--fleet-hotkeys", "a/b", "--target", "grail",
      expect="--fleet-hotkeys (several hotkeys from one engine) is for --target dry-run"),
    C("emit-pm2", "--fleet-hotkeys", "a/b,c/d", "--hotkeys", "a/b", "--target", "dry-run",
      expect="--hotkeys deals hotkeys to GPUs, each app alone; --fleet-hotkeys gives every worker"),
    C("emit-pm2", "--target-rollouts", "abc", expect="--target-rollouts and --failed-windows go with --hotkeys"),
    C("emit-pm2", "--failed-windows", "13", expect="--target-rollouts and --failed-windows go with --hotkeys"),
    # --- make-checkpoints: a rehearsal series for mine --checkpoint-dir
    C("make-checkpoints", "--model", "dummy:nope", expect="unknown model preset 'dummy:nope'"),
    C("make-checkpoints", "--out", "/proc/nope/series", expect="cannot create --out /proc/nope/series"),
    C("make-checkpoints", "--windows", "0,x", expect="--windows '0,x' must be a comma list of whole numbers"),
    C("make-checkpoints", "--count", "0", expect="argument --count: '0' must be at least 1"),
    C("make-checkpoints", "--first-window", "-5", expect="argument --first-window: '-5' cannot be negative"),
    C("make-checkpoints", "--every-blocks", "0", expect="argument --every-blocks: '0' must be at least 1"),
    C("make-checkpoints", "--noise", "-1", expect="argument --noise: '-1' cannot be negative"),
    C("make-checkpoints", "--seed", "x", expect="argument --seed: 'x' is not a whole number"),
    C("make-checkpoints", "--model-name", "{x}", expect="--model-name '{x}': the only field it may name is {window}"),
    C("make-checkpoints", "--ready-every", "-1", expect="argument --ready-every: '-1' cannot be negative"),
    # --- fleet-status: a fleet's view, from its Redis
    C("fleet-status", "--redis-url", "http://hub:6379", expect="is not a Redis URL: it must start with redis://"),
    C("fleet-status", "--hotkey", expect="argument --hotkey: expected one argument"),
    C("fleet-status", "--hotkey", "5x", expect="--hotkey: '5x' is not a hotkey's ss58 address"),
    C("fleet-status", "--hotkey", FLEET_HOTKEY[:-1] + "z",  # the last character changed: the checksum fails
      expect="is not a hotkey's ss58 address"),
    C("fleet-status", "--hotkey", ",", expect="--hotkey: '' is not a hotkey's ss58 address"),
    C("fleet-status", "--hotkey", FLEET_HOTKEY, expect=f"--hotkey: {FLEET_HOTKEY} is named twice"),
    C("fleet-status", "--hotkeys", "x", expect="--hotkeys: 'x' is not COLDKEY/HOTKEY"),
    C("fleet-status", "--hotkeys", "a/b,a/b", expect="--hotkeys: a/b is named twice"),
    C("fleet-status", "--hotkeys", "cold/none", expect="hotkey file /no/such/wallets/cold/hotkeys/none does not exist",
      env={"BT_WALLET_PATH": "/no/such/wallets"}),
    C("fleet-status", expect="GRAIL_HOTKEYS: cold/hot is named twice", env={"GRAIL_HOTKEYS": "cold/hot, cold/hot"}),
    C("fleet-status", expect="GRAIL_HOTKEYS: 'cold' is not COLDKEY/HOTKEY", env={"GRAIL_HOTKEYS": "cold"}),
    C("fleet-status", "--windows", "0", expect="--windows must be at least 1"),
    C("fleet-status", "--json=yes", expect="argument --json: ignored explicit argument 'yes'"),
    C("fleet-status", expect="is unreachable", env={"GRAIL_REDIS_URL": None}),
    C("fleet-status", "--watch", "-1", expect="argument --watch: '-1' must be positive"),
    # --- mine: every mistake one line before the model loads
    C("mine", expect="GRAIL_REDIS_URL='http://h' is not a Redis URL", env={"GRAIL_REDIS_URL": "http://h"}),
    C("mine", "--genesis", "nan", expect="argument --genesis: 'nan' is not a finite number"),
    C("mine", "--memory-gb", "0", expect="argument --memory-gb: '0' must be positive"),
    C("mine", "--checkpoint-dir", "/no/such", expect="--checkpoint-dir /no/such is not a directory"),
    C("mine", "--genesis", MS_GENESIS, expect="it takes seconds, not milliseconds"),
    C("mine", "--genesis", "1e20", expect="days ahead of now"),
    C("mine", "--block-time", "inf", expect="argument --block-time: 'inf' is not a finite number"),
    C("mine", "--block-time", "1e-9", expect="--block-time 1e-09 must be between 0.01 and 3600 seconds"),
    C("mine", "--drain-timeout", "1e300", expect="--drain-timeout 1e+300 must be more than 0 and at most 3600"),
    C("mine", "--max-new-tokens", "100000000", expect="--max-new-tokens 100000000 do not fit the 4096 positions"),
    C("mine", "--max-prompt-tokens", "0", expect="argument --max-prompt-tokens: '0' must be at least 1"),
    C("mine", "--kv-cache-gb", "0", expect="argument --kv-cache-gb: '0' must be positive (a number of GB, auto or full)"),
    C("mine", "--engine", "fast", "--kv-cache-gb", "0.001",
      expect="--kv-cache-gb 0.001 holds 30 KV pages; 16 rollouts at their longest need 385"),
    C("mine", "--engine", "hf", "--kv-cache-gb", "1", expect="--kv-cache-gb sizes the fast engine's KV cache"),
    C("mine", "--engine", "hf", "--kv-cache-gb", "auto", expect="the hf engine has none to size"),
    C("mine", "--kv-cache-gb", "AUTO", expect="argument --kv-cache-gb: 'AUTO' is not a number (a number of GB, auto or full)"),
    C("mine", "--length-profile", "fixed:2000", expect="draws up to 2000 tokens, more than --max-new-tokens 1024"),
    C("mine", "--model", "dummy:nope", expect="unknown model preset 'dummy:nope'"),
    C("mine", "--engine", "vllm", expect="argument --engine: invalid choice: 'vllm'"),
    C("mine", "--device", "tpu", expect="unknown device 'tpu'"),
    C("mine", "--dry-run=yes", expect="argument --dry-run: ignored explicit argument 'yes'"),
    C("mine", "--batch-size", "0", expect="argument --batch-size: '0' must be at least 1"),
    C("mine", "--engine", "fast", "--batch-size", "8", expect="must be at least 16 (one problem's rollouts)"),
    C("mine", "--batch-size", "64", "--engine", "hf",
      expect="the hf engine's --batch-size is its generate batch, 1 to 16 (one problem's rollouts); got 64"),
    C("mine", "--engine", "hf", expect="GRAIL_GENERATION_BATCH_SIZE is its generate batch, 1 to 16 (one problem's rollouts); got 99999999",
      env={"GRAIL_GENERATION_BATCH_SIZE": "99999999"}),
    C("mine", expect="GRAIL_GENERATION_BATCH_SIZE='x' must be a positive whole number",
      env={"GRAIL_GENERATION_BATCH_SIZE": "x"}),
    C("mine", expect="GRAIL_BLOCK_TIME='inf' must be a positive number", env={"GRAIL_BLOCK_TIME": "inf"}),
    C("mine", expect="GRAIL_BLOCK_TIME 1e+06 must be between", env={"GRAIL_BLOCK_TIME": "1e6"}),
    C("mine", expect="GRAIL_MINER_SAFETY_BLOCKS 30 must be at least 0 and below the window's 30",
      env={"GRAIL_MINER_SAFETY_BLOCKS": "30"}),
    C("mine", expect="GRAIL_WORKER_ID='x' is not a whole number", env={"GRAIL_WORKER_ID": "x"}),
    C("mine", expect="GRAIL_TOTAL_WORKERS must be at least 1", env={"GRAIL_TOTAL_WORKERS": "0"}),
    C("mine", expect="BT_WALLET_HOT is set but BT_WALLET_COLD is not", env={"BT_WALLET_COLD": None}),
    C("mine", expect="BT_WALLET_COLD is set but BT_WALLET_HOT is not", env={"BT_WALLET_HOT": None}),
    C("mine", "--out-dir", "/proc/nope", expect="cannot create --out-dir /proc/nope"),
    C("mine", "--status-file", "/proc/nope/status.json", expect="cannot write the status file /proc/nope/status.json"),
    C("mine", "--window-blocks", "0", expect="argument --window-blocks: '0' must be at least 1"),
    C("mine", "--run-seed", "x", expect="argument --run-seed: 'x' is not a whole number"),
    C("mine", "--verify-sample", "-1", expect="--verify-sample takes a number of rollouts, at least 0"),
    C("mine", "--upload-allowance", "-1", expect="argument --upload-allowance: '-1' cannot be negative"),
    C("mine", "--hotkeys", "bad", expect="--hotkeys: 'bad' is not COLDKEY/HOTKEY"),
    C("mine", "--target-rollouts", "17", expect="--target-rollouts 17 must be a whole number of groups of 16"),
    C("mine", "--failed-windows", "12", "--target-rollouts", "cap", expect="--failed-windows 12 must be from 0 to 11"),
    C("mine", "--max-windows", "0", expect="argument --max-windows: '0' must be at least 1"),
    C("mine", "--warmup-problems", "-1", expect="--warmup-problems cannot be negative"),
    C("mine", "--log-level", "loud", expect="argument --log-level: invalid choice: 'loud'"),
    C("mine", "--generation-queue", "0", expect="argument --generation-queue: '0' must be at least 1"),
    C("mine", "--proof-queue", "0", expect="argument --proof-queue: '0' must be at least 1"),
    C("mine", "--sign-queue", "0", expect="argument --sign-queue: '0' must be at least 1"),
    C("mine", "--sink-queue", "0", expect="argument --sink-queue: '0' must be at least 1"),
    C("mine", "--sign-workers", "0", expect="argument --sign-workers: '0' must be at least 1"),
    C("mine", "--metrics-port", "0", expect="argument --metrics-port: '0' must be at least 1"),
    C("mine", "--metrics-address", "192.0.2.1", "--metrics-port", "19999",  # not an address of this machine
      expect="--metrics-port 19999: cannot serve metrics on 192.0.2.1:19999"),
    # --- benchmark
    C("benchmark", "--block-time", "inf", expect="argument --block-time: 'inf' is not a finite number"),
    C("benchmark", "--memory-gb", "-3", expect="argument --memory-gb: '-3' must be positive"),
    C("benchmark", "--block-time", "1e9", expect="--block-time 1e+09 must be between 0.01 and 3600 seconds"),
    C("benchmark", "--json", "/proc/nope/out.json", expect="cannot write --json /proc/nope/out.json"),
    C("benchmark", "--max-new-tokens", "100000000", expect="do not fit the 4096 positions of dummy:tiny"),
    C("benchmark", "--max-prompt-tokens", "x", expect="argument --max-prompt-tokens: 'x' is not a whole number"),
    C("benchmark", "--kv-cache-gb", "nan", expect="argument --kv-cache-gb: 'nan' is not a finite number"),
    C("benchmark", "--engine", "fast", "--kv-cache-gb", "0.001", expect="16 rollouts at their longest need"),
    C("benchmark", "--engine", "hf", "--shared-prompt-attention",
      expect="--shared-prompt-attention is the fast engine's decode attention; the hf engine has none"),
    C("benchmark", "--length-profile", "weird", expect="bad length profile 'weird'"),
    C("benchmark", "--model", "./no/such/model", expect="model directory './no/such/model' does not exist"),
    C("benchmark", "--engine", "vllm", expect="argument --engine: invalid choice: 'vllm'"),
    C("benchmark", "--device", "mps", expect="device 'mps' is not supported"),
    C("benchmark", "--batch-sizes", "16,", expect="batch sizes must be positive whole numbers"),
    C("benchmark", "--engine", "hf", "--batch-sizes", "32", expect="the hf engine's batch size is its generate batch, 1 to 16"),
    C("benchmark", "--num-problems", "0", expect="argument --num-problems: '0' must be at least 1"),
    C("benchmark", "--workers", "x", expect="argument --workers: 'x' is not a whole number"),
    C("benchmark", "--full-benchmark=yes", expect="argument --full-benchmark: ignored explicit argument 'yes'"),
    C("benchmark", "--seed", "x", expect="argument --seed: 'x' is not a whole number"),
    C("benchmark", "--warmup-problems", "-1", expect="--warmup-problems cannot be negative"),
    C("benchmark", "--window-blocks", "0", expect="argument --window-blocks: '0' must be at least 1"),
    C("benchmark", "--verify", "-1", expect="--verify takes a positive number of rollouts"),
    # --- calibrate
    C("calibrate", "--calibration", "/proc/nope/cal.yaml", expect="cannot write --calibration /proc/nope/cal.yaml"),
    C("calibrate", "--calibration", "/tmp", expect="calibration file /tmp is a directory, not a file"),
    C("calibrate", "--headroom-gb", "-1", expect="argument --headroom-gb: '-1' cannot be negative"),
    C("calibrate", "--headroom-gb", "64", expect="--headroom-gb 64 leaves nothing of --memory-gb 64"),
    C("calibrate", "--memory-gb", "inf", expect="argument --memory-gb: 'inf' is not a finite number"),
    C("calibrate", "--max-new-tokens", "100000000", expect="do not fit the 4096 positions of dummy:tiny"),
    C("calibrate", "--max-prompt-tokens", "0", expect="argument --max-prompt-tokens: '0' must be at least 1"),
    C("calibrate", "--kv-cache-gb", "-2", expect="argument --kv-cache-gb: '-2' must be positive"),
    C("calibrate", "--engine", "hf", "--kv-cache-gb", "4", expect="the hf engine has none to size"),
    C("calibrate", "--length-profile", "lognormal:1:2", expect="bad length profile 'lognormal:1:2'"),
    C("calibrate", "--model", "dummy:nope", expect="unknown model preset 'dummy:nope'"),
    C("calibrate", "--engine", "vllm", expect="argument --engine: invalid choice: 'vllm'"),
    C("calibrate", "--device", "tpu", expect="unknown device 'tpu'"),
    C("calibrate", "--batch-sizes", "4,x", expect="batch sizes must be positive whole numbers, got 'x'"),
    C("calibrate", "--engine", "fast", "--batch-sizes", "8", expect="must be at least 16 (one problem's rollouts)"),
    C("calibrate", "--num-problems", "0", expect="argument --num-problems: '0' must be at least 1"),
    C("calibrate", "--warmup-problems", "-1", expect="--warmup-problems cannot be negative"),
    C("calibrate", "--seed", "x", expect="argument --seed: 'x' is not a whole number"),
    # --- verify (what it checks today; the file's contents are test_verify_cmd's)
    C("verify", "--model", "dummy:nope", expect="unknown model preset 'dummy:nope'"),
    C("verify", "--device", expect="argument --device: expected one argument"),
    C("verify", "--skip-proofs=yes", expect="argument --skip-proofs: ignored explicit argument 'yes'"),
    C("verify", "--proof-sample", "-1", expect="--proof-sample takes a number of rollouts, at least 0"),
    C("verify", "--status", "/no/such/status.json", expect="status file /no/such/status.json does not exist"),
    C("verify", "--status", "/tmp", expect="status file /tmp is a directory, not a file"),
    C("verify", "--checkpoint-window", "-1", expect="--checkpoint-window takes a window number, at least 0"),
    C("verify", "--json=yes", expect="argument --json: ignored explicit argument 'yes'"),
    # --- report (the pictures of status files)
    C("report", "--out", "/proc/nope/windows.png", expect="cannot write --out /proc/nope/windows.png"),
    C("report", "--html", "/proc/nope/report.html", expect="cannot write --html /proc/nope/report.html"),
]
# --- numbers, by range (issue #26): digits str.isdigit() accepts and int() refuses, values beyond int64 (the
# window file's columns, the seeds' generators), and values that parse but make no sense
CASES += [
    C("emit-pm2", "--gpus", "²", expect="--gpus takes GPU indices (whole numbers from 0 to 1023), got '²'"),
    C("emit-pm2", "--gpus", "0,①", expect="--gpus takes GPU indices (whole numbers from 0 to 1023), got '①'"),
    C("emit-pm2", "--node-index", "١", expect="argument --node-index: '١' is not a whole number"),
    C("emit-pm2", "--redis-node", str(2**64), expect=f"argument --redis-node: '{2**64}' is out of range"),
    C("emit-pm2", "--gpus", "9" * 5000, expect="--gpus takes GPU indices (whole numbers from 0 to 1023), got '9999"),
    C("mine", expect="GRAIL_WORKER_ID 1" + "0" * 40 + " must be between", env={"GRAIL_WORKER_ID": "9" * 5000}),
    C("benchmark", "--batch-sizes", "16,²", expect="batch sizes must be positive whole numbers, got '²'"),
    C("calibrate", "--batch-sizes", "①", expect="batch sizes must be positive whole numbers, got '①'"),
    C("mine", expect="GRAIL_GENERATION_BATCH_SIZE='²' must be a positive whole number",
      env={"GRAIL_GENERATION_BATCH_SIZE": "²"}),
    C("mine", expect="GRAIL_WORKER_ID='①' is not a whole number", env={"GRAIL_WORKER_ID": "①"}),
    C("mine", expect=f"GRAIL_MINER_SAFETY_BLOCKS {10**30} must be between", env={"GRAIL_MINER_SAFETY_BLOCKS": str(10**30)}),
    C("mine", expect="GRAIL_USE_FLASH_ATTENTION='maybe' must be 1 or 0", env={"GRAIL_USE_FLASH_ATTENTION": "maybe"}),
    C("mine", "--run-seed", str(2**64), expect=f"argument --run-seed: '{2**64}' is out of range"),
    C("mine", "--window-blocks", str(10**12), expect=f"--window-blocks {10**12} must be between 1 and 7200"),
    C("mine", "--upload-allowance", "360", expect="--upload-allowance 360 s is not less than the window's 360 s"),
    C("mine", "--length-profile", "fixed:8",
      expect="length profile 'fixed:8' allows at most 8 tokens: every completion would be under the protocol's "
             "minimum of 16"),
    C("mine", "--max-new-tokens", "15", "--length-profile", "natural", expect="--max-new-tokens allows at most 15"),
    C("benchmark", "--seed", str(2**63), expect=f"argument --seed: '{2**63}' is out of range"),
    C("benchmark", "--window-blocks", str(10**12), expect=f"--window-blocks {10**12} must be between 1 and 7200"),
    C("benchmark", "--length-profile", "fixed:8", expect="every completion would be under the protocol's minimum"),
    C("calibrate", "--seed", "1e3", expect="argument --seed: '1e3' is not a whole number"),
    C("verify", "--checkpoint-window", str(2**70), expect=f"argument --checkpoint-window: '{2**70}' is out of range"),
    C("make-checkpoints", "--windows", f"0,{2**64}", expect=f"window {2**64} is beyond {2**63 - 1}"),
    C("make-checkpoints", "--seed", str(10**17), expect=f"--seed {10**17} must be at least 0 and at most"),
    C("make-checkpoints", "--noise", "1e308", expect="--noise 1e+308 makes tensor"),
    C("make-checkpoints", "--out", "", expect="--out is empty (an unset shell variable?)"),
    C("make-checkpoints", "--ready-every", "1e19", expect="--ready-every 1e+19 must be from 0 to 86400 seconds"),
    C("fleet-status", "--windows", str(10**30), expect=f"argument --windows: '{10**30}' is out of range"),
]
VERIFY_MISSING = C("verify", expect="window file /no/such.parquet does not exist")  # the positional PATH
REPORT_MISSING = C("report", expect="status file /no/such.json does not exist")  # the positional STATUS.json


def good_entry(engine: str, batch_size: int) -> dict:
    """A CPU calibration entry `mine` accepts as the workers' flags."""
    return dict(gpu=dict(name=CPU, total_memory_gb=64.0), model="dummy:tiny", engine=engine, attention="sdpa",
                workload=dict(max_new_tokens=24, max_prompt_tokens=512, length_profile="fixed:20"),
                rows=[dict(batch_size=batch_size, status="ok")], chosen=dict(batch_size=batch_size))


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.yaml"
    save_entry(path, good_entry("hf", 16))
    save_entry(path, good_entry("fast", 32))
    return path


def damage(path: Path, changes: dict[str, object]) -> None:
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        engine, *keys = dotted.split(".")
        node = data["calibrations"][CPU][engine]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(data))


def base_argv(case: Case, tmp_path: Path, calibration: Path) -> list[str]:
    """Good values for everything but what the case is about (a later flag overrides an earlier one)."""
    if case.command == "emit-pm2":
        return ["--calibration", str(calibration), "--target", "dry-run", "--gpus", "0", "--gpu-kind", CPU,
                "--wallet-cold", "cold", "--wallet-hot", "hot", "--cwd", str(tmp_path)]
    if case.command == "mine":
        return ["--dry-run", "--model", "dummy:tiny", "--device", "cpu", "--out-dir", str(tmp_path / "out")]
    if case.command == "make-checkpoints":
        return ["--model", "dummy:tiny", "--out", str(tmp_path / "series"), "--windows", "0"]
    if case.command == "fleet-status":  # nothing listens on port 1; GRAIL_HOTKEYS is read when no --hotkey is given
        hotkey = [] if "GRAIL_HOTKEYS" in case.env else ["--hotkey", FLEET_HOTKEY]
        return ["--redis-url", "redis://127.0.0.1:1/0", *hotkey]
    if case.command == "benchmark":
        return ["--model", "dummy:tiny", "--device", "cpu"]
    if case.command == "calibrate":
        return ["--model", "dummy:tiny", "--device", "cpu", "--memory-gb", "64", "--calibration",
                str(tmp_path / "c.yaml")]
    if case.command == "report":
        if case is REPORT_MISSING:
            return ["/no/such.json"]
        from grail_pipeline.mining.status import StatusFile

        status = StatusFile(tmp_path / "status-worker-0.json", 0, 1)
        status.update(state="stopped")
        return [str(status.path)]
    empty = tmp_path / "empty.parquet"
    write_window_file(empty, [], {"wallet": "5x", "window_start": 60, "window_length": 30, "block_hash": "0x00"})
    return ["/no/such.parquet"] if case is VERIFY_MISSING else [str(empty)]


@pytest.mark.parametrize("case", [*CASES, VERIFY_MISSING, REPORT_MISSING], ids=lambda c: c.id)
def test_bad_input_is_one_line(case: Case, tmp_path, calibration, monkeypatch, capsys, wallet_env) -> None:
    for name in SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    if case.command == "mine":
        for key, value in wallet_env.items():
            monkeypatch.setenv(key, value)
    for key, value in case.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    damage(calibration, case.calibration)
    rc, out, err = run_cli(capsys, case.command, *base_argv(case, tmp_path, calibration), *case.args)
    assert (rc, out) == (case.code, ""), err
    assert err.startswith(f"grail-pipeline {case.command}: error: ") and err.count("\n") == 1, err
    assert case.expect in err, err
    assert not (tmp_path / "c.yaml").exists() and not list(tmp_path.glob("out/*.parquet"))  # nothing written


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_has_a_row() -> None:
    """A flag without a bad value in the table fails here: add its row."""
    covered = {(c.command, c.flag) for c in CASES} | {("verify", "path"), ("report", "status")}
    missing = [f"{name} {action.option_strings[-1] if action.option_strings else action.dest}"
               for name, parser in commands().items() for action in parser._actions
               if not isinstance(action, argparse._HelpAction)
               and (name, action.option_strings[-1] if action.option_strings else action.dest) not in covered]
    assert not missing, f"no bad-input row for: {missing}"
    assert {v for c in CASES for v in c.env} >= set(MINE_ENV)


def test_every_help_renders() -> None:
    """'%' in a help text is argparse's format code: an unescaped one printed a Python dict mid-sentence."""
    for name, parser in commands().items():
        text = parser.format_help()
        assert text.startswith(f"usage: grail-pipeline {name}") and "{'" not in text and "%(" not in text, text
        for action in parser._actions:
            if action.option_strings:
                assert action.option_strings[-1] in text
    assert "adds less than 2% rollouts/s" in " ".join(commands()["calibrate"].format_help().split())


def test_what_emit_pm2_writes_mine_accepts(calibration, tmp_path, capsys, monkeypatch) -> None:
    """An app's args and env, parsed by mine's parser and checked by its settings and preflight (no model loads)."""
    from grail_pipeline.cli.mine import resolve_settings
    from grail_pipeline.mining.choices import resolve_choices
    from grail_pipeline.mining.rules import check_batch_size

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for engine in ("hf", "fast"):
        rc, out, err = run_cli(capsys, "emit-pm2", "--calibration", str(calibration), "--target", "dry-run",
                               "--gpus", "0", "--gpu-kind", CPU, "--engine", engine, "--wallet-cold", "c",
                               "--wallet-hot", "h", "--safety-blocks", "0", "--block-time", "0.5",
                               "--drain-timeout", "3600", "--genesis", f"{time.time() + 60:.0f}",
                               "--out", str(tmp_path / "eco.js"))
        assert rc == 0 and out == "" and "ahead of now" in err, err  # a warning, not a refusal
        text = (tmp_path / "eco.js").read_text()
        args_line = next(line for line in text.splitlines() if line.strip().startswith("args:"))
        argv = yaml.safe_load(args_line.strip().removeprefix("args:").rstrip(","))  # a JSON array
        env_lines = text[text.index("env: {"):text.index("},", text.index("env: {"))].splitlines()[1:]
        env = {k: str(v) for line in env_lines for k, v in yaml.safe_load("{" + line.strip().rstrip(",") + "}").items()}
        assert argv[:2] == ["-m", "grail_pipeline"]
        args = cli.build_parser().parse_args(argv[2:])
        settings = resolve_settings(args, env)
        check_batch_size(resolve_choices(args).engine_kind, int(env["GRAIL_GENERATION_BATCH_SIZE"]))
        assert (settings.safety_blocks, settings.block_time_s, settings.drain_timeout_s) == (0, 0.5, 3600.0)
        assert args.engine == engine


def test_zeros_the_daemon_accepts_are_accepted(calibration, tmp_path, capsys) -> None:
    rc, out, err = run_cli(capsys, "emit-pm2", "--calibration", str(calibration), "--target", "grail", "--gpus", "0",
                           "--gpu-kind", CPU, "--wallet-cold", "c", "--wallet-hot", "h", "--safety-blocks", "0")
    assert rc == 0 and '"GRAIL_MINER_SAFETY_BLOCKS": "0"' in out, err
    args = cli.build_parser().parse_args(["calibrate", "--headroom-gb", "0"])
    assert args.headroom_gb == 0.0


def test_a_failed_emit_into_a_file_says_the_file_is_empty(calibration, tmp_path) -> None:
    """`emit-pm2 > file` truncates the file before emit-pm2 runs: the one line says so (a real process and shell)."""
    target = tmp_path / "ecosystem.config.js"
    target.write_text("the previous file\n")
    command = [sys.executable, "-m", "grail_pipeline", "emit-pm2", "--calibration", str(calibration), "--gpus", "0",
               "--gpu-kind", CPU, "--wallet-cold", "c", "--wallet-hot", "h", "--safety-blocks", "100"]
    run = subprocess.run(f"{shlex.join(command)} > {shlex.quote(str(target))}", shell=True, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "--safety-blocks 100" in run.stderr and "left empty" in run.stderr and "--out PATH" in run.stderr
    assert target.read_text() == ""
    target.write_text("the previous file\n")
    run = subprocess.run([*command, "--out", str(target)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "left empty" not in run.stderr
    assert target.read_text() == "the previous file\n"  # --out: whole or not at all


# --- window files: every field of a row, the metadata, and the file itself, as `verify` meets them (issue #26)
ROWS = 16  # one group
WINDOW = 60
BLOCK_HASH = "0x" + "ab" * 32


def honest_rows() -> list[dict]:
    """One group of well-formed rows as a real miner writes them (the signatures are not real: the schema is
    what these cases are about, and no case needs a model)."""
    signer = ephemeral_signer()
    rng = random.Random(7)
    rows = []
    for index in range(ROWS):
        tokens = [rng.randrange(1000, 100_000) for _ in range(40)]
        commitments = [{"sketch": rng.randrange(PROFILE.prime_q), "indices": list(range(PROFILE.proof_topk)),
                        "position": p} for p in range(len(tokens))]
        rows.append(build_rollout_record(
            window_start=WINDOW, block=WINDOW + 1, block_hash=BLOCK_HASH, randomness="cd" * 32, use_drand=False,
            checkpoint_window=0, rollout_group=0, rollout_index=index, total_in_group=16,
            nonce=PROFILE.nonce(0, index), tokens=tokens, prompt_length=20, commitments=commitments,
            token_logprobs=[0.0] * 40, model_name="dummy:tiny", commit_signature="ab" * 64, total_reward=0.0,
            advantage=0.0, success=False, assignment=[True], hotkey=signer.ss58_address, challenge="c",
            signature="cd" * 64))
    return rows


def leaf_paths(fields, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field of INFERENCE_SCHEMA, structs and their members alike."""
    paths = []
    for f in fields:
        paths.append((*prefix, f.name))
        if pa.types.is_struct(f.type):
            paths.extend(leaf_paths(list(f.type), (*prefix, f.name)))
    return paths


def put(row: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        row = row[key]
    row[path[-1]] = value


BAD_ROW = 3
# (field path in the file's form, the value written there, what the one problem names); JSON fields hold text
ROW_CASES = [(path, None, ".".join(path)) for path in leaf_paths(list(INFERENCE_SCHEMA))] + [
    (("commit", "tokens"), [5, None, 7] * 13 + [5], "commit.tokens.1"),
    (("commit", "tokens"), [5, -3] * 20, "commit.tokens.1: input should be greater than or equal to 0"),
    (("commit", "commitments"), json.dumps(list(range(40))), "commit.commitments.0: input should be a valid dict"),
    (("commit", "commitments"), "7", "commit.commitments: input should be a valid list"),
    (("commit", "commitments"), "null", "commit.commitments: input should be a valid list"),
    (("commit", "commitments"), "{not json", "commit.commitments is not JSON"),
    (("commit", "commitments"), "[" * 20_000 + "]" * 20_000, "commit.commitments is not JSON (nested too deep)"),
    (("commit", "commitments"), json.dumps([{"sketch": "1", "indices": [], "position": 0}] * 40),
     "commit.commitments.0.sketch: input should be a valid integer"),
    (("commit", "commitments"), json.dumps([{"sketch": 1, "indices": [-1], "position": 0}] * 40),
     "commit.commitments.0.indices.0: input should be greater than or equal to 0"),
    (("commit", "commitments"), json.dumps([{"sketch": 10**30, "indices": [0], "position": 0}] * 40),
     "commit.commitments.0.sketch: input should be less than 2147483647"),
    (("commit", "beacon"), '"abc"', "commit.beacon: input should be a valid dict"),
    (("commit", "beacon"), "[]", "commit.beacon: input should be a valid dict"),
    (("commit", "beacon"), '{"randomness": 5}', "commit.beacon.randomness: input should be a valid string"),
    (("commit", "beacon"), "{}", "commit.beacon.randomness: field required"),
    (("commit", "rollout", "trajectory"), "\ufffd", "commit.rollout.trajectory is not JSON"),
    (("commit", "rollout", "total_reward"), math.nan, "commit.rollout.total_reward: input should be a finite number"),
    (("commit", "rollout", "advantage"), math.inf, "commit.rollout.advantage: input should be a finite number"),
    (("commit", "rollout", "token_logprobs"), [None] * 40, "commit.rollout.token_logprobs.0"),
    (("commit", "rollout", "assignment"), [True, None], "commit.rollout.assignment.1"),
    (("commit", "rollout", "prompt_length"), -20, "commit.rollout.prompt_length: input should be greater than"),
    (("rollout_index",), -1, "rollout_index: input should be greater than or equal to 0"),
    (("rollout_group",), -2, "rollout_group: input should be greater than or equal to 0"),
    (("window_start",), -60, "window_start: input should be greater than or equal to 0"),
]


def write_rows(path: Path, rows: list[dict], metadata: dict[bytes, bytes] | None = None) -> Path:
    """Rows in the file's form (JSON fields as text) written as Parquet with INFERENCE_SCHEMA, as anyone could."""
    table = pa.Table.from_pylist(rows, schema=INFERENCE_SCHEMA)
    wallet = rows[0]["hotkey"] if rows and rows[0]["hotkey"] else "5x"
    meta = {b"wallet": wallet.encode(), b"window_start": str(WINDOW).encode(), b"window_length": b"30",
            b"inference_count": str(len(rows)).encode(), b"block_hash": BLOCK_HASH.encode()}
    pq.write_table(table.replace_schema_metadata({**meta, **(metadata or {})}), path)
    return path


@pytest.fixture(scope="module")
def file_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The honest group in the file's form, read back from a file written by write_window_file."""
    path = tmp_path_factory.mktemp("honest") / "w.parquet"
    write_window_file(path, honest_rows(), {"wallet": "5x", "window_start": WINDOW, "window_length": 30})
    return pq.read_table(path).to_pylist()


def verify_json(capsys, path: Path) -> tuple[int, dict, str]:
    rc, out, err = run_cli(capsys, "verify", str(path), "--skip-proofs", "--json")
    return rc, (json.loads(out) if out else {}), err


def test_an_honest_file_passes_the_schema(file_rows, tmp_path, capsys) -> None:
    rc, report, err = verify_json(capsys, write_rows(tmp_path / "w.parquet", copy.deepcopy(file_rows)))
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["structure"]["checked"] == checks["structure"]["passed"] == ROWS, checks["structure"]
    assert checks["metadata"]["passed"] == checks["metadata"]["checked"], checks["metadata"]


@pytest.mark.parametrize(("path", "value", "expect"), ROW_CASES,
                         ids=[f"{'.'.join(c[0])}={str(c[1])[:20]}" for c in ROW_CASES])
def test_a_malformed_row_is_a_failed_check_at_its_row(path, value, expect, file_rows, tmp_path, capsys) -> None:
    """verify reads the whole file: the bad row fails `structure` at its file row, the others are checked."""
    rows = copy.deepcopy(file_rows)
    put(rows[BAD_ROW], path, value)
    rc, report, err = verify_json(capsys, write_rows(tmp_path / "w.parquet", rows))
    assert rc == 1 and err == "", err
    structure = next(c for c in report["checks"] if c["name"] == "structure")
    assert structure["checked"] == ROWS and structure["passed"] == ROWS - 1, structure
    assert structure["problems"][0].startswith(f"file row {BAD_ROW}: ") and expect in structure["problems"][0], \
        structure["problems"]
    assert report["verdicts"]["validator"]["failed"]["structure"] and report["rollouts"] == ROWS
    signatures = next(c for c in report["checks"] if c["name"] == "signatures")
    assert signatures["checked"] == ROWS - 1  # every other row was still read and checked


def test_rows_the_validator_cannot_compute_fail_their_checks(tmp_path, capsys) -> None:
    """Rows that hold the schema but no proof can be computed from: indices beyond the model's hidden size (the
    gather failed with a traceback), NaN and infinite logprobs. verify loads the model and judges each."""
    rows = honest_rows()
    for c in rows[2]["commit"]["commitments"]:
        c["indices"] = [10**9] * len(c["indices"])
    rows[4]["commit"]["rollout"]["token_logprobs"] = [math.nan] * 40
    rows[5]["commit"]["rollout"]["token_logprobs"] = [math.inf] * 40
    path = tmp_path / f"{rows[0]['hotkey']}-window-{WINDOW}.parquet"
    write_window_file(path, rows, {"wallet": rows[0]["hotkey"], "window_start": WINDOW, "window_length": 30})
    rc, out, err = run_cli(capsys, "verify", str(path), "--device", "cpu", "--json")
    assert rc == 1, err
    proofs = next(c for c in json.loads(out)["checks"] if c["name"] == "proofs")
    assert proofs["checked"] == ROWS and proofs["passed"] == 0
    assert any(f"rollout 2 (file position 0): {40 * PROFILE.proof_topk} commitment indices outside the hidden size 64" in p
               for p in proofs["problems"]), proofs["problems"]


META_CASES = [
    ({b"window_start": b"\xff\xfe"}, "metadata window_start '\\\\xff\\\\xfe' is not a whole number"),
    ({b"window_start": b"sixty"}, "metadata window_start 'sixty' is not a whole number"),
    ({b"window_start": b"9" * 30}, "is not a whole number"),
    ({b"window_length": b"garbage"}, "metadata window_length 'garbage' is not a whole number"),
    ({b"window_length": b"0"}, "metadata window_length is 0"),
    ({b"inference_count": b"-1"}, "metadata inference_count '-1' is not a whole number"),
    ({b"wallet": b"\x80\x81"}, "rows signed by another hotkey than the file's wallet"),
    ({b"\xff": b"\xff", b"deadline": b"soon"}, "deadline metadata 'soon' is not a finite number"),
    ({b"deadline": b"inf"}, "deadline metadata 'inf' is not a finite number"),
    ({b"deadline": b"nan"}, "deadline metadata 'nan' is not a finite number"),
]


@pytest.mark.parametrize(("metadata", "expect"), META_CASES, ids=[str(m) for m, _ in META_CASES])
def test_bad_metadata_fails_the_metadata_check(metadata, expect, file_rows, tmp_path, capsys) -> None:
    rc, report, err = verify_json(capsys, write_rows(tmp_path / "w.parquet", copy.deepcopy(file_rows), metadata))
    assert rc == 1 and err == "", err
    problems = [p for c in report["checks"] for p in c["problems"]]
    assert any(expect in p for p in problems), problems
    json.dumps(report, ensure_ascii=True)  # what was not UTF-8 is printable


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def holding(data: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(data)
        return path
    return make


# (how the file is made, what the one line says): these are not window files at all, so no check can run
FILE_CASES = [
    (lambda p: p.mkdir() or p, "is a directory, not a file"),
    (lambda p: fifo(p), "is not a regular file (a pipe, socket or device)"),
    (holding(b""), "is not a readable Parquet file"),
    (holding(b"PAR1" + bytes(300) + b"PAR1"), "is not a readable Parquet file"),
    (lambda p: pq.write_table(pa.table({"x": [1]}), p) or p, "does not have the GRAIL window schema"),
]


@pytest.mark.parametrize(("make", "expect"), FILE_CASES, ids=["directory", "fifo", "empty", "garbage", "foreign"])
def test_what_is_not_a_window_file_is_one_line(make, expect, tmp_path, capsys) -> None:
    path = make(tmp_path / "w.parquet")
    rc, out, err = run_cli(capsys, "verify", str(path), "--skip-proofs")
    assert (rc, out) == (2, "") and err.count("\n") == 1 and expect in err, err


@pytest.mark.parametrize(("argv", "dest", "says"), [
    (["mine", "--dry-run", "--out-dir", ""], "out_dir", "--out-dir is empty (an unset shell variable?): using the default"),
    (["mine", "--dry-run", "--status-file", " "], "status_file", "--status-file is empty"),
    (["benchmark", "--json", ""], "json", "--json is empty (an unset shell variable?): no JSON is written"),
    (["emit-pm2", "--out", ""], "out", "--out is empty (an unset shell variable?): printing to stdout"),
    (["emit-pm2", "--cwd", ""], "cwd", "--cwd is empty (an unset shell variable?): using the current directory"),
])
def test_an_empty_path_warns_in_one_line_and_means_the_default(argv, dest, says, capsys) -> None:
    """`--out-dir "$UNSET"` went somewhere else without a word; now the default is used, and said."""
    args = cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert getattr(args, dest) is None and err.count("\n") == 1 and says in err, err
    if argv[0] == "mine":
        from grail_pipeline.cli.mine import default_out_dir, resolve_settings

        assert resolve_settings(args, {}).out_dir == default_out_dir({})


# --- streams and full disks: output nobody can take, a locale that cannot show '×', no room left (issue #26)
def grail(*argv: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """A real `python -m grail_pipeline` process: what a shell's redirection does to it matters here."""
    return subprocess.Popen([sys.executable, "-m", "grail_pipeline", *argv], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kw)


@pytest.fixture
def empty_window_file(tmp_path: Path) -> Path:
    path = tmp_path / "5x-window-60.parquet"
    write_window_file(path, [], {"wallet": "5x", "window_start": 60, "window_length": 30})
    return path


def test_stdout_on_a_full_device_is_one_line(empty_window_file) -> None:
    with open("/dev/full", "w") as full:
        run = grail("verify", str(empty_window_file), "--skip-proofs", "--json", stdout=full)
        err = run.communicate(timeout=120)[1]
    assert run.returncode == 2 and err.count("\n") == 1, err
    assert "grail-pipeline verify: error: cannot write standard output" in err and "No space left on device" in err


@pytest.mark.parametrize(("flags", "code"), [(["--json"], 141), ([], 1)], ids=["json", "table"])
def test_a_reader_that_left_ends_the_command_quietly(flags, code, empty_window_file) -> None:
    """`grail-pipeline verify FILE | head -0`: the pipe's reader is gone before the first write. The JSON is
    written by us (141, as a process SIGPIPE ended); the table by rich, whose own handler exits 1, as quietly."""
    run = grail("verify", str(empty_window_file), "--skip-proofs", *flags, stdout=subprocess.PIPE)
    run.stdout.close()
    err = run.communicate(timeout=120)[1]
    assert run.returncode == code and err == "", err


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"},
                                 {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}],
                         ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])
def test_an_ascii_stdout_prints_the_table(env, empty_window_file) -> None:
    """verify's table says 'group×100': under an ASCII locale it printed half and died with UnicodeEncodeError. (The
    file holds no rollout, which verify fails: exit 1 with the whole table, not a crash.)"""
    run = grail("verify", str(empty_window_file), "--skip-proofs", env=env, stdout=subprocess.PIPE)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1 and err == "", err
    assert "nonce = group?100+index" in " ".join(out.split()) and "strict: FAIL" in out


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 kB tmpfs (mounting needs root: skipped elsewhere, as the README's test command runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as fh, pytest.raises(OSError, match="No space left"):
        while True:
            fh.write(bytes(4096))


def test_a_full_disk_refuses_the_calibration_before_the_sweep(small_disk, capsys) -> None:
    fill(small_disk)
    rc, out, err = run_cli(capsys, "calibrate", "--model", "dummy:tiny", "--device", "cpu", "--memory-gb", "64",
                           "--calibration", str(small_disk / "c.yaml"))
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    assert f"cannot write --calibration {small_disk / 'c.yaml'} (No space left on device)" in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_full_disk_while_writing_checkpoints_is_one_line(small_disk, capsys) -> None:
    rc, out, err = run_cli(capsys, "make-checkpoints", "--model", "dummy:tiny", "--out", str(small_disk / "series"),
                           "--windows", "0")
    assert (rc, out) == (2, "") and err.count("\n") == 1 and "No space left on device" in err, err
    assert f"cannot write the checkpoint {small_disk / 'series' / 'checkpoint-0'}" in err, err
    assert list((small_disk / "series").iterdir()) == []  # no half checkpoint, no temporary


def test_a_full_disk_leaves_no_window_file(small_disk, file_rows) -> None:
    """The daemon's window write (write_window_file) on a full disk: an OSError, no file, no temporary."""
    fill(small_disk)
    rows = [_decoded(r) for r in copy.deepcopy(file_rows)]
    with pytest.raises(OSError, match="No space left") as info:
        write_window_file(small_disk / "w.parquet", rows, {"wallet": "5x", "window_start": 60, "window_length": 30})
    assert info.value.filename == str(small_disk / "w.parquet")  # what the one line of `mine` names
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def _decoded(row: dict) -> dict:
    commit = row["commit"]
    commit["commitments"], commit["beacon"] = json.loads(commit["commitments"]), json.loads(commit["beacon"])
    commit["rollout"]["trajectory"] = json.loads(commit["rollout"]["trajectory"])
    return row


# --- Redis: the URL, the server behind it, and what the fleet's own keys hold (issue #26)
CASES += [
    C("fleet-status", "--redis-url", "redis://[::1:6379/0", expect="is not a Redis URL: Invalid IPv6 URL"),
    C("fleet-status", "--redis-url", "redis://h:99999/0", expect="is not a Redis URL: Port out of range 0-65535"),
    C("fleet-status", "--redis-url", "redis://h:port/0", expect="is not a Redis URL: Port could not be cast"),
    C("fleet-status", "--redis-url", "redis://:6379/0", expect="names no host"),
    C("fleet-status", "--redis-url", "redis://h:0/0", expect="has port 0"),
    C("mine", expect="GRAIL_REDIS_URL='redis://***' is not a Redis URL: Invalid IPv6 URL",
      env={"GRAIL_REDIS_URL": "redis://:secret@[fe80::1/0"}),
    C("mine", expect="is not a Redis URL: Port out of range", env={"GRAIL_REDIS_URL": "redis://h:70000/0"}),
    C("emit-pm2", "--redis-url", "rediss://h:x/0", expect="is not a Redis URL: Port could not be cast"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def http_server(tmp_path: Path):
    """A real HTTP server (python -m http.server) on a free port: what a Redis URL with the wrong port reaches."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            break
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def babbling_server():
    """A server that answers every request with `+PONG` (redis-py's handshake then failed inside itself)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                while conn.recv(4096):
                    conn.sendall(b"+PONG\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join(timeout=5)
    listener.close()


@pytest.mark.parametrize("server", ["http_server", "babbling_server"])
def test_a_server_that_is_not_redis_is_one_line(server, request, capsys) -> None:
    url = request.getfixturevalue(server)
    rc, out, err = run_cli(capsys, "fleet-status", "--redis-url", url, "--hotkey", FLEET_HOTKEY)
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    assert f"the server at {url}" in err and "as Redis does" in err and "is that the Redis port?" in err


def fleet_context(**changes) -> str:
    """A fleet context whose current window is 0 for an hour (the table is built when the tests are collected)."""
    return json.dumps({"genesis": time.time() - 100, "run_seed": 0, "block_time_s": 3600.0, "window_blocks": 30,
                       "checkpoint": "dummy:tiny", **changes})


# (what is written under the fleet's keys, what fleet-status's one line says; None: it shows the fleet, and the
# damage, with exit 0)
KEY_CASES = {
    "context not JSON": ([("set", "context", "{not json")], "does not hold a fleet context (invalid json"),
    "context nested deep": ([("set", "context", "[" * 20_000)], "does not hold a fleet context"),
    "context missing fields": ([("set", "context", '{"genesis": 1.0}')], "run_seed: field required"),
    "context zero block time": ([("set", "context", fleet_context(block_time_s=0))],
                                "block_time_s: input should be greater than 0"),
    "context infinite genesis": ([("set", "context", fleet_context(genesis="inf"))], "genesis"),
    "context of the wrong type": ([("hset", "context", "a", "b")], "WRONGTYPE"),
    "workers of the wrong type": ([("set", "context", fleet_context()), ("set", "workers", "x")], "WRONGTYPE"),
    "window counter garbage": ([("set", "context", fleet_context()), ("set", "w:0:next", "many")],
                               "holds what the fleet does not write (ValueError"),
    "written report nested deep": ([("set", "context", fleet_context()), ("set", "w:0:written", "[" * 20_000)],
                                   "holds what the fleet does not write (RecursionError"),
    "plan garbage": ([("set", "context", fleet_context()), ("hset", "w:0:plan", "stop_at_ms", "soon")],
                     "holds what the fleet does not write (ValueError"),
    "heartbeat garbage": ([("hset", "workers", "w1", "garbage")], None),
    "heartbeat without a stamp": ([("hset", "workers", "w1", '{"rollouts_per_s": 1}')], None),
    "heartbeat rate a word": ([("hset", "workers", "w1", '{"at_ms": 1, "rollouts_per_s": "fast"}')], None),
    "worker name not UTF-8": ([("hset", "workers", b"w\xff", "garbage")], None),
    "leader name not UTF-8": ([("set", "leader", b"\xff\xfeleader")], None),
}


@pytest.mark.parametrize("case", KEY_CASES, ids=list(KEY_CASES))
def test_corrupt_fleet_keys_in_a_real_redis(case, redis_server, capsys) -> None:
    import redis

    from grail_pipeline.fleet.keys import FleetKeys

    writes, expect = KEY_CASES[case]
    keys = FleetKeys(ephemeral_signer().ss58_address)
    client = redis.Redis.from_url(redis_server.url)
    for op, key, *values in writes:
        getattr(client, op)(f"{keys.prefix}:{key}", *values)
    for output in ((), ("--json",)):
        rc, out, err = run_cli(capsys, "fleet-status", "--redis-url", redis_server.url, "--hotkey", keys.hotkey,
                               *output)
        if expect is None:
            assert rc == 0 and err == "", err
            assert "leader" in out and ("\\xff" in out or "not a heartbeat" in out), out
        else:
            assert (rc, out) == (2, "") and err.count("\n") == 1 and expect in err, err
            assert keys.prefix in err, err
    if expect is None:
        snapshot = json.loads(out)
        assert not snapshot["workers"] or "leader" in case  # an unreadable worker is no live worker
    client.delete(*[f"{keys.prefix}:{w[1]}" for w in writes])


# --- checkpoints: what arrives from the network, or a cache cut short, as every command that loads one meets it
def _weights(directory: Path) -> Path:
    return directory / "model.safetensors"


def _cut(directory: Path) -> None:
    data = _weights(directory).read_bytes()
    _weights(directory).write_bytes(data[: len(data) // 2])


def _tensors(directory: Path, change: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    save_file(change(load_file(str(_weights(directory)))), str(_weights(directory)), metadata={"format": "pt"})


def _json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))) if change else "")
    return edit


def _fifo_for(name: str) -> Callable[[Path], None]:
    def make(directory: Path) -> None:
        (directory / name).unlink()
        os.mkfifo(directory / name)
    return make


def _small_vocab(directory: Path) -> None:
    """A consistent checkpoint (config and tensors agree) whose vocabulary is smaller than its tokenizer's."""
    _json("config.json", lambda c: {**c, "vocab_size": 1000})(directory)
    _tensors(directory, lambda t: {k: (v[:1000].clone() if v.shape[0] == 151936 else v) for k, v in t.items()})


def _wrong_shape(tensors: dict) -> dict:
    import torch

    name = "model.layers.0.self_attn.q_proj.weight"
    return {**tensors, name: torch.zeros(3, 5, dtype=tensors[name].dtype)}


CHECKPOINT_CASES = {
    "weights cut in half": (_cut, "model.safetensors are not a whole safetensors file"),
    "weights garbage": (lambda d: _weights(d).write_bytes(b"garbage" * 100), "are not a whole safetensors file"),
    "weights a FIFO": (_fifo_for("model.safetensors"), "is not a regular file"),
    "a tensor of the wrong shape": (lambda d: _tensors(d, _wrong_shape),
                                    "tensor model.layers.0.self_attn.q_proj.weight is [3, 5] in the weights but [64, 64]"),
    "vocabulary smaller than the tokenizer's": (_small_vocab, "embeds 1000 token ids but its tokenizer has 151665"),
    "text_config a string": (_json("config.json", lambda c: {**c, "text_config": "qwen"}),
                             "text_config is a str, not an object"),
    "config not JSON": (_json("config.json", None), "is not JSON"),
    "config vocab_size a word": (_json("config.json", lambda c: {**c, "vocab_size": "many"}),
                                 "vocab_size 'many' is not a positive whole number"),
    "config nested deep": (lambda d: (d / "config.json").write_text("[" * 20_000 + "]" * 20_000), "nested too deep"),
    "config a FIFO": (_fifo_for("config.json"), "checkpoint config"),
    "metadata window 2^70": (_json("metadata.json", lambda m: {**m, "window": 2**70}),
                             f"window {2**70}: it must be a whole number from 0 to {2**63 - 1}"),
    "metadata window nested deep": (lambda d: (d / "metadata.json").write_text('{"window": ' + "[" * 20_000 + "]" * 20_000 + "}"),
                                    "nested too deep"),
    "metadata window a list": (_json("metadata.json", lambda m: {**m, "window": [[[30]]]}), "window [[[30]]]"),
    "metadata a list": (_json("metadata.json", lambda m: [m]), "is not a JSON object"),
    "metadata a FIFO": (_fifo_for("metadata.json"), "is not a regular file (a pipe, socket or device)"),
}


# make-checkpoints copies its base's tokenizer without reading it: the series' vocabulary is judged where it is loaded
CHECKPOINT_RUNS = [(case, command) for case in CHECKPOINT_CASES for command in ("benchmark", "verify", "make-checkpoints")
                   if (case, command) != ("vocabulary smaller than the tokenizer's", "make-checkpoints")]


@pytest.mark.parametrize(("case", "command"), CHECKPOINT_RUNS, ids=[f"{c}-{m}" for c, m in CHECKPOINT_RUNS])
def test_a_damaged_checkpoint_is_one_line(case, command, tmp_path, capsys) -> None:
    from grail_pipeline.inference.checkpoints import dummy_checkpoint

    directory = Path(shutil.copytree(dummy_checkpoint("tiny"), tmp_path / "checkpoint"))
    damage, expect = CHECKPOINT_CASES[case]
    damage(directory)
    if command == "benchmark":
        argv = ["benchmark", "--model", str(directory), "--device", "cpu", "--length-profile", "fixed:16",
                "--max-new-tokens", "16", "--num-problems", "1", "--batch-sizes", "4", "--engine", "hf"]
    elif command == "verify":  # verify loads the checkpoint the file names, or --model's
        argv = ["verify", str(_one_row_file(tmp_path)), "--model", str(directory), "--device", "cpu"]
    else:  # a series built on a damaged base
        argv = ["make-checkpoints", "--model", str(directory), "--out", str(tmp_path / "series"), "--windows", "0"]
    rc, out, err = run_cli(capsys, *argv)
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    assert expect in err, err


def _one_row_file(tmp_path: Path) -> Path:
    """A window file with one row, so that verify loads a model for it."""
    rows = honest_rows()[:1]
    path = tmp_path / f"{rows[0]['hotkey']}-window-{WINDOW}.parquet"
    write_window_file(path, rows, {"wallet": rows[0]["hotkey"], "window_start": WINDOW, "window_length": 30})
    return path


def test_the_cached_dummy_checkpoint_cut_in_half_is_written_again(tmp_path, caplog) -> None:
    from grail_pipeline.inference.checkpoints import check_checkpoint, dummy_checkpoint

    path = dummy_checkpoint("tiny", root=tmp_path)
    whole = _weights(path).read_bytes()
    _cut(path)
    with pytest.raises(UserError, match="not a whole safetensors file"):
        check_checkpoint(path)
    caplog.set_level("WARNING", logger="grail_pipeline")
    assert dummy_checkpoint("tiny", root=tmp_path) == path
    assert _weights(path).read_bytes() == whole  # the same seed, the same weights
    assert "is damaged; writing it again" in caplog.text


# --- every other file a command reads: a FIFO (it must not hang), nesting 20,000 deep, the wrong kind of document
def _calibration_args(command: str, path: Path, tmp_path: Path) -> list[str]:
    if command == "emit-pm2":
        return ["emit-pm2", "--calibration", str(path), "--gpus", "0", "--gpu-kind", CPU, "--wallet-cold", "c",
                "--wallet-hot", "h", "--cwd", str(tmp_path)]
    return ["calibrate", "--model", "dummy:tiny", "--device", "cpu", "--memory-gb", "64", "--calibration", str(path)]


INPUT_FILES = {
    "a FIFO": (lambda p: os.mkfifo(p), "is not a regular file (a pipe, socket or device)"),
    "YAML nested 20,000 deep": (lambda p: p.write_text("[" * 20_000 + "]" * 20_000), "nested too deep"),
    "JSON nested 20,000 deep": (lambda p: p.write_text('{"a": ' * 20_000 + "1" + "}" * 20_000), "nested too deep"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff\xfe kind: x"), "is not UTF-8 text"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", INPUT_FILES, ids=list(INPUT_FILES))
@pytest.mark.parametrize("command", ["emit-pm2 --calibration", "calibrate --calibration", "verify --status"])
def test_a_hostile_input_file_is_one_line(kind, command, tmp_path, capsys, empty_window_file) -> None:
    make, expect = INPUT_FILES[kind]
    path = tmp_path / "input"
    make(path)
    name = command.split()[0]
    if name == "verify":
        argv = ["verify", str(empty_window_file), "--skip-proofs", "--status", str(path)]
    else:
        argv = _calibration_args(name, path, tmp_path)
    rc, out, err = run_cli(capsys, *argv)
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    assert expect in err and str(path) in err, err


STATUS_DOCUMENTS = {
    "a list": "[]",
    "no state": '{"windows": {}}',
    "windows a list": '{"state": "mining", "windows": []}',
    "deadline NaN": '{"state": "mining", "windows": {"60": {"deadline": NaN}}}',
    "deadline true": '{"state": "mining", "windows": {"60": {"deadline": true}}}',
    "deadline a word": '{"state": "mining", "windows": {"60": {"deadline": "soon"}}}',
}


@pytest.mark.parametrize("document", STATUS_DOCUMENTS, ids=list(STATUS_DOCUMENTS))
def test_a_status_file_that_says_no_deadline_is_one_line(document, tmp_path, capsys, empty_window_file) -> None:
    status = tmp_path / "status.json"
    status.write_text(STATUS_DOCUMENTS[document])
    rc, out, err = run_cli(capsys, "verify", str(empty_window_file), "--skip-proofs", "--status", str(status))
    assert (rc, out) == (2, "") and err.count("\n") == 1, err
    says = "not a grail-pipeline daemon status" if document in ("a list", "no state") else "no deadline for window 60"
    assert f"status file {status}" in err and says in err, err


NUMBER_TYPES = {"whole_int", "positive_int", "nonnegative_int", "finite_float", "positive_float", "nonnegative_float",
                "kv_cache_size"}  # a positive float or `auto`
NUMBER_FLAGS = [(name, action.option_strings[-1], action.type.__name__) for name, parser in commands().items()
                for action in parser._actions
                if action.option_strings and getattr(action.type, "__name__", None) in NUMBER_TYPES]


@pytest.mark.parametrize(("command", "flag", "kind"), NUMBER_FLAGS, ids=[f"{c} {f}" for c, f, _ in NUMBER_FLAGS])
@pytest.mark.parametrize("value", ["²", "①", "١٢", "1_000", str(2**64), "9" * 5000, "1e999", "nan", "-inf", "0x10"])
def test_every_number_flag_refuses_what_is_no_number_in_range(command, flag, kind, value, capsys) -> None:
    """Every flag typed as a number, whatever its command: one line and exit 2 at parse time (before any work).
    A float flag reads '١٢', '1_000' and 2^64 as numbers, as Python does: its range is its rule's (the table above)."""
    base = ["--out", "x"] if command == "make-checkpoints" else []
    if (kind.endswith("float") or kind == "kv_cache_size") and value in ("١٢", "1_000", str(2**64)):
        assert cli.build_parser().parse_args([command, *base, flag, value]) is not None
        return
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args([command, *base, flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert f"argument {flag}:" in err or (value == "-inf" and "unrecognized arguments: -inf" in err), err


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False),
                                           ("false", False), ("", False), ("Off", False)])
def test_on_off_variables_take_the_usual_words(value, on, caplog) -> None:
    """`GRAIL_USE_FLASH_ATTENTION=true` was read as off without a word; every on/off variable takes these words."""
    import torch

    from grail_pipeline.inference.loading import attention_implementation, env_flag

    assert env_flag({"GRAIL_USE_FLASH_ATTENTION": value}, "GRAIL_USE_FLASH_ATTENTION") is on
    caplog.set_level("WARNING", logger="grail_pipeline")
    assert attention_implementation(torch.device("cpu"), {"GRAIL_USE_FLASH_ATTENTION": value}) == "sdpa"
    assert ("flash-attention needs a CUDA GPU" in caplog.text) is on  # asked for, and told why not here
