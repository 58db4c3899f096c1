"""The layering of the package, read from the source (every import counted: module level,
function level and type-only), as docs/architecture.md draws it:

    geobench.api      the plugin API: imports nothing else of geobench
    toolkit           maths and files shared by the host and plugins: imports only the api and the toolkit
    host              everything else of geobench: never imports a plugin
    geobench.plugins  built-in plugins: the api, the toolkit and other built-in plugins only
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

import geobench
import geobench.plugins

TOOLKIT = {"geobench.checkpoints", "geobench.composite", "geobench.figures", "geobench.files", "geobench.formatting",
           "geobench.linalg",
           "geobench.objective", "geobench.schedule", "geobench.series", "geobench.shared_direction"}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def modules(package) -> dict[str, Path]:
    root = Path(package.__file__).parent
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join([package.__name__, *(p for p in parts if p != "__init__")])
        if not name.startswith("geobench.plugins.") or package is geobench.plugins or name == "geobench.plugins":
            found[name] = path
    return found


ALL = {**modules(geobench), **modules(geobench.plugins)}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The geobench modules `path` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("geobench"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                out.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("geobench"))
    return out


GRAPH = {name: imports(path, ALL) - {name} for name, path in ALL.items()}


def layer(module: str) -> str:
    if module == "geobench.api" or module.startswith("geobench.api."):
        return "api"
    if module in TOOLKIT:
        return "toolkit"
    if module == "geobench.plugins" or module.startswith("geobench.plugins."):
        return "plugins"
    return "host"


ALLOWED = {"api": {"api"}, "toolkit": {"api", "toolkit"}, "host": {"api", "toolkit", "host"},
           "plugins": {"api", "toolkit", "plugins"}}


def test_the_graph_is_read_from_the_installed_package():
    assert {"geobench.api", "geobench.analysis", "geobench.plugins.metrics.backbone"} <= set(GRAPH)
    assert "geobench.api.plugins" in GRAPH["geobench.api"] and "geobench.train" in GRAPH["geobench.runner"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_each_module_imports_only_its_layer_and_those_below(module):
    wrong = {m for m in GRAPH[module] if layer(m) not in ALLOWED[layer(module)]}
    assert not wrong, f"{module} ({layer(module)}) imports {sorted(wrong)}"


def test_no_import_cycle_even_counting_type_only_and_function_level_imports():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_public_api_is_declared_and_importable():
    import geobench.api as api

    assert sorted(api.__all__) == sorted(set(api.__all__))
    for name in api.__all__:
        assert getattr(api, name) is not None
    assert len(api.__all__) >= 30  # every descriptor, protocol and type a plugin needs


@pytest.mark.parametrize("package", ["geobench-lion", "geobench-update-norms"])
def test_the_example_packages_import_only_the_api_and_the_toolkit(package):
    sources = [p for p in (EXAMPLES / package).rglob("*.py") if "tests" not in p.parts and "build" not in p.parts]
    assert sources
    for path in sources:
        used = imports(path, ALL)
        assert used and all(layer(m) in ("api", "toolkit") for m in used), f"{path.name} imports {sorted(used)}"


def test_a_core_module_names_no_plugin():
    """No host module names a built-in plugin's module; the host finds plugins by entry point."""
    for name, path in ALL.items():
        if layer(name) == "host":
            assert "geobench.plugins" not in path.read_text(), name
    assert importlib.util.find_spec("geobench.plugins.ep.relaxation") is not None


ROOT = Path(__file__).resolve().parents[1]
DOC_LINK = re.compile(r"docs/([A-Za-z_-]+\.md)(?:#([a-z0-9-]+))?")


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_reference_to_the_docs_points_at_a_file_and_section_that_exist():
    """Code, suites and docs cite the science by section (docs/science.md#backbone); each cited
    file and heading is in the repository."""
    sources = [p for folder in ("harness", "plugins", "benchmarks", "examples", "docs", "tests")
               for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml") and "build" not in p.parts]
    cited = 0
    for path in [*sources, ROOT / "README.md"]:
        for name, anchor in DOC_LINK.findall(path.read_text()):
            target = ROOT / "docs" / name
            assert target.exists(), f"{path.name} cites docs/{name}, which does not exist"
            if anchor:
                anchors = {slug(line.lstrip("#")) for line in target.read_text().splitlines() if line.startswith("#")}
                assert anchor in anchors, f"{path.name} cites docs/{name}#{anchor}; its sections: {sorted(anchors)}"
            cited += 1
    assert cited > 20
    section_sign = "\u00a7"  # numbered citations of documents outside the repository ("... \u00a73")
    assert not [p.name for p in sources if section_sign in p.read_text()]
