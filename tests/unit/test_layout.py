"""The architecture's import boundaries, checked on the source (no imports run).

    .venv/bin/python -m pytest tests/unit/test_layout.py -q

- suzak/ (the shared core) imports none of trainer/, vllm_server/, evaluator/;
- trainer/ and evaluator/ reach the server only through vllm_server/client.py; the one vllm import on their side
  is the NCCL producer's, inside a function of trainer/weight_push.py (the learner's end of the weight push);
- vllm_server/ is the server and its client: only the engine imports vllm, and nothing there imports the learner;
- vllm_server/client.py is a pure httpx client: no torch, vllm or transformers at import, no other product part;
- no import circle among the product modules (lazy imports inside functions count too);
- every module opens with a docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("suzak", "trainer", "vllm_server", "evaluator")


def _modules(part: str) -> list[Path]:
    return sorted(p for p in (ROOT / part).rglob("*.py"))


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Every module name imported in the file, top level or (unless top_level_only) inside functions."""
    names = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from package import module` imports that module
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _modules("suzak"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_other_part(path):
    bad = {n for n in _imports(path) if _top(n) in ("trainer", "vllm_server", "evaluator", "vllm")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: the core must stand alone"


@pytest.mark.parametrize("path", _modules("trainer") + _modules("evaluator"), ids=lambda p: str(p.relative_to(ROOT)))
def test_learner_and_evaluator_reach_the_server_through_the_client(path):
    names = _imports(path)
    server_side = {n for n in names if _top(n) == "vllm_server" and n != "vllm_server"
                   and not (n + ".").startswith("vllm_server.client.")}
    assert not server_side, f"{path.relative_to(ROOT)} imports {sorted(server_side)}; use vllm_server.client"
    if path == WEIGHT_PUSH:
        assert not {n for n in _imports(path, top_level_only=True) if _top(n) == "vllm"}, "vllm at import"
    else:
        assert not {n for n in names if _top(n) == "vllm"}, f"{path.relative_to(ROOT)} imports vllm"


WEIGHT_PUSH = ROOT / "trainer" / "weight_push.py"


def test_the_server_side_imports_vllm_only_in_the_engine_and_never_the_learner():
    users = {p.name for p in _modules("vllm_server") if any(_top(n) == "vllm" for n in _imports(p))}
    assert users <= {"engine.py"}, users
    for path in _modules("vllm_server"):
        learner = {n for n in _imports(path) if _top(n) in ("trainer", "evaluator")}
        assert not learner, f"{path.relative_to(ROOT)} imports {sorted(learner)}: the server stands without the learner"


def test_client_is_a_pure_httpx_client():
    path = ROOT / "vllm_server" / "client.py"
    assert not {_top(n) for n in _imports(path, top_level_only=True)} & {"torch", "vllm", "transformers"}
    # Anywhere in the file: only the core (wire types, config, errors), never the server or the weight push.
    parts = {n for n in _imports(path) if _top(n) in PARTS and _top(n) != "suzak"}
    assert not parts, f"vllm_server/client.py imports {sorted(parts)}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def import_graph() -> dict[str, set[str]]:
    """Product module -> the product modules it imports (at the top or inside functions)."""
    modules = {_module_name(p): p for part in PARTS for p in _modules(part)}
    return {name: {n for n in _imports(path) if n in modules and n != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_among_the_product_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_check_finds_a_circle():
    graph = {"vllm_server.client": {"trainer.weight_push"}, "trainer.weight_push": {"vllm_server.client"},
             "suzak.wire": set()}
    assert find_cycle(graph) == ["trainer.weight_push", "vllm_server.client", "trainer.weight_push"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", [p for part in PARTS for p in _modules(part)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_opens_with_a_docstring(path):
    source = path.read_text()
    if not source.strip():
        return  # an empty __init__.py
    assert ast.get_docstring(ast.parse(source)), f"{path.relative_to(ROOT)} has no module docstring"


def test_cli_finds_each_job_installed_or_from_the_checkout(monkeypatch):
    import importlib.metadata

    from suzak import cli
    from suzak.errors import SuzakError
    from trainer.pipeline import run_pipeline

    assert cli._job("train") is run_pipeline  # installed: the package metadata
    # A checkout on PYTHONPATH with no metadata (the device) reads pyproject.toml's table instead.
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    assert cli._job("train") is run_pipeline
    from evaluator.run import main as eval_main

    assert cli._job("eval") is eval_main
    with pytest.raises(SuzakError, match="not installed"):
        cli._job("no-such-job")
