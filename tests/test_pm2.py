"""emit-pm2: the ecosystem file loaded by real Node.js, bad input as one line, the template in an
installed package, and a dry-run fleet started and stopped under real PM2."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, write_wallet

from grail_pipeline.protocol.records import read_window_file
from grail_pipeline.tools.calibration_file import save_entry

REPO = Path(__file__).resolve().parent.parent
PM2_DIR = Path(__file__).resolve().parent / "pm2"
H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
WALLET = ["--wallet-cold", "cold", "--wallet-hot", "hot"]


def need(tool: str) -> str:
    """A tool the test cannot do without: skipped on a developer box, a failure in CI."""
    path = shutil.which(tool)
    if path is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{tool} is not installed")
    return path


def entry(gpu: str, engine: str, batch_size: int, attention: str = "sdpa", model: str = "dummy:qwen2.5-3b",
          max_new_tokens: int = 1024, length_profile: str = "lognormal:400:0.5:32:1024") -> dict:
    """The fields emit-pm2 reads, as `calibrate` writes them."""
    return dict(gpu=dict(name=gpu, total_memory_gb=85.0), model=model, engine=engine, attention=attention,
                workload=dict(max_new_tokens=max_new_tokens, max_prompt_tokens=512,
                              length_profile=length_profile),
                rows=[dict(batch_size=batch_size, status="ok")], chosen=dict(batch_size=batch_size))


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    """A node with H100s and A100s, both calibrated with hf, the H100 also with the fast engine."""
    path = tmp_path / "calibration.yaml"
    save_entry(path, entry(H100, "hf", 16))
    save_entry(path, entry(H100, "fast", 256))
    save_entry(path, entry(A100, "hf", 8, attention="flash_attention_2"))
    return path


def emit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "emit-pm2", *argv)


def load_apps(text: str, tmp_path: Path) -> list[dict]:
    """The file as PM2 sees it: required by Node.js, apps returned as JSON."""
    path = tmp_path / "ecosystem.config.js"
    path.write_text(text)
    script = "process.stdout.write(JSON.stringify(require(process.argv[1]).apps))"
    out = subprocess.run([need("node"), "-e", script, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_mixed_node_for_grail(calibration, tmp_path, capsys) -> None:
    gpus = ["--gpus", "0,1,2", "--gpu-kind", f"{H100},{H100},{A100}"]
    rc, out, err = emit(capsys, "--calibration", str(calibration), *gpus, *WALLET, "--cwd", str(tmp_path),
                        "--redis-url", "redis://hub:6379/0")
    assert rc == 0, err
    apps = load_apps(out, tmp_path)
    assert [a["name"] for a in apps] == ["grail-miner-0", "grail-miner-1", "grail-miner-2", "grail-miner-redis"]
    redis = apps.pop()  # last: `pm2 stop` stops it after the workers drained
    assert redis["script"] == shutil.which("redis-server") and redis["cwd"] == str(tmp_path)
    flags = dict(zip(redis["args"][::2], redis["args"][1::2], strict=True))
    assert flags["--port"] == "6379" and flags["--appendonly"] == "yes" and flags["--bind"] == "0.0.0.0"
    assert flags["--protected-mode"] == "no"  # other nodes connect without a password (deploy/README.md: firewall)
    for gpu, (app, batch, flash) in enumerate(zip(apps, ("16", "16", "8"), ("0", "0", "1"), strict=True)):
        assert app["script"] == str(tmp_path / ".venv/bin/grail") and app["args"] == ["mine"]
        assert app["interpreter"] == "none" and app["cwd"] == str(tmp_path)
        assert app["env"] == {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu), "GRAIL_WORKER_ID": str(gpu),
            "GRAIL_TOTAL_WORKERS": "3", "GRAIL_GENERATION_BATCH_SIZE": batch, "GRAIL_USE_FLASH_ATTENTION": flash,
            "GRAIL_MINER_SAFETY_BLOCKS": "6", "BT_WALLET_COLD": "cold", "BT_WALLET_HOT": "hot",
            "TOKENIZERS_PARALLELISM": "false", "GRAIL_REDIS_URL": "redis://hub:6379/0"}
        assert app["kill_timeout"] > 60_000  # above the daemon's default drain of 60 s
        assert app["max_memory_restart"] == "80G" and app["autorestart"] is True
        assert app["exp_backoff_restart_delay"] > 0 and app["stop_exit_codes"] == [0]
        assert app["out_file"] == str(tmp_path / "logs" / f"grail-miner-{gpu}.out.log")
        assert app["error_file"] == str(tmp_path / "logs" / f"grail-miner-{gpu}.err.log")
        assert app["log_date_format"]
    assert "does not exist here" in err  # .venv/bin/grail is not in tmp_path


def test_nodes_cover_every_worker_once(calibration, tmp_path, capsys) -> None:
    seen = []
    for node in range(3):
        rc, out, err = emit(capsys, "--calibration", str(calibration), "--gpus", "0,1", "--gpu-kind", H100, *WALLET,
                            "--node-index", str(node), "--nodes", "3", "--gpus-per-node", "2",
                            "--redis-url", "redis://:pw@10.0.0.1:6380/2")
        assert rc == 0, err
        apps = load_apps(out, tmp_path)
        if node == 0:  # the hub runs the fleet's Redis, with the URL's password
            redis = apps.pop()
            assert redis["name"] == "grail-miner-redis" and redis["args"][-2:] == ["--requirepass", "pw"]
            assert redis["args"][:2] == ["--port", "6380"]
        assert {a["env"]["GRAIL_REDIS_URL"] for a in apps} == {"redis://:pw@10.0.0.1:6380/2"}
        assert {a["env"]["GRAIL_TOTAL_WORKERS"] for a in apps} == {"6"}
        assert [a["env"]["CUDA_VISIBLE_DEVICES"] for a in apps] == ["0", "1"]
        seen += [int(a["env"]["GRAIL_WORKER_ID"]) for a in apps]
    assert seen == list(range(6))


def test_dry_run_target(calibration, tmp_path, capsys) -> None:
    rc, out, err = emit(capsys, "--calibration", str(calibration), "--target", "dry-run", "--gpus", "3,1",
                        "--gpu-kind", H100, *WALLET, "--cwd", str(tmp_path), "--block-time", "0.5",
                        "--drain-timeout", "20", "--wallet-path", str(tmp_path / "wallets"))
    assert rc == 0, err
    apps = load_apps(out, tmp_path)
    assert [a["name"] for a in apps] == ["grail-dry-run-0", "grail-dry-run-1", "grail-dry-run-redis"]
    assert apps.pop()["args"][-2:] == ["--bind", "127.0.0.1"]  # one node: its own server, local only
    assert {a["env"]["GRAIL_REDIS_URL"] for a in apps} == {"redis://127.0.0.1:6379/0"}
    geneses = set()
    for app, gpu in zip(apps, ("3", "1"), strict=True):
        assert app["script"] == sys.executable
        args = app["args"]
        assert args[:4] == ["-m", "grail_pipeline", "mine", "--dry-run"]
        flags = dict(zip(args[4::2], args[5::2], strict=True))
        assert flags["--engine"] == "fast" and flags["--model"] == "dummy:qwen2.5-3b"  # fast preferred when calibrated
        assert flags["--length-profile"] == "lognormal:400:0.5:32:1024" and flags["--max-new-tokens"] == "1024"
        assert flags["--max-prompt-tokens"] == "512"  # the fast engine's KV cache, as calibrated
        assert flags["--kv-cache-gb"] == "full"  # a calibration that recorded none ran every slot's longest sequence
        assert flags["--out-dir"] == str(tmp_path / "dry-run") and flags["--drain-timeout"] == "20"
        geneses.add(flags["--genesis"])
        assert app["kill_timeout"] > 20_000
        env = app["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == gpu and env["GRAIL_GENERATION_BATCH_SIZE"] == "256"
        assert env["GRAIL_BLOCK_TIME"] == "0.5" and env["BT_WALLET_PATH"] == str(tmp_path / "wallets")
    assert len(geneses) == 1 and abs(float(geneses.pop()) - time.time()) < 60  # one clock for the whole fleet
    rc, out, _ = emit(capsys, "--calibration", str(calibration), "--target", "dry-run", "--gpus", "0",
                      "--gpu-kind", H100, "--engine", "hf", *WALLET, "--cwd", str(tmp_path))  # its prometheus.yml
    (hf,) = load_apps(out, tmp_path)[:1]
    assert hf["env"]["GRAIL_GENERATION_BATCH_SIZE"] == "16" and "--kv-cache-gb" not in hf["args"]  # hf has none


def test_a_dry_run_worker_gets_the_kv_cache_its_calibration_ran_with(tmp_path, capsys) -> None:
    path = tmp_path / "calibration.yaml"
    fast = entry(H100, "fast", 1024)
    fast["workload"]["kv_cache_gb"] = 24.5  # calibrate --kv-cache-gb 24.5: more slots than the default cache holds
    save_entry(path, fast)
    rc, out, err = emit(capsys, "--calibration", str(path), "--target", "dry-run", "--gpus", "0", "--gpu-kind", H100,
                        *WALLET, "--cwd", str(tmp_path))
    assert rc == 0, err
    args = load_apps(out, tmp_path)[0]["args"]
    assert args[args.index("--kv-cache-gb") + 1] == "24.5"


def test_several_hotkeys_per_gpu(calibration, tmp_path, capsys) -> None:
    """--hotkeys: one app per GPU, each mining its share of the hotkeys from one engine, alone (no fleet, no
    Redis); the file names the wallets, never key material."""
    hotkeys = "cold/h1,cold/h2,cold/h3,cold/h4"
    rc, out, err = emit(capsys, "--calibration", str(calibration), "--target", "dry-run", "--gpus", "3,1",
                        "--gpu-kind", H100, "--hotkeys", hotkeys, "--target-rollouts", "cap", "--failed-windows", "1",
                        "--cwd", str(tmp_path), "--wallet-path", str(tmp_path / "wallets"))
    assert rc == 0, err
    apps = load_apps(out, tmp_path)
    assert [a["name"] for a in apps] == ["grail-dry-run-0", "grail-dry-run-1"]  # no Redis app
    assert [a["env"]["GRAIL_HOTKEYS"] for a in apps] == ["cold/h1,cold/h2", "cold/h3,cold/h4"]
    for app, gpu in zip(apps, ("3", "1"), strict=True):
        env = app["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == gpu and env["GRAIL_WORKER_ID"] == "0" and env["GRAIL_TOTAL_WORKERS"] == "1"
        assert "GRAIL_REDIS_URL" not in env and "BT_WALLET_HOT" not in env
        assert env["BT_WALLET_PATH"] == str(tmp_path / "wallets")
        assert app["args"][-4:] == ["--target-rollouts", "cap", "--failed-windows", "1"]
    # one metrics port per app (its hotkeys' series and its engine's: mining/metrics.py), each scraped once
    ports = [a["args"][a["args"].index("--metrics-port") + 1] for a in apps]
    (job,) = yaml.safe_load((tmp_path / "prometheus.yml").read_text())["scrape_configs"]
    assert ports == ["9400", "9401"] and job["static_configs"][0]["targets"] == [f"127.0.0.1:{p}" for p in ports]
    rc, out, _ = emit(capsys, "--calibration", str(calibration), "--target", "dry-run", "--gpus", "3,1",
                      "--gpu-kind", H100, "--hotkeys", hotkeys, "--hotkeys-per-gpu", "3", "--cwd", str(tmp_path))
    assert [a["env"]["GRAIL_HOTKEYS"] for a in load_apps(out, tmp_path)] == ["cold/h1,cold/h2,cold/h3", "cold/h4"]
    for flags, words in ((["--hotkeys-per-gpu", "1"], "do not fill"), (["--target", "grail"], "one hotkey per process"),
                         (["--redis-url", "redis://hub:6379/0"], "no fleet"), (["--target-rollouts", "7"], "groups of 16")):
        rc, _, err = emit(capsys, "--calibration", str(calibration), "--gpus", "3,1", "--gpu-kind", H100,
                          "--hotkeys", hotkeys, *(["--target", "dry-run"] if "--target" not in flags else []), *flags)
        assert rc == 2 and words in err, err


def test_a_fleet_of_several_hotkeys(calibration, tmp_path, capsys) -> None:
    """--fleet-hotkeys: every worker of the fleet mines all the hotkeys (GRAIL_HOTKEYS with GRAIL_REDIS_URL), worker
    ids across the fleet, the node's Redis app last; no target, no --wallet-cold/--wallet-hot needed."""
    rc, out, err = emit(capsys, "--calibration", str(calibration), "--target", "dry-run", "--gpus", "3,1",
                        "--gpu-kind", H100, "--fleet-hotkeys", "cold/h1, cold/h2", "--cwd", str(tmp_path))
    assert rc == 0, err
    apps = load_apps(out, tmp_path)
    assert [a["name"] for a in apps] == ["grail-dry-run-0", "grail-dry-run-1", "grail-dry-run-redis"]
    for i, app in enumerate(apps[:2]):
        env = app["env"]
        assert env["GRAIL_HOTKEYS"] == "cold/h1,cold/h2" and "BT_WALLET_HOT" not in env
        assert (env["GRAIL_WORKER_ID"], env["GRAIL_TOTAL_WORKERS"]) == (str(i), "2")
        assert env["GRAIL_REDIS_URL"] == "redis://127.0.0.1:6379/0" and "--target-rollouts" not in app["args"]
    for flags, words in ((["--target", "grail"], "one hotkey per process"), (["--hotkeys", "cold/h3"], "one of the two"),
                         (["--target-rollouts", "cap"], "go with --hotkeys"), (["--fleet-hotkeys", "cold"], "COLDKEY")):
        rc, _, err = emit(capsys, "--calibration", str(calibration), "--gpus", "3,1", "--gpu-kind", H100,
                          *(["--target", "dry-run"] if "--target" not in flags else []),
                          *(["--fleet-hotkeys", "cold/h1"] if "--fleet-hotkeys" not in flags else []), *flags)
        assert rc == 2 and words in err, err


