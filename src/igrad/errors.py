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

    def hint(n: object) -> str:
        close = difflib.get_close_matches(n, known, n=3, cutoff=0.5) if isinstance(n, str) else []
        return f"did you mean {', '.join(repr(c) for c in close)}?" if close else ""

    if len(names) == 1:
        text = f"unknown {kind} {names[0]!r}." + (f" D{hint(names[0])[1:]}" if hint(names[0]) else "")
    else:
        parts = [f"{n!r}" + (f" ({hint(n)})" if hint(n) else "") for n in names]
        text = f"{len(names)} unknown {kind} names: " + "; ".join(parts) + "."
    return IgradError(f"{text} Known: {', '.join(known)}.")
