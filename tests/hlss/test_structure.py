"""Imports run one way: ``pipeline`` <- ``hlss_model`` <- ``flows`` <- ``hlss``, with no cycle between
modules, and tiling never pays for torch.

Every module of the four packages is parsed with :mod:`ast`; every import counts, the ones inside
functions (lazy imports) too, since they run as soon as the function does.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("pipeline", "hlss_model", "flows", "hlss")  # each may import only those before it


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages."""
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imported(name: str, path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in ``name`` that names one of the four packages, relative imports
    resolved; ``from X import y`` counts as importing ``X.y`` when that is a module, else ``X``. The
    modules of a package's lazy exports (its ``_WHERE`` table, :mod:`pipeline.lazy`) count too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in MODULES else base, node.lineno))
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_WHERE" for t in node.targets):
            for value in node.value.values:
                module = value.value
                out.append((f"{package}{module}" if module.startswith(".") else module, value.lineno))
    return [(m, line) for m, line in out if m.split(".")[0] in LAYERS]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _ in _imported(name, path):
            while target not in MODULES and "." in target:  # `import pipeline.store.x`: an attribute
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_parser_sees_lazy_relative_and_from_imports():
    """The checks below can fail: the import reader finds the kinds of import the packages use."""
    imported = dict(_imported("hlss.cli", MODULES["hlss.cli"]))
    assert {"hlss.commands", "hlss.exit", "pipeline.escape"} <= set(imported)
    lazy = {m for m, _ in _imported("hlss.commands.model", MODULES["hlss.commands.model"])}
    assert {"hlss_model.train", "pipeline.store", "hlss.argtypes"} <= lazy  # inside functions, relative
    exported = {m for m, _ in _imported("pipeline", MODULES["pipeline"])}
    assert {"pipeline.codecs", "pipeline.store", "pipeline.runner"} <= exported  # the lazy exports' modules
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each a group of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_upward_import():
    """pipeline imports none of the others; hlss_model only pipeline; flows not hlss; nothing imports hlss."""
    bad = []
    for name, path in MODULES.items():
        layer = LAYERS.index(name.split(".")[0])
        for target, line in _imported(name, path):
            if LAYERS.index(target.split(".")[0]) > layer:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _run_without_torch(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_importing_hlss_and_tiling_through_it_never_imports_torch(make_slide, tmp_path):
    slide = make_slide("a.svs", width=1024, height=768)
    _run_without_torch(f"""
        import sys
        import pipeline, pipeline.tiler, pipeline.store, pipeline.runner, hlss
        assert "torch" not in sys.modules, "importing pipeline or hlss imported torch"
        from hlss import TilingParams, tile_cohort
        report = tile_cohort({str(slide)!r}, {str(tmp_path / 's.zarr')!r}, TilingParams(target_mpp=2.0, tile_size=64))
        assert report.exit_code == 0 and report.n_tiles > 0, report.table()
        assert "torch" not in sys.modules, "tiling imported torch"
    """)


def test_the_command_line_parser_never_imports_torch():
    _run_without_torch("""
        import sys
        from hlss.cli import build_parser
        build_parser().parse_args(["extract", "s.zarr", "--encoder", "timm:resnet10t", "--device", "cpu"])
        assert "torch" not in sys.modules and "prefect" not in sys.modules, sorted(sys.modules)
    """)


def test_no_pipeline_module_imports_torch():
    names = sorted(m for m in MODULES if m.split(".")[0] == "pipeline")
    _run_without_torch(f"""
        import importlib, sys
        for name in {names!r}:
            importlib.import_module(name)
            assert "torch" not in sys.modules, name + " imports torch"
    """)


def test_the_curated_names_resolve_and_the_readme_uses_only_them():
    """Every package's ``__all__`` resolves (lazily), and each ``from hlss import ...`` of the README names one."""
    import re

    import flows
    import hlss
    import hlss_model
    import pipeline

    for package in (pipeline, hlss_model, flows, hlss):
        missing = [n for n in package.__all__ if not hasattr(package, n)]
        assert not missing, f"{package.__name__} does not resolve {missing}"
        assert set(package.__all__) <= set(dir(package))
    assert hlss.SlideStore is pipeline.SlideStore and hlss.knn_from_store is hlss_model.knn_from_store
    readme = (ROOT / "README.md").read_text()
    used = {n.strip() for line in re.findall(r"^from hlss import (.+?)(?:#|$)", readme, re.M) for n in line.split(",")}
    assert used and used <= set(hlss.__all__), used - set(hlss.__all__)
