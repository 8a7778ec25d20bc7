"""The roman-tweakreg command: align Roman WFI images and look at the results.

Its commands (example, report, plot, asn, batch) are listed by ``roman-tweakreg --help``
from their declarations in :func:`_parser`, once.  Files are aligned with ``strun
roman_tweakreg asn.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading

from .errors import TweakRegError

__all__ = ["main"]

log = logging.getLogger(__name__)

_PATHS_HELP = (
    "output ASDF files, association JSON files listing them (paths relative to "
    "the association), or folders of .asdf files"
)


def _loudness(parser: argparse.ArgumentParser, default=False) -> None:
    """-q / -v, accepted before and after the command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress")
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="print only warnings, errors and results",
    )


def _detectors(text: str) -> int:
    """``--detectors``: an integer from 1 to 18."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 18:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 1 to 18")
    return value


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="roman-tweakreg",
        description="Align Roman WFI images and look at the results.",
        epilog="Align files with: strun roman_tweakreg asn.json (an association made by "
        "'roman-tweakreg asn'). 'roman-tweakreg COMMAND --help' tells more about a command; "
        "python -m roman_tweakreg COMMAND ... does the same.",
    )
    _loudness(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", title="commands"
    )

    ex = sub.add_parser(
        "example",
        help="simulate a WFI exposure pair, align it, print residuals",
        description="Simulate 2 dithered WFI exposures (8 x 8 pixel stand-in images with "
        "source catalogs and a Gaia-like reference catalog), align them with the step "
        "as strun does, and print each image's error against the true WCS.",
    )
    _loudness(ex, argparse.SUPPRESS)
    ex.set_defaults(run=_example, logs_itself=True)  # stpipe configures its logging
    ex.add_argument(
        "--out",
        default="tweakreg_example",
        help="folder for the example files: empty, new, or an earlier example's "
        "(default: tweakreg_example)",
    )
    ex.add_argument("--detectors", type=_detectors, default=18, help="detectors per exposure, 1-18")
    ex.add_argument(
        "--seed",
        type=int,
        default=2028,
        help="seed of the simulation (default: 2028); another seed gives other pointing "
        "errors and stars",
    )

    rep = sub.add_parser(
        "report",
        help="print the fit results stored in output files",
        description="Print the fit results stored in output files: one row per exposure "
        "group and phase (its correction and fit quality), then one row per file.",
    )
    _loudness(rep, argparse.SUPPRESS)
    rep.set_defaults(run=_report)
    rep.add_argument("paths", nargs="+", metavar="PATH", help=_PATHS_HELP)
    rep.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="how to print the results (default: table)",
    )
    rep.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="also write the whole JSON report to FILE (see the report page of the docs)",
    )

    asn = sub.add_parser(
        "asn",
        help="write an association (JSON) listing input files",
        description="Write a Roman association listing FILEs (paths relative to the "
        "association's folder), to align them together: "
        "strun roman_tweakreg.TweakRegStep asn.json",
    )
    _loudness(asn, argparse.SUPPRESS)
    asn.set_defaults(run=_asn)
    asn.add_argument("files", nargs="+", metavar="FILE", help="input ASDF files")
    asn.add_argument("-o", "--output", default="asn.json", metavar="ASN", help="default: asn.json")
    asn.add_argument("--product", default=None, help="product name (default: the ASN stem)")
    asn.add_argument("--force", action="store_true", help="replace an existing ASN file")

    plot = sub.add_parser(
        "plot",
        help="write residual figures (PNG) of aligned output files",
        description="Write residual figures of aligned output files (focal_plane.png, "
        "residual_histograms.png, matched_sky.png) and print their paths. Each image's "
        "sources are paired by nearest neighbour with the reference catalog (--refcat) or, "
        "without one, with the other exposure groups' sources; the same pairs are shown "
        "through the input WCS ('before') and the output WCS ('after'). See the report page "
        "of the docs for how to read them.",
    )
    _loudness(plot, argparse.SUPPRESS)
    plot.set_defaults(run=_plot)
    plot.add_argument("paths", nargs="+", metavar="PATH", help=_PATHS_HELP)
    plot.add_argument(
        "--inputs",
        nargs="+",
        metavar="PATH",
        default=None,
        help="the input files the outputs were made from (files, association or "
        "folder) for 'before' residuals; default: an input named like the "
        "output without its last _<suffix>, looked for next to the output "
        "and in a sibling 'inputs' folder",
    )
    plot.add_argument(
        "--refcat",
        metavar="FILE",
        default=None,
        help="reference catalog (RA/DEC columns, optional pmra/pmdec/parallax "
        "and epoch); without it, exposure groups are compared with each "
        "other",
    )
    plot.add_argument(
        "--out",
        default="tweakreg_plots",
        metavar="DIR",
        help="folder for the figures (default: tweakreg_plots)",
    )
    plot.add_argument(
        "--match-radius",
        type=float,
        default=0.5,
        metavar="ARCSEC",
        help="nearest-neighbour matching radius in arcsec (default: 0.5)",
    )
    plot.add_argument(
        "--max-vectors",
        type=int,
        default=5000,
        metavar="N",
        help="largest number of residual vectors drawn per panel (default: 5000)",
    )
    _add_batch_parser(sub)
    return parser


def _add_batch_parser(sub) -> None:
    batch = sub.add_parser(
        "batch",
        help="align many associations as tasks on a Dask cluster",
        description="Run TweakRegStep on each association as one Dask task; outputs go to "
        "DIR/<association>/, the summary to DIR/batch_summary.ecsv. Exit status 1 when an "
        "association FAILED.",
    )
    _loudness(batch, argparse.SUPPRESS)
    batch.set_defaults(run=_batch)
    batch.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="association files (.json), or text files listing them one a line",
    )
    batch.add_argument("--output-dir", required=True, metavar="DIR", help="folder for outputs")
    where = batch.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="address of a running Dask scheduler (tcp://host:8786 or a scheduler file); "
        "default: start a local cluster",
    )
    where.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes of the local cluster (default: the usable cores)",
    )
    batch.add_argument(
        "--resume",
        action="store_true",
        help="skip associations done before with the same parameters (outputs checked)",
    )
    batch.add_argument(
        "--retries", type=int, default=2, metavar="N", help="retries of a failed task (default 2)"
    )
    batch.add_argument(
        "--par",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a TweakRegStep parameter (repeat for more), e.g. --par abs_refcat=GAIADR3",
    )


def _example(args) -> int:
    from .example import run_example

    return run_example(
        args.out, n_detectors=args.detectors, seed=args.seed, verbosity=_verbosity(args)
    )


def _verbosity(args) -> int:
    return -1 if args.quiet else 1 if args.verbose else 0


def _report(args) -> int:
    import json

    from .report import format_report, read_results, summarize, write_report
    from .results import plain

    entries = read_results(args.paths)
    built = summarize(entries)  # one report for --format json and --json FILE
    if args.format == "json":
        print(json.dumps(plain(built, nan_as_none=True), indent=2, allow_nan=False))
    else:
        print(format_report(entries, args.format))
    if args.json:
        path = write_report(built, args.json)
        if not args.quiet:
            print(f"Wrote {path}", file=sys.stderr)
    return 0


def _asn(args) -> int:
    from .library import write_association

    path = write_association(args.files, args.output, product=args.product, overwrite=args.force)
    print(path)
    return 0


def _plot(args) -> int:
    from .plots import make_plots

    paths = make_plots(
        args.paths,
        inputs=args.inputs,
        refcat=args.refcat,
        out_dir=args.out,
        match_radius=args.match_radius,
        max_vectors=args.max_vectors,
    )
    for path in paths:
        print(path)
    return 0


def _batch(args) -> int:
    from .batch import align_associations
    from .errors import InvalidParameterError

    pars = {}
    for item in args.par:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidParameterError(f"--par {item}: expected name=value")
        pars[name.strip()] = value.strip()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    batch_log = logging.getLogger("roman_tweakreg.batch")
    level = batch_log.level
    batch_log.addHandler(handler)
    batch_log.setLevel(logging.INFO)
    try:
        if args.scheduler:
            from distributed import Client

            address = args.scheduler
            kwargs = {"scheduler_file": address} if address.endswith(".json") else {}
            with Client(None if kwargs else address, **kwargs) as client:
                table = align_associations(
                    args.inputs, args.output_dir, client, args.resume, retries=args.retries, **pars
                )
        else:
            table = align_associations(
                args.inputs,
                args.output_dir,
                None,
                args.resume,
                workers=args.workers,
                retries=args.retries,
                **pars,
            )
    finally:
        batch_log.removeHandler(handler)
        batch_log.setLevel(level)
    return 1 if "FAILED" in list(table["status"]) else 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM received: raised as an interrupt, so that cleanup code runs."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Meanwhile, SIGTERM raises an interrupt (main thread only); restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the ``roman-tweakreg`` command line; return the exit status.

    Errors of the package (a missing or unreadable file...) are printed as one line
    naming the file, with exit status 1.  An interrupt (Ctrl-C, SIGINT) or SIGTERM
    stops the command after its cleanup (temporary files removed, worker processes
    stopped) with one line and the status 128 + the signal's number (130, 143).
    """
    args = _parser().parse_args(argv)
    try:
        with _terminate_as_interrupt(), _logging(args):
            return args.run(args)
    except TweakRegError as err:
        print(f"roman-tweakreg {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(
            f"roman-tweakreg {args.command}: interrupted ({signal.Signals(signum).name})",
            file=sys.stderr,
        )
        return 128 + signum


@contextlib.contextmanager
def _logging(args):
    """Show this package's messages at the level asked for (-v: INFO) on stderr, in the block.

    The handler and level are removed afterwards: no logging state outlives ``main``.
    """
    if getattr(args, "logs_itself", False):
        yield
        return
    logger = logging.getLogger("roman_tweakreg")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(handler.level, previous or logging.WARNING))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
