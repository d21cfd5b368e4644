"""The code base stays `ruff check` clean (configuration in pyproject.toml)."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    if not pathlib.Path(ruff).exists():
        pytest.fail("ruff is not installed: install the dev extras (pip install -e '.[dev]').")
    folders = ("moe_jax", "tests", "configs", "experiments", "notebooks", "tools")
    targets = [p for p in folders if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# The layers of moe_jax, bottom first: a module imports only from its own layer or those below (the
# README's code map reads in this order). A row names a flat module under moe_jax/ or a whole folder
# ("pkg.*"); every folder's config dataclasses sit in the config row, below the experiment schema
# that gathers them. The config sits above the tables it names entries of (`routing.ROUTERS`, the
# grouped matmuls of `kernels`). Package __init__ files (the public faces) are exempt. Imports under
# `if TYPE_CHECKING:` are for annotations only and are left out.
LAYERS = (
    ("utils.*",),
    ("losses",),
    ("routing",),
    ("kernels.*",),
    ("config", "models.config", "data.config", "train.config"),
    ("experts",),
    ("dispatch",),
    ("moe",),
    ("layers",),
    ("models.*",),
    ("parallel.*",),
    ("data.*",),
    ("schema",),
    ("analysis.*",),
    ("train.*",),
    ("interop.*",),
    ("main", "sample", "convert", "dryrun", "demo"),
)


def _layer_of(module: str) -> int:
    exact = [i for i, names in enumerate(LAYERS) if module in names]
    if exact:
        return exact[0]
    package = [i for i, names in enumerate(LAYERS)
               if any(n.endswith(".*") and module.startswith(n[:-1]) for n in names)]
    assert package, f"moe_jax.{module} is in no layer of tests/test_lint.py: add it to LAYERS"
    return package[0]


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` outside `if TYPE_CHECKING:` blocks."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _imports(path: pathlib.Path, package: str = "moe_jax") -> set[str]:
    """The modules of `package` that `path` imports (anywhere in it: lazy imports count), as
    dotted names below the package; a package's face is its dotted name."""
    root = ROOT / package
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == package or node.module.startswith(package + ".")):
            base = node.module.removeprefix(package).lstrip(".")
            for alias in node.names:  # `from moe_jax import routing` imports a module
                candidate = f"{base}.{alias.name}" if base else alias.name
                is_module = (root / (candidate.replace(".", "/") + ".py")).exists() \
                    or (root / candidate.replace(".", "/")).is_dir()
                found.add(candidate if is_module else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix(package + ".") for a in node.names
                      if a.name.startswith(package + ".")}
    return {m for m in found if m}


def _modules(package: str) -> dict[str, pathlib.Path]:
    """Dotted name below `package` (a package's face: its own dotted name) -> file."""
    root = ROOT / package
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            .removesuffix("__init__"): p for p in sorted(root.rglob("*.py"))}


def test_imports_point_down_the_layers():
    upward = []
    for module, path in _modules("moe_jax").items():
        if path.name == "__init__.py":
            continue
        for imported in _imports(path):
            if (ROOT / "moe_jax" / imported.replace(".", "/")).is_dir():
                imported += ".__init__"  # a package's face: `from moe_jax.data import DataConfig`
            if _layer_of(imported) > _layer_of(module):
                upward.append(f"moe_jax.{module} imports moe_jax.{imported}")
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ["moe_jax", "experiments"])
def test_no_import_cycles(package):
    """No module reaches itself through imports (lazy ones included) within the package. (A
    module's own name is no cycle: run as a script, it imports its importable copy.)"""
    graph = {module: _imports(path, package) - {module}
             for module, path in _modules(package).items()}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module):], module]))
            return
        if module in done or module not in graph:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not cycles, f"import cycles in {package}/:\n" + "\n".join(sorted(set(cycles)))
