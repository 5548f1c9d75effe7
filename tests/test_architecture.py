"""The house's rules, checked on the source: which package may import which, the protocol's
standard-library-only promise, no sys.path edits, and an installed project.

The table below is docs/architecture.md's; a new import that breaks it fails here with the file
and line, so the direction of the graph never erodes one convenient import at a time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]

# The product: what runs in production. Tooling (benchmarks, load test, soak, corpus, the
# launcher, the embedded model's training, the manifests' validator, tests) may import it.
PRODUCT = ("morph_protocol", "grpc_api", "diffmorpher", "handler", "guard", "client", "web", "checkpoints",
           "export")
TOOLING = ("launcher", "loadtest", "reliability", "benchmarks", "embedded_model", "deploy", "tests")

# package -> the project packages it may import (the arrows of docs/architecture.md).
ALLOWED: dict[str, set[str]] = {
    "morph_protocol": set(),
    "grpc_api": set(),
    "diffmorpher": {"morph_protocol"},
    "handler": {"diffmorpher", "morph_protocol"},
    "guard": {"morph_protocol", "grpc_api"},
    "client": {"morph_protocol", "grpc_api"},
    "web": {"client", "morph_protocol", "grpc_api", "diffmorpher"},
    "checkpoints": {"diffmorpher"},
    "export": {"checkpoints", "diffmorpher", "handler", "morph_protocol"},
    "launcher": {"morph_protocol", "grpc_api", "client"},
    "loadtest": {"client", "morph_protocol", "grpc_api", "launcher"},
    "reliability": {"client", "morph_protocol", "grpc_api", "launcher"},
    "benchmarks": {"checkpoints", "diffmorpher", "morph_protocol", "embedded_model", "export", "client", "grpc_api",
                   "launcher"},
    "embedded_model": {"diffmorpher", "morph_protocol", "export"},
    "deploy": set(),
}
# Narrower still: the web page reads the option names and bounds from the core's torch-free
# config module (never the pipeline), so the page stays a torch-free client.
ONLY_MODULES: dict[tuple[str, str], set[str]] = {("web", "diffmorpher"): {"diffmorpher.config"}}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # the absolute module name imported

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file.relative_to(REPO_ROOT)}:{self.line} imports {self.module}"


def tracked_python_files(package: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", f"{package}/*.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [REPO_ROOT / name for name in listed if "/_generated/" not in name]


def imports_of(path: Path) -> list[Import]:
    """Every absolute import in a file, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(Import(path, node.lineno, node.module))
    return found


def package_imports(package: str) -> list[Import]:
    return [found for path in tracked_python_files(package) for found in imports_of(path)]


def import_graph() -> dict[str, set[str]]:
    """package -> the other project packages it imports."""
    project = set(PACKAGES) | {"tests"}
    return {
        package: {found.top for found in package_imports(package) if found.top in project and found.top != package}
        for package in [*PACKAGES, "tests"]
    }


def test_every_package_has_a_rule_and_a_side() -> None:
    assert set(ALLOWED) == set(PACKAGES)
    assert set(PRODUCT) | set(TOOLING) == set(PACKAGES) | {"tests"}
    assert not set(PRODUCT) & set(TOOLING)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    project = set(PACKAGES) | {"tests"}
    wrong = []
    for found in package_imports(package):
        if found.top not in project or found.top == package:
            continue
        only = ONLY_MODULES.get((package, found.top))
        if found.top not in ALLOWED[package] or (only is not None and found.module not in only):
            wrong.append(str(found))
    assert wrong == [], f"{package} may import only {sorted(ALLOWED[package])}"


def test_the_product_never_imports_tooling() -> None:
    graph = import_graph()
    assert {package: graph[package] & set(TOOLING) for package in PRODUCT} == {package: set() for package in PRODUCT}


def test_the_protocol_imports_only_the_standard_library() -> None:
    """It travels inside the model archive and into every process, torch-free or not."""
    outside = [str(found) for found in package_imports("morph_protocol")
               if found.top not in sys.stdlib_module_names and found.top != "morph_protocol"]
    assert outside == []


def test_no_file_outside_tests_edits_sys_path() -> None:
    edits = []
    for package in PACKAGES:
        for path in tracked_python_files(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                        and node.value.id == "sys"):
                    edits.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert edits == []


def test_pytest_puts_nothing_on_the_path() -> None:
    assert "pythonpath" not in PYPROJECT["tool"]["pytest"]["ini_options"]


def test_the_installed_project_imports_from_any_directory(tmp_path: Path) -> None:
    """`make setup` installs the project: from another directory, with no PYTHONPATH, every
    package imports (the environment is cleared, so nothing but the install can help)."""
    code = "import importlib, sys; [importlib.import_module(name) for name in sys.argv[1:]]; print('ok')"
    product = [name for name in PRODUCT if name != "web"] + ["web.limits"]
    result = subprocess.run([sys.executable, "-c", code, *product], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"}, timeout=300)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr[-2000:]
