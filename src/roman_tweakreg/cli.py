"""The ``roman-tweakreg`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``roman-tweakreg`` command line."""
    parser = argparse.ArgumentParser(prog="roman-tweakreg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="simulate a WFI exposure pair, align it, print residuals")
    ex.add_argument("--out", default="tweakreg_example", help="folder for the example files")
    ex.add_argument("--detectors", type=int, default=18, help="detectors per exposure (1-18)")
    args = parser.parse_args(argv)
    if args.command == "example":
        from .example import run_example

        return run_example(args.out, n_detectors=args.detectors)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
