"""Shared by the SST-2 evaluation scripts (eval_eigenlorax.py, eval_solar.py, eval_srlora.py) and
make_results.py: the up-front check of the --sst2 folder, a fingerprint of its data for cache keys,
and the command line a report quotes.

The scripts import it as ``evalcommon`` (``python bench/eval_x.py`` puts bench/ on sys.path).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
from typing import Iterable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SST2_FILES = ("train.tsv", "dev.tsv")
# where subspace_ext.data.default_sst2_path() looks (it returns None when the folder is missing)
DEFAULT_SST2 = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2")
SST2_HEADER = ["sentence", "label"]


def sst2_problem(path: str) -> Optional[str]:
    """None when ``path`` is a readable SST-2 folder (train.tsv and dev.tsv with a 'sentence<TAB>label'
    header), else a one-line reason that names the path."""
    if not os.path.isdir(path):
        return f"SST-2 folder {path!r} does not exist" if not os.path.exists(path) else \
            f"SST-2 path {path!r} is not a folder"
    for name in SST2_FILES:
        fn = os.path.join(path, name)
        if not os.path.isfile(fn):
            return f"SST-2 folder {path!r} has no {name}"
        try:
            with open(fn, encoding="utf-8") as f:
                header = f.readline().rstrip("\r\n").split("\t")[:2]
        except (OSError, UnicodeDecodeError) as e:
            return f"cannot read {fn!r}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        if header != SST2_HEADER:
            return f"{fn!r}: expected a header 'sentence<TAB>label', got {chr(9).join(header)!r}"
    return None


def require_sst2(parser: argparse.ArgumentParser, path: Optional[str]) -> str:
    """The absolute path of a usable SST-2 folder; otherwise ``parser.error`` (a one-line message,
    exit status 2). ``path`` None means no --sst2 was given and the default location is missing."""
    if not path:
        parser.error("SST-2 not found: pass --sst2 FOLDER (with train.tsv and dev.tsv); "
                     "the default ../shared/data/sst2 does not exist")
    problem = sst2_problem(path)
    if problem:
        parser.error(f"--sst2: {problem}")
    return os.path.abspath(path)


def sst2_fingerprint(path: str) -> dict:
    """What identifies the SST-2 data at ``path`` in a cache key: the resolved folder and the SHA-256
    of each file (about 4 MB in all: milliseconds)."""
    real = os.path.realpath(path)
    digests = {}
    for name in SST2_FILES:
        h = hashlib.sha256()
        with open(os.path.join(real, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[name] = h.hexdigest()
    return {"path": real, "sha256": digests}


def command_line(script: str, argv: Optional[Iterable[str]] = None) -> str:
    """How this run was started, for a report: the interpreter (relative when it lives under the
    working directory, e.g. .venv/bin/python, else 'python'), the script relative to the working
    directory, and the arguments (shell-quoted where needed)."""
    cwd = os.getcwd()
    exe = sys.executable or "python"
    exe = os.path.relpath(exe, cwd) if exe.startswith(cwd + os.sep) else "python"
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([exe, os.path.relpath(os.path.abspath(script), cwd)] + args)


def _portable(v):
    return os.path.relpath(v, ROOT) if isinstance(v, str) and os.path.isabs(v) else v


def command_from_args(script: str, parser: argparse.ArgumentParser, args: dict, *,
                      first: Iterable[str] = (), last: Iterable[str] = (), defaults: Optional[dict] = None) -> str:
    """A command that repeats a recorded run, for a JSON that holds the parsed arguments
    (``plots.portable_args``) but not the command line: ``python bench/SCRIPT`` with the options
    named in ``first`` (always, in that order), then every other option whose recorded value differs
    from the parser's default (in the parser's order), then those in ``last`` (always). Paths are
    compared relative to the repository root; options recorded as None or False are left out.
    ``defaults`` overrides parser defaults that depend on the machine (e.g. --sst2's, which is None
    where ../shared/data/sst2 is missing), so the command does not."""
    first, last = list(first), list(last)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    unknown = [d for d in first + last if d not in by_dest]
    if unknown:
        raise KeyError(f"{script}: no option for {unknown}")
    default = {d: a.default for d, a in by_dest.items()}
    default.update(defaults or {})
    rest = [d for d in by_dest if d not in first and d not in last and d in args
            and _portable(args[d]) != _portable(default[d])]
    words = ["python", f"bench/{script}"]
    for dest in first + rest + last:
        v = args.get(dest)
        if v is None or v is False:
            continue
        words.append(max(by_dest[dest].option_strings, key=len))
        if v is not True:
            words += [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
    return shlex.join(words)