HOSTILE = ["it's \"quoted\"", "back\\slash `${process.exit(3)}`", "line\nbreak\u2028sep", "</script><!-- */ //",
           "ünïcödé ✓ 鍵", "'); require('child_process').execSync('touch PWNED'); ('"]


@pytest.mark.parametrize("value", HOSTILE)
def test_values_are_escaped_for_javascript(calibration, tmp_path, capsys, value) -> None:
    cwd = tmp_path / value.replace("\n", "_").replace("/", "_")
    rc, out, err = emit(capsys, "--calibration", str(calibration), "--gpus", "0", "--gpu-kind", H100,
                        "--wallet-cold", value, "--wallet-hot", value, "--cwd", str(cwd), "--env", f"EXTRA={value}")
    assert rc == 0, err
    (app,) = load_apps(out, tmp_path)
    assert app["env"]["BT_WALLET_COLD"] == value and app["env"]["EXTRA"] == value and app["cwd"] == str(cwd)
    assert not list(tmp_path.rglob("PWNED"))


def test_gpu_kind_in_file_with_odd_characters(tmp_path, capsys) -> None:
    kind = "Weird 'GPU' \"X\" */ </script>"
    path = tmp_path / "calibration.yaml"
    save_entry(path, entry(kind, "hf", 4))
    rc, out, err = emit(capsys, "--calibration", str(path), "--gpus", "0", "--gpu-kind", kind, *WALLET)
    assert rc == 0, err
    assert load_apps(out, tmp_path)[0]["env"]["GRAIL_GENERATION_BATCH_SIZE"] == "4"


