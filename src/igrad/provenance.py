"""Provenance: every results file says what produced it (config, seed, versions, commit, machine, time).
Files are written by :mod:`igrad.atomic`.

The commit is the one of the code this process runs: read once, when igrad is imported, not when a result
is written, so the results of a job that outlives a commit (hours of training while the tree moves on) name
the code that produced them. A job that spans processes (a resumed training) records each process's commit
(:class:`igrad.train.RunResult` ``sessions``)."""

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

__all__ = ["PROCESS_COMMIT", "provenance", "git_commit", "file_sha256"]


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit (``git describe``, ``+dirty`` when modified) of the checkout holding ``path`` now; without
    ``path``, of igrad's own source when this process imported it (:data:`PROCESS_COMMIT`). ``None`` outside
    a git checkout."""
    return _describe(Path(path)) if path is not None else PROCESS_COMMIT


def _describe(where: Path) -> str | None:
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


#: The commit of igrad's source when this process imported igrad (``git_commit()``): what its results ran.
PROCESS_COMMIT: str | None = _describe(Path(__file__).resolve().parent)


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
