"""Provenance: every results file says what produced it (config, seed, versions, commit, machine, time).
Files are written by :mod:`igrad.atomic`."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance", "git_commit", "file_sha256"]


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the git checkout holding igrad's source (``+dirty`` when modified), or ``None``."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty", "--abbrev=40"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(config: Mapping[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
    """What produced a result: config, seed, versions, commit, machine and time (JSON-ready)."""
    import torchvision

    from . import __version__

    return {
        "config": dict(config) if config is not None else None,
        "seed": seed,
        "versions": {
            "igrad": __version__,
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "python": platform.python_version(),
        },
        "commit": git_commit(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks: what identifies a checkpoint in a result."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
