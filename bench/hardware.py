"""What the bench scripts record about the machine they ran on."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    """The commit the bench runs: $TINYRL_COMMIT when set (bench/gpu.sh: the lent GPU's copy of the tree has no
    .git), else `git describe --always --dirty`, else "unknown" (no git, or not a checkout). Never raises."""
    if os.environ.get("TINYRL_COMMIT"):
        return os.environ["TINYRL_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
