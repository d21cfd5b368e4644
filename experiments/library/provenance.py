"""Where a measurement came from: the commit of the code and the CPU it ran on.

Imports no JAX, so the experiment runner can record it without starting a backend.
"""

from __future__ import annotations

import pathlib
import platform
import subprocess

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def command_output(*command: str, cwd: str | pathlib.Path = REPO_ROOT) -> str:
    """A command's standard output, stripped; "" when it cannot run."""
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False,
                              cwd=cwd).stdout.strip()
    except OSError:
        return ""


def git_commit(repo: str | pathlib.Path = REPO_ROOT) -> str:
    """The checked-out commit of `repo`, with "+uncommitted changes" when tracked files differ
    from it (untracked files, such as a new results file, do not count)."""
    commit = command_output("git", "rev-parse", "--short", "HEAD", cwd=repo)
    if commit and command_output("git", "status", "--porcelain", "--untracked-files=no",
                                 cwd=repo):
        commit += "+uncommitted changes"
    return commit


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the machine type."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
