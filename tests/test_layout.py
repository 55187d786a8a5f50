"""The package's layers, read from the code: data flows one way, commands stay thin, `--help` loads no torch.

Every `import` in every module counts (those inside functions and under TYPE_CHECKING too), so a lazy
import cannot hide a dependency that points the wrong way.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grail_pipeline"
# lowest first: a layer may import itself and the layers before it, never one after it
LAYERS = ("common", "protocol", "inference", "proving", "fleet", "mining", "tools", "cli")
# cli modules that are not commands: what the commands share, and the entry point that lists them
CLI_SHARED = {"grail_pipeline.cli", "grail_pipeline.cli.main", "grail_pipeline.cli.arguments",
              "grail_pipeline.cli.progress"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The grail_pipeline modules `path` imports (`from pkg import module` resolved to the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("grail_pipeline"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grail_pipeline"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer(graph) -> None:
    outside = {m for m in graph if layer(m) is None} - {"grail_pipeline", "grail_pipeline.__main__"}
    assert not outside, f"modules outside the layers {LAYERS}: {sorted(outside)}"


def test_layers_import_only_downwards(graph) -> None:
    wrong = [f"{m} ({layer(m)}) imports {i} ({layer(i)})" for m, deps in graph.items() for i in deps
             if layer(m) and layer(i) and LAYERS.index(layer(i)) > LAYERS.index(layer(m))]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_command_imports_another(graph) -> None:
    commands = {m for m in graph if layer(m) == "cli"} - CLI_SHARED
    assert commands >= {f"grail_pipeline.cli.{c}" for c in ("benchmark", "calibrate", "mine", "verify", "emit_pm2")}
    wrong = [f"{m} imports {i}" for m in commands for i in graph[m] if i in commands or i == "grail_pipeline.cli.main"]
    assert not wrong, wrong


def test_no_import_cycles(graph) -> None:
    """Depth-first search for a back edge over module imports."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if dep == module or dep not in graph:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)


HEAVY = ("torch", "transformers", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["emit-pm2", "--help"], ["mine", "--help"], ["benchmark", "--help"],
                                  ["calibrate", "--help"], ["verify", "--help"], ["report", "--help"]])
def test_help_imports_neither_torch_nor_transformers(argv) -> None:
    """Building the parser and printing help loads only light modules (a fresh interpreter, as a user runs it)."""
    script = ("import json, sys\nfrom grail_pipeline.cli.main import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit:\n    pass\n"
              f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: grail-pipeline" in run.stdout
    assert json.loads(run.stderr.strip().splitlines()[-1]) == []


def imports_package(path: Path, package: str) -> bool:
    """Whether `path` imports `package` (or a module of it) anywhere, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(name == package or name.startswith(package + ".") for name in names):
            return True
    return False


def test_mine_never_imports_the_plotting_library(graph) -> None:
    """matplotlib is for `calibrate` and `report`: nothing `mine` can reach imports it, however lazily (every
    import counts, those inside functions too), so the daemon's import path stays free of it."""
    reached, todo = set(), ["grail_pipeline.cli.mine"]
    while todo:
        module = todo.pop()
        if module not in reached and module in graph:
            reached.add(module)
            todo.extend(graph[module])
    assert "grail_pipeline.mining.metrics" in reached and "grail_pipeline.mining.daemon" in reached
    path_of = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    plotting = sorted(m for m in reached if imports_package(path_of[m], "matplotlib"))
    assert not plotting, f"mine reaches modules that import matplotlib: {plotting}"
    assert imports_package(path_of["grail_pipeline.tools.pictures"], "matplotlib")  # the check can see one


def test_console_script_runs() -> None:
    """The installed `grail-pipeline` entry point (pyproject's [project.scripts]) names a callable."""
    script = Path(sys.executable).with_name("grail-pipeline")
    if not script.exists():
        pytest.skip("grail-pipeline is not installed next to this interpreter")
    run = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("grail-pipeline ")


def test_every_flag_has_help_and_help_never_breaks_a_word(monkeypatch) -> None:
    """Each command's --help at 80 columns: every flag explained, and lines break at spaces only (argparse's
    default broke `--no-redis-\\napp` and `grail-\\npipeline`); --model lists every preset and F is defined."""
    import argparse

    from grail_pipeline.cli.main import build_parser
    from grail_pipeline.inference.model_ref import PRESETS

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "F = the GRAIL fork" in parser.format_help()
    for name, command in commands.items():
        text = command.format_help()
        assert not re.search(r"\w-\n", text), f"{name}: a line breaks inside a word:\n{text}"
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            for flag in action.option_strings:
                assert re.search(rf"(^|[\s\[,]){re.escape(flag)}([\s\],=]|$)", text, re.M), (name, flag)
        model = next((a for a in command._actions if "--model" in a.option_strings), None)
        if model is not None and name != "verify":
            assert all(f"dummy:{preset}" in model.help for preset in PRESETS), name
