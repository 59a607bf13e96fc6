"""Each package keeps to its room: the import directions, checked on the source.

- trainer/ and evalsuite/ use only the gateway's public surface for them: the client, the
  command's console helpers, the settings-file loader and the shared contract words; never a
  private name.
- gateway/ imports trainer/ and evalsuite/ only lazily (inside a function), and only from the
  command's composition root and the demo that composes all three.
- vLLM is imported only by the engine modules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[2]
GATEWAY_SURFACE = {"gateway.client", "gateway.config_files", "gateway.console", "gateway.contract"}
COMPOSITION_ROOTS = {"gateway/cli.py", "gateway/demo.py"}
ENGINE_MODULES = {"gateway/engine.py", "gateway/engine_patches.py", "gateway/engine_worker.py"}


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    module: str
    names: tuple[str, ...]
    top_level: bool  # at module level (not inside a function)


def imports(package: str) -> list[Import]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        top |= {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body}
        for node in ast.walk(tree):
            file = str(path.relative_to(ROOT))
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = tuple(alias.name for alias in node.names)
                found.append(Import(file, node.lineno, node.module, names, id(node) in top))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    found.append(Import(file, node.lineno, alias.name, (), id(node) in top))
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_trainer_and_evalsuite_use_only_the_gateways_public_surface():
    wrong = [
        f"{i.file}:{i.line} imports {i.module} {i.names}"
        for package in ("trainer", "evalsuite")
        for i in imports(package)
        if _in(i.module, "gateway")
        and (i.module not in GATEWAY_SURFACE or any(n.startswith("_") for n in i.names))
    ]
    assert wrong == []


def test_the_gateway_imports_trainer_and_evalsuite_only_lazily_from_its_composition_root():
    wrong = [
        f"{i.file}:{i.line} imports {i.module}"
        for i in imports("gateway")
        if (_in(i.module, "trainer") or _in(i.module, "evalsuite"))
        and (i.top_level or i.file not in COMPOSITION_ROOTS)
    ]
    assert wrong == []


def test_vllm_is_imported_only_by_the_engine_modules():
    wrong = [
        f"{i.file}:{i.line}"
        for package in ("gateway", "trainer", "evalsuite")
        for i in imports(package)
        if _in(i.module, "vllm") and i.file not in ENGINE_MODULES
    ]
    assert wrong == []


def test_the_checks_see_the_imports_they_judge():
    """The rules above would pass vacuously if the scan found nothing."""
    trainer = imports("trainer")
    assert any(i.module == "gateway.contract" for i in trainer)
    assert any(_in(i.module, "trainer") and not i.top_level for i in imports("gateway"))
    assert any(_in(i.module, "vllm") for i in imports("gateway"))


def test_tests_share_helpers_only_through_tests_support():
    """No test module imports another test module or conftest; shared code is in support/."""
    wrong = [
        f"{i.file}:{i.line} imports {i.module}"
        for i in imports("tests")
        if _in(i.module, "tests") and not _in(i.module, "tests.support")
    ]
    assert wrong == []