def _corrupt(path: Path, text: str) -> None:
    path.write_text(text)


def _set_batch(path: Path, value: object) -> None:
    data = yaml.safe_load(path.read_text())
    data["calibrations"][H100]["hf"]["chosen"]["batch_size"] = value
    path.write_text(yaml.safe_dump(data))


BAD = [
    (["--calibration", "missing.yaml"], None, "does not exist"),
    ([], lambda p: _corrupt(p, "kind: [unclosed"), "not valid YAML"),
    ([], lambda p: _corrupt(p, "just: text\n"), "not a grail-pipeline calibration file"),
    ([], lambda p: _corrupt(p, "\x00\xff"), "calibration"),
    ([], lambda p: _set_batch(p, "sixteen"), "chosen.batch_size must be a whole number"),
    ([], lambda p: _set_batch(p, 0), "chosen.batch_size must be a whole number"),
    ([], lambda p: _set_batch(p, 4.5), "chosen.batch_size must be a whole number"),
    (["--gpu-kind", "NVIDIA RTX 4090"], None, "'NVIDIA RTX 4090' is not in"),
    (["--gpus", ""], None, "--gpus is empty"),
    (["--gpus", "0,1,0"], None, "GPU 0 more than once"),
    (["--gpus", "0,x"], None, "whole numbers"),
    (["--gpus", "0,-1"], None, "whole numbers"),
    (["--gpu-kind", f"{H100},{H100},{H100}"], None, "3 names for 2 GPUs"),
    (["--node-index", "x"], None, "is not a whole number"),
    (["--nodes", "0"], None, "must be at least 1"),
    (["--nodes", "two"], None, "not a whole number"),
    (["--node-index", "2", "--nodes", "2"], None, "not in 0..1"),
    (["--gpus-per-node", "8"], None, "every node must run"),
    (["--wallet-hot", ""], None, "needs a wallet"),
    (["--env", "NOVALUE"], None, "KEY=VALUE"),
    (["--env", "1BAD=x"], None, "KEY=VALUE"),
    (["--env", "GRAIL_REDIS_URL=redis://h"], None, "use the flag"),
    (["--redis-url", "http://hub:6379"], None, "not a Redis URL"),
    (["--nodes", "2"], None, "give every node the same --redis-url"),
    (["--redis-url", "unix:///run/redis.sock"], None, "--no-redis-app"),
    (["--redis-url", "redis://hub:6379/0", "--redis-server", "/no/such/redis-server"], None, "--redis-server"),
    (["--max-memory-restart", "lots"], None, "size like 80G"),
    (["--drain-timeout", "soon"], None, "not a number"),
    (["--name-prefix", "a b/c"], None, "--name-prefix"),
    (["--out-dir", "x"], None, "for --target dry-run"),
    (["--target", "prod"], None, "invalid choice"),
]


