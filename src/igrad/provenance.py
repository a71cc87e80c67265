"""Provenance: every results file says what produced it (config, seed, versions, commit, machine, time).
Files are written by :mod:`igrad.atomic`.

The commit is the one of the tree igrad was loaded from in this process, read once, when a job first asks for
it (a training session at its start, a result when it is written: :func:`process_commit`), never at import,
and kept for the process, so that the results of a job that outlives a commit (hours of training while the tree
moves on) name the code that produced them; where the tree differs at write time, that is recorded too
(``commit_at_write``). A job that spans processes (a resumed training) records each process's commit
(:class:`igrad.train.RunResult` ``sessions``)."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["process_commit", "provenance", "machine_info", "cpu_model", "git_commit", "file_sha256"]


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit (``git describe``, ``+dirty`` when modified) of the checkout holding ``path`` now; without
    ``path``, of igrad's own source as this process first read it (:func:`process_commit`). ``None``
    outside a git checkout, and for igrad's source when git does not track it (an installed copy inside some
    other repository is not that repository's code)."""
    return _describe(Path(path)) if path is not None else process_commit()


def _git(where: Path, *args: str) -> str | None:
    """``git args`` run in ``where`` (stdout), ``None`` when git is missing or fails; it takes no optional
    locks (reading the commit never writes the index of a checkout in use)."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def _describe(where: Path) -> str | None:
    out = _git(where, "describe", "--always", "--dirty=+dirty", "--abbrev=40")
    return (out.strip() or None) if out is not None else None


def _own_commit() -> str | None:
    """The commit of igrad's source now, when git tracks this very file there."""
    here = Path(__file__).resolve()
    if _git(here.parent, "ls-files", "--error-unmatch", here.name) is None:
        return None
    return _describe(here.parent)


_UNREAD = "<unread>"
#: The commit of igrad's source as this process first read it (:func:`process_commit`); ``_UNREAD`` until then.
_process_commit: str | None = _UNREAD


def process_commit() -> str | None:
    """The commit of igrad's source for this process: read with git the first time it is asked for (a job asks
    when it starts), then kept, so that everything the process writes names the same code. ``None`` where git
    does not track igrad's source. Modules igrad imports later come from the same tree unless it changed in
    between, which :func:`provenance` then reports."""
    global _process_commit
    if _process_commit == _UNREAD:
        _process_commit = _own_commit()
    return _process_commit


def provenance(config: Mapping[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
    """What produced a result: config, seed, versions, commit, machine and time (JSON-ready). ``commit`` is
    :func:`process_commit`; where igrad's tree has changed since (a commit or an edit during a long job),
    ``commit_at_write`` says what it is now, so that nothing that ran is hidden either way."""
    import torchvision

    from ._version import __version__

    commit = process_commit()
    # whether git tracks igrad's source was settled when the commit was first read: only the commit can move
    now = _describe(Path(__file__).resolve().parent) if commit is not None else None
    return {
        "config": dict(config) if config is not None else None,
        "seed": seed,
        "versions": {
            "igrad": __version__,
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "python": platform.python_version(),
        },
        "commit": commit,
        **({"commit_at_write": now} if now != commit else {}),
        "machine": machine_info(),
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def machine_info() -> dict[str, Any]:
    """The machine a result was computed on: platform, architecture, CPU count and model, whether the CPU has
    bf16 units (AVX512-BF16 or AMX: :func:`igrad.precision.native_bf16`; without them bf16 autocast is
    emulated, an order of magnitude slower: ``--no-amp``), torch's thread count and the GPU's name (or
    ``None``)."""
    from .precision import native_bf16

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_bf16_units": native_bf16("cpu"),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@functools.cache
def cpu_model() -> str | None:
    """The CPU's model name: the first ``model name`` line of ``/proc/cpuinfo`` (Linux), else
    :func:`platform.processor`; ``None`` when neither says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks: what identifies a checkpoint in a result."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
