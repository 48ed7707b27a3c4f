"""The module map of ARCHITECTURE.md as data, held against every import in gateway/.

Dependencies point down the map: a part may import only the parts listed for it (and
itself). The test of the test plants an upward import and expects it to be caught.
Also the shape rules of the house: no module over 400 lines, no function over 60.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"

# part -> the parts it may import ("gateway" itself holds only __version__).
LEAVES = {"gateway", "gateway.errors", "gateway.oci", "gateway.net", "gateway.presets",
          "gateway.wire", "gateway.singleflight", "gateway.tasks", "gateway.logs",
          "gateway.metrics", "gateway.buckets", "gateway.eventloop"}
MAP: dict[str, set[str]] = {
    "gateway.__main__": {"gateway.cli"},
    "gateway.cli": {"*"},
    "gateway.server": {"gateway.admin", "gateway.api", "gateway.pipeline", "gateway.cache",
                       "gateway.upstream", "gateway.upstream_pool", "gateway.reload",
                       "gateway.routing", "gateway.config", "gateway.tls",
                       "gateway.metrics", "gateway.logs", "gateway.looplag", "gateway.listen",
                       "gateway.proxy", "gateway.eventloop", "gateway.state", "gateway"},
    # Forward-proxy mode: CONNECT, the host allow-list, leaves from the gateway's CA.
    "gateway.proxy": {"gateway.pipeline", "gateway.routing", "gateway.state", "gateway.config",
                      "gateway.errors", "gateway.metrics", "gateway.net",
                      "gateway.singleflight", "gateway.presets"},
    # serve --workers N: the supervisor that forks, restarts and signals the workers.
    "gateway.workers": {"gateway.server", "gateway.config", "gateway.errors", "gateway.logs",
                        "gateway.metrics"},
    # Live config: the running Config, its reload (SIGHUP, file change), `check`.
    "gateway.reload": {"gateway.config", "gateway.errors", "gateway.metrics",
                       "gateway.tasks", "gateway.upstream_pool"},
    "gateway.listen": {"gateway.config", "gateway.metrics", "gateway.net"},
    # The status page reads the cache's flights; upstream health comes through metrics.
    "gateway.admin": {"gateway.cache", "gateway.config", "gateway.metrics", "gateway.errors",
                      "gateway.wire", "gateway.state", "gateway.singleflight", "gateway"},
    "gateway.pipeline": {"gateway.routing", "gateway.state", "gateway.config",
                         "gateway.errors", "gateway.metrics", "gateway.net",
                         "gateway.reference", "gateway.singleflight", "gateway.buckets"},
    "gateway.api": {"gateway.cache", "gateway.state", "gateway.upstream",
                    "gateway.upstream_pool", "gateway.oci",
                    "gateway.errors", "gateway.reference"},
    "gateway.state": {"gateway.config", "gateway.reference", "gateway.routing"},
    "gateway.cache": {"gateway.upstream", "gateway.upstream_pool", "gateway.oci",
                      "gateway.reference",
                      "gateway.errors", "gateway.metrics", "gateway.config",
                      "gateway.singleflight", "gateway.tasks"},
    "gateway.upstream": {"gateway.oci", "gateway.reference", "gateway.errors",
                         "gateway.config", "gateway.metrics", "gateway.singleflight"},
    # The started upstream clients across reloads (kept, started, closed after draining).
    "gateway.upstream_pool": {"gateway.upstream", "gateway.config", "gateway.singleflight"},
    "gateway.routing": {"gateway.config", "gateway.reference", "gateway.errors"},
    "gateway.tls": {"gateway.errors", "gateway.net", "gateway.tasks"},
    "gateway.config": {"gateway.reference", "gateway.errors", "gateway.presets",
                       "gateway.net"},
    "gateway.reference": {"gateway.errors"},
    "gateway.looplag": {"gateway.metrics", "gateway.tasks"},
    "gateway.maintenance": {"gateway.cache", "gateway.config", "gateway.reference",
                            "gateway.errors"},
    # `init --domain`: a commented routes.yaml and the next steps, from the presets.
    "gateway.init": {"gateway.presets"},
    "gateway.client": {"gateway.wire", "gateway.presets", "gateway.reference",
                       "gateway.errors", "gateway.oci", "gateway"},
    **{leaf: set() for leaf in LEAVES},
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """The map entry a module belongs to: its longest listed prefix."""
    name = module
    while name not in MAP or (name == GATEWAY.name and module != name):
        if "." not in name:  # the package itself is a part only for what it holds
            raise AssertionError(f"{module} is in no part of the module map")
        name = name.rsplit(".", 1)[0]
    return name


def imports(root: Path, path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of the package in one file."""
    here = module_name(root, path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import api` imports the module gateway.api, not just the package;
            # `from . import __version__` imports a name of the package.
            found += [(node.lineno, f"{target}.{alias.name}"
                       if f"{target}.{alias.name}" in modules else target)
                      for alias in node.names]
    return [(line, name) for line, name in found
            if name == root.name or name.startswith(root.name + ".")]


def violations(root: Path) -> list[str]:
    problems = []
    files = sorted(root.rglob("*.py"))
    modules = {module_name(root, path) for path in files}
    for path in files:
        importer = part_of(module_name(root, path))
        allowed = MAP[importer]
        for line, target in imports(root, path, modules):
            # `from .x import name`: the module is the longest prefix the map knows.
            imported = part_of(target)
            if imported == importer or "*" in allowed or imported in allowed:
                continue
            problems.append(f"{path.relative_to(root.parent)}:{line}: {importer} imports "
                            f"{imported}, which is not below it in the module map")
    return problems


def test_every_import_follows_the_module_map() -> None:
    assert violations(GATEWAY) == []


def test_the_layering_test_catches_a_planted_upward_import(tmp_path: Path) -> None:
    copy = tmp_path / "gateway"
    shutil.copytree(GATEWAY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    oci = copy / "oci.py"
    oci.write_text(oci.read_text() + "\nfrom .cache import Cache  # planted\n")
    routing = copy / "routing.py"
    routing.write_text(routing.read_text() + "\nfrom gateway import api  # planted\n")
    found = violations(copy)
    assert len(found) == 2, found
    assert any("gateway.oci imports gateway.cache" in v for v in found)
    assert any("gateway.routing imports gateway.api" in v for v in found)


def test_a_module_outside_the_map_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "gateway"
    shutil.copytree(GATEWAY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "stray.py").write_text("from . import errors\n")
    with pytest.raises(AssertionError, match=r"gateway\.stray is in no part"):
        violations(copy)


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_modules_and_functions_stay_small() -> None:
    big = [f"{p.relative_to(GATEWAY)} ({n} lines)" for p in sorted(GATEWAY.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long = [f for p in sorted(GATEWAY.rglob("*.py")) for f in _long_functions(p)]
    assert (big, long) == ([], [])
