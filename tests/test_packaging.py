"""What `pip install .` ships: every package, and the configs, usable from any directory."""

import configparser
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def listed_packages() -> set[str]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    return set(setup["options"]["packages"].split())


def test_every_package_is_listed_in_setup_cfg():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "moe_jax").rglob(
        "__init__.py")}
    found |= {".".join(("moe_jax", *p.parent.relative_to(REPO).parts))
              for p in (REPO / "configs").rglob("__init__.py")}
    assert found == listed_packages()


@pytest.mark.slow
def test_a_non_editable_install_runs_the_configs_from_another_directory(tmp_path, data_dir):
    source = tmp_path / "source"  # a copy, so that the build leaves no build/ in the repository
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("moe_jax", "configs"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(target), str(source)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, check=False)

    where = run("-c", "import moe_jax, moe_jax.schema as s; print(moe_jax.__file__, "
                "s.CONFIGS_DIR)")
    assert where.returncode == 0, where.stderr
    assert str(target) in where.stdout and str(REPO) not in where.stdout
    flops = run("-m", "moe_jax.analysis.flops", "--config=configs/switch.py:e8")
    assert flops.returncode == 0 and "configs/switch.py:e8" in flops.stdout, flops.stderr
    trained = run("-m", "moe_jax.main", "--config=configs/switch.py:e8",
                  "--config.data.name=embedded_tiny", f"--config.data.data_dir={data_dir}",
                  "--config.train.num_train_steps=2", "--config.train.warmup_steps=1",
                  "--config.train.batch_size=2", "--config.train.progress_bar=False",
                  "--config.data.eval_batches=1", "--workdir=run")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (elsewhere / "run" / "summary.json").exists()
    missing = run("-m", "moe_jax.main", "--config=configs/swich.py:e8", "--workdir=run2")
    assert missing.returncode != 0 and "installed configs" in missing.stderr
