"""Exceptions raised by igrad. All derive from :class:`IgradError` (a ``ValueError``), so a caller can
catch every input problem igrad diagnoses with one ``except`` clause."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class IgradError(ValueError):
    """Base class of every error igrad raises on bad input."""


class UnsupportedActivationError(IgradError):
    """A non-linearity without a guided-backprop rule was met on the gradient path."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> IgradError:
    """An error for an unknown registry name, listing the known names and the closest matches."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return IgradError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")
