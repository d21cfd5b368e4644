"""The code base stays `ruff check` clean (configuration in pyproject.toml)."""

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
    folders = ("moe_jax", "tests", "configs", "experiments", "notebooks")
    targets = [p for p in folders if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# The layers of moe_jax, bottom first: a module imports only from its own layer or those below
# (the README's code map reads in this order). Names are modules under moe_jax/, "pkg.*" is a
# whole package; package __init__ files (the public faces) are exempt.
LAYERS = (
    ("validation", "distributed", "storage"),
    ("config", "models.config", "data.config", "train.config"),
    ("losses",),
    ("routing",),
    ("cpu_ffi", "grouped_matmul_cpu", "grouped_matmul_kernels", "grouped_matmul"),
    ("experts",),
    ("dispatch",),
    ("moe",),
    ("layers",),
    ("models.*",),
    ("quantize",),
    ("ragged_exchange", "sharding", "topology", "compiled"),
    ("data.*",),
    ("objective",),
    ("schema",),
    ("flops", "memory", "kernels_hlo"),
    ("interop.*",),
    ("train.*",),
    ("main", "demo", "routing_report", "convert", "upcycle", "sample", "dryrun"),
)


def _layer_of(module: str) -> int:
    exact = [i for i, names in enumerate(LAYERS) if module in names]
    if exact:
        return exact[0]
    package = [i for i, names in enumerate(LAYERS)
               if any(n.endswith(".*") and module.startswith(n[:-1]) for n in names)]
    assert package, f"moe_jax.{module} is in no layer of tests/test_lint.py: add it to LAYERS"
    return package[0]


def _imports(path: pathlib.Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_jax"):
            base = node.module.removeprefix("moe_jax").lstrip(".")
            for alias in node.names:  # `from moe_jax import routing` imports a module
                candidate = f"{base}.{alias.name}" if base else alias.name
                is_module = (ROOT / "moe_jax" / (candidate.replace(".", "/") + ".py")).exists() \
                    or (ROOT / "moe_jax" / candidate.replace(".", "/")).is_dir()
                found.add(candidate if is_module else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("moe_jax.") for a in node.names
                      if a.name.startswith("moe_jax.")}
    return {m for m in found if m}


def test_imports_point_down_the_layers():
    upward = []
    for path in sorted((ROOT / "moe_jax").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        module = ".".join(path.relative_to(ROOT / "moe_jax").with_suffix("").parts)
        for imported in _imports(path):
            if (ROOT / "moe_jax" / imported.replace(".", "/")).is_dir():
                imported += ".__init__"  # a package's face: `from moe_jax.data import DataConfig`
            if _layer_of(imported) > _layer_of(module):
                upward.append(f"moe_jax.{module} imports moe_jax.{imported}")
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)