@pytest.mark.parametrize(("flags", "damage", "message"), BAD, ids=[b[2] + "|" + " ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_exit_2(calibration, capsys, monkeypatch, flags, damage, message) -> None:
    monkeypatch.chdir(calibration.parent)
    if damage is not None:
        damage(calibration)
    base = ["--calibration", str(calibration), "--gpus", "0,1", "--gpu-kind", H100, *WALLET]
    rc, out, err = emit(capsys, *base, *flags)
    assert rc == 2 and out == ""
    assert err.startswith("grail-pipeline emit-pm2: error: ") and err.count("\n") == 1, err
    assert message in err


def test_grail_needs_an_hf_calibration(tmp_path, capsys) -> None:
    path = tmp_path / "calibration.yaml"
    save_entry(path, entry(H100, "fast", 256))
    rc, _, err = emit(capsys, "--calibration", str(path), "--gpus", "0", "--gpu-kind", H100, *WALLET)
    assert rc == 2 and "no 'hf' calibration" in err and "--engine hf" in err


def test_gpu_detection_off_the_gpu(calibration, capsys, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    rc, _, err = emit(capsys, "--calibration", str(calibration), *WALLET)
    assert rc == 2 and "no GPU detected here" in err  # this test machine has none
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    rc, _, err = emit(capsys, "--calibration", str(calibration), "--gpus", "0", *WALLET)
    assert rc == 2 and "CUDA_VISIBLE_DEVICES is set" in err


def test_deploy_example_is_what_emit_pm2_renders(capsys, monkeypatch, tmp_path) -> None:
    """deploy/ecosystem.example.config.js must not drift from the template; its header holds the command."""
    example = (REPO / "deploy" / "ecosystem.example.config.js").read_text()
    command = json.loads(example.splitlines()[1].removeprefix("//").strip())
    monkeypatch.chdir(REPO / "deploy")
    rc, out, err = emit(capsys, *shlex.split(command)[2:])
    assert rc == 0, err
    assert out.splitlines()[2:] == example.splitlines()[2:]  # all but the time and the command line
    assert len(load_apps(example, tmp_path)) == 4


def test_every_subpackage_is_packaged() -> None:
    """pyproject finds the packages (no list kept by hand): every folder of modules is a regular package it finds,
    and the top-level template folder is one of them through the grail_pipeline/templates link."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"]["include"] == ["grail_pipeline", "grail_pipeline.*"]
    folders = {p.parent for p in (REPO / "grail_pipeline").rglob("*.py") if "__pycache__" not in p.parts}
    assert all((folder / "__init__.py").is_file() for folder in folders), "a folder without __init__.py is not found"
    link = REPO / "grail_pipeline" / "templates"
    assert link.is_symlink() and link.resolve() == (REPO / "templates").resolve()
    assert (REPO / "templates" / "ecosystem.config.js.j2").is_file()


@pytest.mark.slow
def test_installed_package_renders_the_template(calibration, tmp_path) -> None:
    """`pip install .` (no deps, using this environment's packages) ships the template as package data."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "node_modules", "tests", "bench", "*.egg-info",
                                                                "build", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages, appended after the venv's own (a .pth line adds a path; it does not run
    # the .pth files there, so the editable checkout's import hook stays out)
    Path(site, "outer.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "--no-deps",
                    "--no-build-isolation", "--no-index", "-q", str(source)], check=True, timeout=300,
                   capture_output=True)
    shutil.rmtree(source)
    run = subprocess.run([venv / "bin/python", "-m", "grail_pipeline", "emit-pm2", "--calibration", str(calibration),
                          "--gpus", "0", "--gpu-kind", H100, *WALLET],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    where = subprocess.run([venv / "bin/python", "-c", "import grail_pipeline.templates as t; print(t.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(site)
    assert load_apps(run.stdout, tmp_path)[0]["env"]["GRAIL_GENERATION_BATCH_SIZE"] == "16"


# --- the dry-run fleet under real PM2 -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pm2_bin() -> Path:
    """PM2 from tests/pm2/package-lock.json, installed with `npm ci` on first use."""
    binary = PM2_DIR / "node_modules" / ".bin" / "pm2"
    if not binary.exists():
        need("node")
        subprocess.run([need("npm"), "ci", "--no-audit", "--no-fund"], cwd=PM2_DIR, check=True, capture_output=True,
                       timeout=600)
    return binary


def _logs(logs: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))


@pytest.mark.slow
def test_dry_run_fleet_under_pm2(tmp_path, capsys, pm2_bin) -> None:
    """Two workers of one hotkey and the Redis app, as emit-pm2 renders them, under real PM2: one file per
    window (F's rules: groups 0..N-1, 16 each), and `pm2 stop` drains the workers before Redis stops."""
    hotkey = write_wallet(tmp_path / "wallets", "fleet-cold", "fleet-hot")
    calibration = tmp_path / "calibration.yaml"
    save_entry(calibration, entry("cpu", "fast", 16, model="dummy:tiny", max_new_tokens=24, length_profile="fixed:20"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rc, out, err = emit(capsys, "--calibration", str(calibration), "--target", "dry-run", "--gpus", "0,1",
                        "--gpu-kind", "cpu", "--wallet-cold", "fleet-cold", "--wallet-hot", "fleet-hot",
                        "--wallet-path", str(tmp_path / "wallets"), "--cwd", str(tmp_path), "--safety-blocks", "1",
                        "--block-time", "0.5", "--drain-timeout", "30", "--env", "OMP_NUM_THREADS=1",
                        "--redis-url", f"redis://127.0.0.1:{port}/0")
    assert rc == 0, err
    config = tmp_path / "ecosystem.config.js"
    config.write_text(out)
    logs, out_dir = tmp_path / "logs", tmp_path / "dry-run"
    logs.mkdir()
    env = {**os.environ, "PM2_HOME": str(tmp_path / "pm2-home")}
    for key in ("BT_WALLET_COLD", "BT_WALLET_HOT", "BT_WALLET_PATH", "CUDA_VISIBLE_DEVICES", "GRAIL_REDIS_URL"):
        env.pop(key, None)

    def pm2(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(pm2_bin), *args], env=env, capture_output=True, text=True, timeout=timeout)

    def windows() -> list[Path]:
        return sorted(out_dir.glob(f"{hotkey}-window-*.parquet")) if out_dir.exists() else []

    names = ["grail-dry-run-0", "grail-dry-run-1", "grail-dry-run-redis"]
    try:
        started = pm2("start", str(config))
        assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 150
        while len([p for p in windows() if read_window_file(p)[0]]) < 1:
            procs = json.loads(pm2("jlist").stdout)
            assert all(p["pm2_env"]["status"] == "online" and p["pm2_env"]["restart_time"] == 0 for p in procs), \
                _logs(logs)
            assert time.monotonic() < deadline, "no window file with groups from the fleet:\n" + _logs(logs)
            time.sleep(1)
        stopped = pm2("stop", str(config), timeout=90)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        procs = json.loads(pm2("jlist").stdout)
        assert sorted(p["name"] for p in procs) == names
        assert all(p["pm2_env"]["status"] == "stopped" for p in procs), _logs(logs)
    finally:
        pm2("kill")
    for worker in (0, 1):  # a worker's lines fill its out log; its err log holds only warnings and errors
        out_log = (logs / f"grail-dry-run-{worker}.out.log").read_text()
        err_log = (logs / f"grail-dry-run-{worker}.err.log").read_text()
        assert "INFO mining (dry run" in out_log and " INFO " not in err_log, _logs(logs)
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    assert not list(out_dir.glob("*worker*.parquet"))  # one file per window, not one per worker
    assert not list((out_dir / "spill").glob("*/*.group")), "signed groups left in the spill"
    written = 0
    for path in windows():
        records, meta = read_window_file(path)
        groups = [r["rollout_group"] for r in records]
        assert groups == [g for g in range(int(meta["groups"])) for _ in range(16)], path  # 0..N-1, whole
        assert all(r["hotkey"] == hotkey for r in records) and meta["fleet_writer"]
    for worker in (0, 1):
        status = json.loads((out_dir / f"status-worker-{worker}.json").read_text())
        assert status["worker_id"] == worker and status["total_workers"] == 2
        assert status["state"] == "stopped" and status["fleet"]["worker"], status
        written += status["windows_written"]
    assert written >= len(windows()) >= 1  # every file was written by one of the workers (the leader, or the last out)
