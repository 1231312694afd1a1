"""The import layers that keep the layout honest, read from the source with `ast`.

- core/ is pure: it imports no mitmproxy and nothing of mcp_bastion outside core;
- glue/ (shared mitmproxy glue) imports no addon and no CLI;
- an addon does not import another addon;
- the command-line tools import no addon;
- nothing in the runtime package imports the demo, the dev issuer or the benchmark (bastion_dev).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "addons" / "mcp_bastion"


def imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ".".join(path.relative_to(ROOT / "addons").with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py")) if sub else sorted(PKG.rglob("*.py"))


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(PKG)) for p in paths]


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


CORE = files("core")
GLUE = files("glue")
ADDONS = files("addons")
CLI = files("cli")


@pytest.mark.parametrize("path", CORE, ids=ids(CORE))
def test_core_is_pure(path):
    bad = [m for m in imports(path) if under(m, "mitmproxy")
           or (under(m, "mcp_bastion") and not under(m, "mcp_bastion.core"))]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", GLUE, ids=ids(GLUE))
def test_glue_imports_no_addon_and_no_cli(path):
    bad = [m for m in imports(path) if under(m, "mcp_bastion.addons") or under(m, "mcp_bastion.cli")]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", ADDONS, ids=ids(ADDONS))
def test_addons_do_not_import_each_other(path):
    own = "mcp_bastion.addons." + path.stem
    bad = [m for m in imports(path) if under(m, "mcp_bastion.addons") and m not in ("mcp_bastion.addons",)
           and not under(m, own)]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", CLI, ids=ids(CLI))
def test_command_line_tools_import_no_addon(path):
    bad = [m for m in imports(path) if under(m, "mcp_bastion.addons") or under(m, "mcp_bastion.bundle")]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", files(""), ids=ids(files("")))
def test_runtime_imports_no_dev_tools(path):
    bad = [m for m in imports(path) if under(m, "bastion_dev") or under(m, "tests")]
    assert bad == [], f"{path.name} imports {bad}"


def test_dev_tools_live_outside_the_runtime_package():
    assert not (PKG / "demo").exists() and not (PKG / "bench.py").exists()
    assert (ROOT / "scripts" / "bastion_dev" / "issuer.py").is_file()


def test_the_checker_sees_a_violation(tmp_path):
    """The layer checks can fail: a core module importing mitmproxy is caught."""
    bad = PKG / "core" / "_layer_probe.py"
    try:
        bad.write_text("from mitmproxy import http\nfrom ..addons import gate\n")
        found = imports(bad)
        assert "mitmproxy.http" in found and "mcp_bastion.addons.gate" in found
    finally:
        bad.unlink()
