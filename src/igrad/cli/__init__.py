"""``igrad`` command line: a thin dispatcher over the library.

Each sub-command is a module ``igrad.cli.<name>`` with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Errors that igrad diagnoses (:class:`igrad.IgradError`) print one clear
line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import IgradError

#: Sub-commands, in the order ``igrad --help`` lists them.
COMMANDS = ("demo", "train", "explain", "evaluate", "reproduce")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="igrad",
        description="Train CNNs whose plain input gradients are interpretable, and measure saliency quality.",
    )
    parser.add_argument("--version", action="version", version=f"igrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(
            name, help=mod.HELP, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``igrad`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except IgradError as exc:
        print(f"igrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"igrad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
