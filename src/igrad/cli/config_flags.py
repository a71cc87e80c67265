"""One flag generator for the configuration dataclasses: ``igrad train``'s flags come from
:class:`igrad.train.TrainConfig`, ``igrad evaluate``'s from :class:`igrad.evaluate.EvalConfig`, one flag
``--field-name`` per field, with the field's ``help`` metadata, ``--x/--no-x`` for booleans and the
registries' names as choices."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["add_config_flags", "config_values"]


def add_config_flags(
    group: argparse._ArgumentGroup,
    config: type,
    *,
    choices: Mapping[str, Iterable[str]] | None = None,
    metavars: Mapping[str, str] | None = None,
    typed: bool = True,
    note: Callable[[dataclasses.Field[Any]], str] | None = None,
) -> None:
    """Add one flag per field of the dataclass ``config`` to ``group``.

    ``typed=True``: an unset flag holds the field's default, and integer fields are parsed as ``int``
    (the values go straight into ``config``). ``typed=False``: an unset flag is absent from the namespace
    (so that presets and files below the flags keep their values) and values stay strings, for the
    config's own coercion. ``choices``: the allowed values of some fields; ``metavars``: their names
    (a ``list`` field is ``LIST``); ``note(field)``: what follows the help text (default: the default
    value, ``(default X)``).
    """
    choices, metavars = choices or {}, metavars or {}
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        suffix = note(f) if note is not None else f"(default {f.default})"
        if "(default" in f.metadata["help"]:  # the help text states its default itself
            suffix = ""
        kwargs: dict[str, Any] = {
            "default": f.default if typed else argparse.SUPPRESS,
            "help": f"{f.metadata['help']} {suffix}" if suffix else f.metadata["help"],
        }
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typed:
            kwargs["type"] = int if hint is int or int in typing.get_args(hint) else str
        if f.name in choices:
            kwargs["choices"] = list(choices[f.name])
        elif f.name in metavars or typing.get_origin(hint) is list:
            kwargs["metavar"] = metavars.get(f.name, "LIST")
        group.add_argument(flag, **kwargs)


def config_values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The values of ``config``'s fields that ``args`` holds (with ``typed=False``: the flags given)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
