"""Exceptions raised by igrad. All derive from :class:`IgradError` (a ``ValueError``), so a caller can
catch every input problem igrad diagnoses with one ``except`` clause."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class IgradError(ValueError):
    """Base class of every error igrad raises on bad input."""


class UnsupportedActivationError(IgradError):
    """A non-linearity without a guided-backprop rule was met on the gradient path."""


def unknown_name(kind: str, name: object, known: Iterable[str]) -> IgradError:
    """An error for an unknown registry name, or for several at once (a ``list`` of names), listing the known
    names and, for each unknown one, the closest matches."""
    known = sorted(known)
    names = list(dict.fromkeys(name)) if isinstance(name, list) else [name]
    close = {n: difflib.get_close_matches(n, known, n=3, cutoff=0.5) if isinstance(n, str) else [] for n in names}
    hints = {n: f"did you mean {', '.join(repr(c) for c in close[n])}?" if close[n] else "" for n in names}
    if len(names) == 1:
        (n,) = names
        text = f"unknown {kind} {n!r}." + (f" D{hints[n][1:]}" if hints[n] else "")  # "Did ...": a sentence
    else:
        parts = [f"{n!r}" + (f" ({hints[n]})" if hints[n] else "") for n in names]
        text = f"{len(names)} unknown {kind} names: " + "; ".join(parts) + "."
    return IgradError(f"{text} Known: {', '.join(known)}.")
