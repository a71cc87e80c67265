"""Exceptions raised by igrad. All derive from :class:`IgradError` (a ``ValueError``), so a caller can
catch every input problem igrad diagnoses with one ``except`` clause."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class IgradError(ValueError):
    """Base class of every error igrad raises on bad input."""


class UnsupportedActivationError(IgradError):
    """A non-linearity without a guided-backprop rule was met on the gradient path."""


def unknown_name(kind: str, name: str | Iterable[str], known: Iterable[str]) -> IgradError:
    """An error for unknown registry names (one ``name`` or several, all named at once), listing the known
    names and, for each unknown one, the closest matches."""
    known = sorted(known)
    names = [name] if isinstance(name, str) else list(name)

    def hint(n: str) -> str:
        close = difflib.get_close_matches(n, known, n=3, cutoff=0.5)
        return f"Did you mean {', '.join(repr(c) for c in close)}?" if close else ""

    if len(names) == 1:
        text = f"unknown {kind} {names[0]!r}." + (f" {hint(names[0])}" if hint(names[0]) else "")
    else:
        text = (
            f"{len(names)} unknown {kind} names: "
            + "; ".join(f"{n!r}" + (f" ({hint(n)[0].lower()}{hint(n)[1:]})" if hint(n) else "") for n in names)
            + "."
        )
    return IgradError(f"{text} Known: {', '.join(known)}.")
