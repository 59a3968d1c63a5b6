"""The architecture's import boundaries, checked on the source (no imports run).

    .venv/bin/python -m pytest tests/unit/test_layout.py -q

- suzak/ (the shared core) imports none of trainer/, vllm_server/, evaluator/;
- trainer/ and evaluator/ reach the server only through vllm_server/client.py, and never import vllm;
- vllm_server/client.py imports no vllm, and only the engine module (and the NCCL transport) import vllm;
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


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file, top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
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
    assert not {n for n in names if _top(n) == "vllm"}, f"{path.relative_to(ROOT)} imports vllm"
    server_side = {n for n in names if _top(n) == "vllm_server" and n != "vllm_server.client"}
    assert not server_side, f"{path.relative_to(ROOT)} imports {sorted(server_side)}; use vllm_server.client"


def test_only_the_engine_and_nccl_transport_import_vllm():
    users = {p.name for p in _modules("vllm_server") if any(_top(n) == "vllm" for n in _imports(p))}
    assert users <= {"engine.py", "transport.py"}, users
    assert "client.py" not in users


def test_client_needs_only_httpx_and_wire_types_at_import():
    tree = ast.parse((ROOT / "vllm_server" / "client.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(_top(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top_level.add(_top(node.module))
    assert not top_level & {"torch", "vllm", "transformers"}, top_level


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
