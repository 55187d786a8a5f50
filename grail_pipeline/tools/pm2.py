"""The PM2 ecosystem file of a node: one miner per GPU, each with the batch size calibrated for its GPU kind.

Each GPU gets the batch size calibrated for its kind, so a node with mixed GPUs is served by one file.
Workers are numbered globally (node index × GPUs per node + position), so that the static split of
problem indices (GRAIL_WORKER_ID of GRAIL_TOTAL_WORKERS) covers every node without a coordinator.
Every value reaches the file through JSON encoding, which is valid JavaScript whatever it holds.
Every value an app's miner reads is checked here by the rules `mine` applies (`mining.rules`), the
calibration's fields included, so that no app is written that its worker would refuse at start (PM2
would restart it until it gave up).

Several workers of one hotkey are a fleet: one window file per window needs their problem indices shared
through Redis (mining/fleet_worker.py), so every worker gets `GRAIL_REDIS_URL` (`--redis-url`; on one node
the default is a server on this node, `redis://127.0.0.1:6379/0`; several nodes must name the hub), and
the node that hosts it (`--redis-node`, default 0) gets an app that runs `redis-server` with its
append-only file on (a restart keeps the claims and signed groups). The Redis app comes last in the file:
`pm2 stop` stops the apps in file order, so the workers drain, and the last one writes the open window,
while Redis still answers; the workers wait for it at start (mine waits up to `REDIS_START_WAIT_S`).

Dry-run workers serve Prometheus metrics (mine --metrics-port, mining/metrics.py), each on its own port
(`--metrics-port` plus its position on the node), and a scrape configuration for the node's workers is written
beside the ecosystem file (`prometheus.yml`, from templates/prometheus.yml.j2), ready for `prometheus
--config.file`. The production `grail mine` serves no such metrics, so `--target grail` gets none.

Several hotkeys on one GPU are the other way round (`--hotkeys`, dry-run target): each GPU's app mines its share
of the node's hotkeys from one engine (`mine --hotkeys`: GRAIL_HOTKEYS names the wallets, never key material),
each app a worker alone (no fleet, no Redis), the hotkeys dealt to the GPUs in order, `--hotkeys-per-gpu` each.
`--fleet-hotkeys` is a fleet of several hotkeys: every worker mines all of them (GRAIL_HOTKEYS with GRAIL_REDIS_URL,
mining/hotkeys.py), each hotkey's windows coordinated through Redis on their own, with no target (a fleet
refuses one).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

import jinja2

from grail_pipeline import __version__
from grail_pipeline.common.errors import UserError
from grail_pipeline.fleet.connection import ENV_REDIS_URL, redacted, redis_url_from_env
from grail_pipeline.mining import rules
from grail_pipeline.mining.fill import resolve_target
from grail_pipeline.mining.settings import ENV_HOTKEYS
from grail_pipeline.protocol.profile import PROFILE
from grail_pipeline.tools.calibration_file import CPU_KIND, Choice, engines_for, load_calibrations, read_choice

TEMPLATE = "ecosystem.config.js.j2"
SCRAPE_TEMPLATE = "prometheus.yml.j2"
DEFAULT_METRICS_PORT = 9400  # the first worker's; the next ones count up (9100 is node_exporter's, 9400 is free)
SCRAPE_FILE = "prometheus.yml"
TARGETS = ("grail", "dry-run")
NAME_PREFIX = {"grail": "grail-miner", "dry-run": "grail-dry-run"}
DEFAULT_DRAIN_S = 60.0  # the daemon's own --drain-timeout default
KILL_MARGIN_S = 15.0  # PM2 waits this much longer than the drain before SIGKILL
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MEMORY_RE = re.compile(r"[1-9][0-9]*[KMG]")
HOST_RE = re.compile(r"[A-Za-z0-9._:-]+")  # a name, an IPv4 or an IPv6 address: what a scrape target holds
# emit-pm2 and every app agree on what GPU index N means: nvidia-smi's order, not CUDA's fastest-first.
DEVICE_ORDER = "PCI_BUS_ID"


@dataclass(frozen=True)
class Worker:
    """One PM2 app: a GPU, its calibration and its place in the fleet."""

    gpu: int
    choice: Choice
    worker_id: int
    metrics_port: int | None = None  # dry-run: where its Prometheus metrics are served
    wallets: tuple[tuple[str, str], ...] = ()  # several hotkeys on this GPU's engine (--hotkeys); (): the one wallet


GRAIL_SAFETY_BLOCKS = 6  # the fork's production configs (grail-protocol.md §7): the upstream miner's only stop rule

MAX_GPU_INDEX = 1023  # CUDA_VISIBLE_DEVICES of a host; more is a typo


def parse_gpus(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise UserError("--gpus is empty: list GPU indices, e.g. --gpus 0,1,2,3")
    gpus = []
    for part in parts:
        index = rules.parse_whole(part)
        if index is None or not 0 <= index <= MAX_GPU_INDEX:
            raise UserError(f"--gpus takes GPU indices (whole numbers from 0 to {MAX_GPU_INDEX}), got '{part[:20]}'")
        gpus.append(index)
    duplicates = sorted({g for g in gpus if gpus.count(g) > 1})
    if duplicates:
        raise UserError(f"--gpus lists GPU {', '.join(map(str, duplicates))} more than once")
    return gpus


def gpu_kinds(gpus: list[int] | None, kinds: str | None) -> list[tuple[int, str]]:
    """(index, kind) for each GPU: named by --gpu-kind, or detected here in nvidia-smi order."""
    if kinds is not None:
        if gpus is None:
            raise UserError("--gpu-kind needs --gpus to say which GPUs it names")
        names = [k.strip() for k in kinds.split(",")]
        if not all(names):
            raise UserError("--gpu-kind has an empty name")
        if len(names) == 1:
            names *= len(gpus)
        if len(names) != len(gpus):
            raise UserError(f"--gpu-kind gives {len(names)} names for {len(gpus)} GPUs: give one, or one per GPU")
        return list(zip(gpus, names, strict=True))
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        raise UserError("CUDA_VISIBLE_DEVICES is set, so detected GPU indices are not the node's: unset it, "
                        "or give --gpus and --gpu-kind")
    os.environ["CUDA_DEVICE_ORDER"] = DEVICE_ORDER
    import torch  # names and count need no CUDA context: the GPUs of a running fleet are left alone

    detected = {i: torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    if not detected:
        raise UserError("no GPU detected here: give --gpus and --gpu-kind (the GPU name in the calibration file; "
                        "on a box without a GPU, workers of a CPU calibration: --gpus 0 --gpu-kind cpu)")
    for gpu in gpus or []:
        if gpu not in detected:
            raise UserError(f"GPU {gpu} is not on this node (detected: {', '.join(map(str, sorted(detected)))})")
    return [(g, detected[g]) for g in (gpus if gpus is not None else sorted(detected))]


def pick_engine(target: str, requested: str | None, calibrated: list[str]) -> str:
    if target == "grail":
        if requested not in (None, "hf"):
            raise UserError("--target grail takes the hf calibration: grail mine's GRAIL_GENERATION_BATCH_SIZE is its "
                            f"own HF generate batch (at most {rules.HF_MAX_BATCH}), not the fast engine's slots")
        return "hf"
    if requested is not None:
        return requested
    return "fast" if "fast" in calibrated else "hf"


def check_choice(target: str, choice: Choice, path: str) -> None:
    """What the worker does with the entry, checked as `mine` will check it: the batch size for its engine and,
    for dry-run workers (which get the calibration's model and lengths as flags), the workload."""
    try:
        rules.check_batch_size(choice.engine, choice.batch_size, name="chosen.batch_size")
        if target == "dry-run":
            rules.check_workload(choice.model, choice.length_profile, choice.max_new_tokens, choice.max_prompt_tokens)
            if choice.kv_cache_gb is not None:  # torch and the model's config only then (emit-pm2 stays light)
                import torch

                from grail_pipeline.mining.choices import check_kv_cache

                check_kv_cache(choice.model, torch.device("cpu" if choice.gpu == CPU_KIND else "cuda"), choice.engine,
                               choice.kv_cache_gb, choice.max_prompt_tokens, choice.max_new_tokens)
    except UserError as exc:
        raise UserError(f"{path}: {choice.gpu} / {choice.engine}: {exc}") from None


def plan_workers(args: argparse.Namespace) -> list[Worker]:
    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    calibrations = load_calibrations(args.calibration)
    kinds = gpu_kinds(gpus, args.gpu_kind)
    per_node = args.gpus_per_node or len(kinds)
    if not 0 <= args.node_index < args.nodes:
        raise UserError(f"--node-index {args.node_index} is not in 0..{args.nodes - 1} (--nodes {args.nodes})")
    if len(kinds) != per_node:
        raise UserError(f"{len(kinds)} GPU(s) here but --gpus-per-node {per_node}: every node must run "
                        f"--gpus-per-node workers, or some problem indices would never be mined")
    first = args.node_index * per_node
    workers = [Worker(gpu, read_choice(calibrations, args.calibration, kind,
                                       pick_engine(args.target, args.engine, engines_for(calibrations, kind))),
                      first + position, None if not args.metrics_port else args.metrics_port + position)
               for position, (gpu, kind) in enumerate(kinds)]
    if workers[-1].metrics_port is not None and workers[-1].metrics_port > 65535:
        raise UserError(f"--metrics-port {args.metrics_port} + {len(workers) - 1} workers passes port 65535")
    for worker in workers:
        check_choice(args.target, worker.choice, args.calibration)
    return workers


# what emit-pm2 sets itself, each from a checked flag or the calibration: --env may not override it unchecked
OWN_ENV = ("CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES", "GRAIL_WORKER_ID", "GRAIL_TOTAL_WORKERS",
           "GRAIL_GENERATION_BATCH_SIZE", "GRAIL_USE_FLASH_ATTENTION", "GRAIL_MINER_SAFETY_BLOCKS", "GRAIL_BLOCK_TIME",
           "BT_WALLET_COLD", "BT_WALLET_HOT", "BT_WALLET_PATH", "GRAIL_REDIS_URL", ENV_HOTKEYS)
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_KEY_RE.fullmatch(key):
            raise UserError(f"--env takes KEY=VALUE with a shell variable name as KEY, got '{pair}'")
        if key in OWN_ENV:
            raise UserError(f"--env {key} is set by emit-pm2 itself (from its flags and the calibration), "
                            f"where it is checked; use the flag")
        env[key] = value
    return env


def deal_hotkeys(args: argparse.Namespace, workers: list[Worker]) -> list[Worker]:
    """--hotkeys dealt to the node's GPUs in order, --hotkeys-per-gpu each (default: as evenly as they go)."""
    from grail_pipeline.protocol.wallet import parse_wallet_names

    wallets = parse_wallet_names(args.hotkeys, "--hotkeys")
    per_gpu = args.hotkeys_per_gpu or -(-len(wallets) // len(workers))
    shares = [tuple(wallets[i * per_gpu:(i + 1) * per_gpu]) for i in range(len(workers))]
    if len(wallets) > per_gpu * len(workers) or not all(shares):
        raise UserError(f"{len(wallets)} hotkey(s) at {per_gpu} per GPU do not fill this node's {len(workers)} GPU(s) "
                        f"one share each: give --gpus, --hotkeys-per-gpu or more --hotkeys")
    return [dataclasses.replace(w, wallets=share) for w, share in zip(workers, shares)]


def _check_flags(args: argparse.Namespace) -> None:
    fleet_hotkeys = getattr(args, "fleet_hotkeys", None)
    if fleet_hotkeys is not None:
        from grail_pipeline.protocol.wallet import parse_wallet_names

        if args.hotkeys is not None:
            raise UserError("--hotkeys deals hotkeys to GPUs, each app alone; --fleet-hotkeys gives every worker "
                            "of a fleet all of them: give one of the two")
        if args.target != "dry-run":
            raise UserError("--fleet-hotkeys (several hotkeys from one engine) is for --target dry-run: the "
                            "production `grail mine` mines one hotkey per process")
        args.fleet_hotkeys = ",".join(f"{cold}/{hot}" for cold, hot in  # what every app's mine would refuse
                                      parse_wallet_names(fleet_hotkeys, "--fleet-hotkeys"))
    if args.hotkeys is not None:
        if args.target != "dry-run":
            raise UserError("--hotkeys (several hotkeys from one engine) is for --target dry-run: the production "
                            "`grail mine` mines one hotkey per process")
        if args.redis_url is not None or args.nodes > 1:
            raise UserError("--hotkeys gives each GPU its own hotkeys, no fleet: --redis-url and --nodes are for "
                            "a fleet, of one hotkey or of --fleet-hotkeys (every worker mining all of them)")
        resolve_target(args.target_rollouts, args.failed_windows or 0, 2)  # what every app's mine would refuse
    elif args.hotkeys_per_gpu is not None or args.target_rollouts is not None or args.failed_windows is not None:
        raise UserError("--hotkeys-per-gpu, --target-rollouts and --failed-windows go with --hotkeys")
    elif fleet_hotkeys is None and (not args.wallet_cold or not args.wallet_hot):
        raise UserError("the miner needs a wallet: give --wallet-cold and --wallet-hot "
                        "(or set BT_WALLET_COLD and BT_WALLET_HOT)")
    if args.name_prefix is not None and not NAME_RE.fullmatch(args.name_prefix):
        raise UserError(f"--name-prefix '{args.name_prefix}' must be letters, digits, '.', '_' or '-' "
                        f"(it names log files)")
    if not MEMORY_RE.fullmatch(args.max_memory_restart):
        raise UserError(f"--max-memory-restart takes a size like 80G or 512M, got '{args.max_memory_restart}'")
    if args.target == "grail" and (args.out_dir, args.block_time, args.genesis) != (None, None, None):
        raise UserError("--out-dir, --block-time and --genesis are for --target dry-run")
    if args.target == "grail" and args.metrics_port:
        raise UserError("--metrics-port is for --target dry-run: the production `grail mine` serves no "
                        "grail-pipeline metrics")
    if args.metrics_port is None:
        args.metrics_port = DEFAULT_METRICS_PORT if args.target == "dry-run" else 0
    if args.metrics_port > 65535:
        raise UserError(f"--metrics-port {args.metrics_port} is not a port (1 to 65535; 0: no metrics)")
    if not HOST_RE.fullmatch(args.metrics_host):
        raise UserError(f"--metrics-host '{args.metrics_host}' is not a host name or address")
    if args.safety_blocks is None:
        args.safety_blocks = GRAIL_SAFETY_BLOCKS if args.target == "grail" else 0
    rules.check_safety_blocks(args.safety_blocks, PROFILE.window_length_blocks)
    if not 0 <= args.redis_node < args.nodes:
        raise UserError(f"--redis-node {args.redis_node} is not in 0..{args.nodes - 1} (--nodes {args.nodes})")
    rules.check_drain_timeout(args.drain_timeout)
    if args.block_time is not None:
        rules.check_block_time(args.block_time)
    if args.genesis is not None:
        rules.check_genesis(args.genesis, time.time())


def fleet_url(args: argparse.Namespace, total: int) -> str | None:
    """Every worker's GRAIL_REDIS_URL: --redis-url (checked as mine checks it), this node's server when the
    fleet is one node, none for one worker alone; several nodes without --redis-url are refused."""
    if args.redis_url is not None:
        url = redis_url_from_env({ENV_REDIS_URL: args.redis_url})
        if url is None:
            raise UserError("--redis-url is empty")
        return url
    if total == 1:
        return None
    if args.nodes > 1:
        raise UserError(f"{total} workers on {args.nodes} nodes share one Redis: give every node the same "
                        f"--redis-url redis://<hub>:6379/0 (the node that runs it, reachable from the others)")
    return LOCAL_REDIS_URL


def redis_app(args: argparse.Namespace, url: str, cwd: str, log_dir: str, prefix: str) -> dict | None:
    """The app that runs the fleet's Redis on the hub node (None elsewhere, or with --no-redis-app)."""
    if not args.redis_app or args.node_index != args.redis_node:
        return None
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise UserError(f"--redis-url {parts.scheme}:// is not a server this file can start: run your own and "
                        f"pass --no-redis-app")
    if args.redis_server is not None and not os.access(os.path.expanduser(args.redis_server), os.X_OK):
        raise UserError(f"--redis-server {args.redis_server} is not an executable file")
    server = args.redis_server or shutil.which("redis-server")
    if server is None:
        raise UserError("redis-server is not installed on this node (e.g. apt-get install redis-server): install it, "
                        "give --redis-server PATH, or run your own server and pass --no-redis-app")
    command = ["--port", str(parts.port or 6379), "--dir", cwd, "--appendonly", "yes", "--appendfsync", "everysec",
               "--save", ""]
    if parts.hostname in LOCAL_HOSTS:
        command += ["--bind", "127.0.0.1"]
    elif parts.password:
        command += ["--bind", "0.0.0.0", "--requirepass", parts.password]
    else:  # other nodes connect without a password: firewall the port to the fleet's nodes (deploy/README.md)
        command += ["--bind", "0.0.0.0", "--protected-mode", "no"]
    name = f"{prefix}-redis"
    return dict(name=name, script=os.path.abspath(os.path.expanduser(server)), args=command, cwd=cwd,
                out_file=os.path.join(log_dir, f"{name}.out.log"), error_file=os.path.join(log_dir, f"{name}.err.log"))


def _env(args: argparse.Namespace, worker: Worker, total: int, extra: dict[str, str],
         redis_url: str | None) -> dict[str, str]:
    flash = args.flash_attention or ("1" if worker.choice.attention == "flash_attention_2" else "0")
    alone = bool(worker.wallets)  # this GPU's own hotkeys: a worker alone, whatever the node's size
    env = dict(CUDA_DEVICE_ORDER=DEVICE_ORDER, CUDA_VISIBLE_DEVICES=str(worker.gpu),
               GRAIL_WORKER_ID="0" if alone else str(worker.worker_id), GRAIL_TOTAL_WORKERS="1" if alone else str(total),
               GRAIL_GENERATION_BATCH_SIZE=str(worker.choice.batch_size), GRAIL_USE_FLASH_ATTENTION=flash,
               GRAIL_MINER_SAFETY_BLOCKS=str(args.safety_blocks),
               **({ENV_HOTKEYS: ",".join(f"{cold}/{hot}" for cold, hot in worker.wallets)} if alone else
                  {ENV_HOTKEYS: args.fleet_hotkeys} if getattr(args, "fleet_hotkeys", None) is not None else
                  dict(BT_WALLET_COLD=args.wallet_cold, BT_WALLET_HOT=args.wallet_hot)),
               TOKENIZERS_PARALLELISM="false")
    if args.wallet_path:
        env["BT_WALLET_PATH"] = os.path.abspath(os.path.expanduser(args.wallet_path))
    if args.block_time is not None:
        env["GRAIL_BLOCK_TIME"] = f"{args.block_time:g}"
    if redis_url is not None:
        env["GRAIL_REDIS_URL"] = redis_url
    return {**env, **extra}


def kv_cache_flag(choice: Choice) -> list[str]:
    """The KV cache the calibration ran with, for a dry-run worker: its GB, or `full` where it recorded none (every
    slot's longest sequence, as calibrations before the paged cache's `auto` default ran); the hf engine has none."""
    if choice.kv_cache_gb is not None:
        return ["--kv-cache-gb", f"{choice.kv_cache_gb:g}"]
    return ["--kv-cache-gb", rules.KV_CACHE_FULL] if choice.engine == "fast" else []


def _command(args: argparse.Namespace, cwd: str, worker: Worker, genesis: float) -> tuple[str, list[str]]:
    """The executable and its arguments (PM2 runs it as is: interpreter 'none')."""
    if args.target == "grail":
        return os.path.join(cwd, os.path.expanduser(args.grail_bin)), ["mine"]
    choice = worker.choice
    out_dir = os.path.join(cwd, os.path.expanduser(args.out_dir or "dry-run"))
    command = ["-m", "grail_pipeline", "mine", "--dry-run", "--model", choice.model, "--engine", choice.engine,
               "--max-new-tokens", str(choice.max_new_tokens), "--max-prompt-tokens", str(choice.max_prompt_tokens),
               "--length-profile", choice.length_profile, *kv_cache_flag(choice),
               "--out-dir", out_dir, "--drain-timeout", f"{args.drain_timeout:g}", "--genesis", f"{genesis:.3f}"]
    if choice.gpu == CPU_KIND:
        command += ["--device", "cpu"]
    if worker.metrics_port is not None:
        address = "127.0.0.1" if args.metrics_host in LOCAL_HOSTS else "0.0.0.0"  # reachable where Prometheus is
        command += ["--metrics-port", str(worker.metrics_port), "--metrics-address", address]
    if args.target_rollouts is not None:
        command += ["--target-rollouts", args.target_rollouts]
    if args.failed_windows is not None:
        command += ["--failed-windows", str(args.failed_windows)]
    return sys.executable, command


def build_context(args: argparse.Namespace) -> dict:
    """Everything the template needs, validated."""
    _check_flags(args)
    extra = parse_env(args.env)
    workers = plan_workers(args)
    if args.hotkeys is not None:
        workers = deal_hotkeys(args, workers)
    total = args.nodes * len(workers) if args.hotkeys is None else 1  # several hotkeys per GPU: no fleet
    cwd = os.path.abspath(os.path.expanduser(args.cwd or os.getcwd()))
    log_dir = os.path.join(cwd, os.path.expanduser(args.log_dir or "logs"))
    prefix = args.name_prefix or NAME_PREFIX[args.target]
    genesis = time.time() if args.genesis is None else args.genesis
    redis_url = fleet_url(args, total)
    redis = None if redis_url is None else redis_app(args, redis_url, cwd, log_dir, prefix)
    warning = rules.genesis_warning(genesis, time.time())
    if warning is not None:
        print(f"grail-pipeline emit-pm2: warning: {warning}", file=sys.stderr)
    apps = []
    for worker in workers:
        script, script_args = _command(args, cwd, worker, genesis)
        name = f"{prefix}-{worker.worker_id}"
        apps.append(dict(name=name, script=script, args=script_args, cwd=cwd,
                         env=_env(args, worker, total, extra, redis_url), gpu_kind=worker.choice.gpu,
                         engine=worker.choice.engine, metrics_port=worker.metrics_port,
                         metrics_target=metrics_target(args.metrics_host, worker.metrics_port),
                         kill_timeout_ms=round((args.drain_timeout + KILL_MARGIN_S) * 1000),
                         max_memory_restart=args.max_memory_restart,
                         out_file=os.path.join(log_dir, f"{name}.out.log"),
                         error_file=os.path.join(log_dir, f"{name}.err.log")))
    if args.target == "grail" and not os.path.exists(apps[0]["script"]):
        print(f"grail-pipeline emit-pm2: warning: {apps[0]['script']} does not exist here: --target grail runs "
              f"F's miner (`grail mine`, from github.com/Agile-Ascent-Limited/Grail); install it there or give "
              f"--grail-bin PATH (deploy/README.md, step 3)", file=sys.stderr)
    return dict(version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), target=args.target,
                command=shlex.join(["grail-pipeline", *sys.argv[1:]]), calibration=args.calibration,
                node_index=args.node_index, nodes=args.nodes, total_workers=total, log_dir=log_dir, apps=apps,
                redis_url=None if redis_url is None else redacted(redis_url),
                redis=redis, metrics_host=args.metrics_host, scrape_interval_s=args.scrape_interval)


def metrics_target(host: str, port: int | None) -> str | None:
    """HOST:PORT as Prometheus's targets take it (an IPv6 address in brackets)."""
    if port is None:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def scrape_config_path(out: str | None, cwd: str) -> str:
    """Where the scrape configuration goes: beside --out, or in the apps' working directory with stdout."""
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(out))) if out is not None else cwd
    return os.path.join(folder, SCRAPE_FILE)


def render(context: dict, template: str = TEMPLATE) -> str:
    """A template, installed as package data (grail_pipeline.templates), filled in: the ecosystem file (TEMPLATE)
    or the scrape configuration (SCRAPE_TEMPLATE)."""
    source = resources.files("grail_pipeline.templates").joinpath(template).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    return env.from_string(source).render(**context)
