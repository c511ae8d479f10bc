"""The `wavefront` command: demo, inspect, bench, export.

    wavefront demo
    wavefront inspect armt-tiny --segments 6 --html report.html --trace trace.json --profile
    wavefront inspect --file my_model.py --factory make_model
    wavefront bench diagonal --preset dispatch --json
    wavefront export armt-tiny -o armt.onnx

User mistakes print one line, `wavefront: error: ...`, and exit with status 2: a bad number
(--T 0), an output path that cannot be written (checked before any model is built, since the
work can take minutes), a missing or unimportable --file, a factory that raises anything but
Ctrl-C, an unknown model, a model wavefront cannot schedule, and any exception whose traceback
passes through the --file (the user's own model failed; the line says where). Any other exception
is wavefront's own bug and keeps its traceback. WAVEFRONT_TRACEBACK=1 shows the traceback always.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import sys
import traceback

import wavefront
from wavefront import bench_families, demo
from wavefront.api import OptimizedModel
from wavefront.export import ExportError
from wavefront.passes.dependence import build_grid
from wavefront.presets import ARMT_PRESETS, EXAMPLE_MODELS, example_model

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, KeyError)
POSITIVE = ("segments", "batch", "repeats", "channels", "T")  # argument dests that must be >= 1
OUTPUT_FLAGS = {"output": "-o", "html": "--html", "trace": "--trace"}  # argument dest -> flag


class CLIError(Exception):
    """A mistake in what the user asked for; printed without a traceback."""


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    """tqdm over `iterable` on stderr when enabled and installed, else the iterable itself."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)


def _first_line(e: BaseException) -> str:
    """The first line of `e`'s message, or its type's name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _describe(e: BaseException) -> str:
    """'Type: first line of the message' (the type alone when the message is empty).

    >>> _describe(ZeroDivisionError("division by zero\\nmore"))
    'ZeroDivisionError: division by zero'
    """
    return f"{type(e).__name__}: {_first_line(e)}" if str(e).strip() else type(e).__name__


def _import_user_file(path: str):
    """The module defined by the user's --file (any extension), or CLIError saying what went wrong."""
    if os.path.isdir(path):
        raise CLIError(f"--file {path} is a directory: name the Python file that builds your model")
    if not os.path.isfile(path):
        raise CLIError(f"--file {path}: no such file")
    loader = importlib.machinery.SourceFileLoader("wavefront_user_model", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    try:
        loader.exec_module(module)
    except SystemExit as e:  # e.g. argparse at the top of a training script, parsing wavefront's argv
        raise CLIError(f"--file {path} exited while being imported (SystemExit: {e.code}): put its script code "
                       "under `if __name__ == '__main__':`") from e
    except Exception as e:
        raise CLIError(f"--file {path} failed to import: {_describe(e)}") from e
    return module


def _call_factory(factory, name: str, path: str):
    """factory(), any failure but Ctrl-C (KeyboardInterrupt) turned into one CLIError naming it.

    >>> _call_factory(lambda: 1 / 0, "make_model", "m.py")
    Traceback (most recent call last):
    ...
    wavefront.cli.CLIError: make_model() in m.py raised ZeroDivisionError: division by zero
    """
    try:
        return factory()
    except (Exception, SystemExit) as e:
        raise CLIError(f"{name}() in {path} raised {_describe(e)}") from e


def load_model(args):
    """(model, segment count, example inputs or None) from a named example or a user's file
    exposing a factory (which returns the model, or (model, example input tuple))."""
    if args.file:
        module = _import_user_file(args.file)
        factory = getattr(module, args.factory, None)
        if not callable(factory):
            raise CLIError(f"{args.file} has no callable {args.factory!r}: define `def {args.factory}(): return model` "
                           "or name another with --factory")
        made = _call_factory(factory, args.factory, args.file)
        from torch import nn
        model, inputs = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
        if not isinstance(model, nn.Module):
            raise CLIError(f"{args.factory}() returned {type(model).__name__}, not a torch nn.Module (or a "
                           "(module, example inputs) pair)")
        if inputs is not None and not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        return model.eval(), args.segments or 4, inputs
    if not args.model:
        raise CLIError("name an example model (see `wavefront inspect --help`) or pass --file PATH")
    model, S = example_model(args.model, seed=args.seed)
    return model, args.segments or S, None


def _segment_model(optimized) -> bool:
    return isinstance(optimized, OptimizedModel)


def example_ids(model, optimized, n_segments: int, batch: int):
    """Random token ids for `n_segments` whole segments (vocabulary from the model's embedding)."""
    import torch
    from torch import nn
    vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), 2)
    device = next(model.parameters()).device
    return torch.randint(0, vocab, (batch, n_segments * optimized.rg.segment_len), device=device)


def _optimize(model, schedule: str, backend: str = "torch"):
    try:
        return wavefront.optimize(model, schedule=schedule, backend=backend)
    except ValueError as e:
        hint = " (try --schedule sequential)" if schedule == "diagonal" and "sequential" not in str(e) else ""
        raise CLIError(f"cannot run this model under the {schedule} schedule: {str(e).splitlines()[0]}{hint}") from e


def _profiled(optimized, ids, repeats: int, show_progress: bool):
    """Timings of the run with the median total among `repeats` profiled runs (after a warm-up)."""
    import torch

    with torch.inference_mode():
        optimized(ids)  # warm-up: the fold checks itself, kernels compile
        runs = [wavefront.profile(optimized, ids) for _ in _progress(range(repeats), "profiling", show_progress)]
    runs.sort(key=lambda t: t.total_s)
    return runs[len(runs) // 2]


def cmd_demo(args) -> int:
    demo.main()
    return 0


def cmd_inspect(args) -> int:
    model, S, inputs = load_model(args)
    optimized = _optimize(model, args.schedule, args.backend)
    if not _segment_model(optimized):  # time loops / scans: no layer x segment schedule to draw
        if args.html or args.trace or args.profile:
            raise CLIError("--html, --trace and --profile show a layer x segment schedule; this model has none "
                           "(run inspect without them to see its time loops)")
        if inputs is not None:
            import torch
            with torch.inference_mode():
                optimized(*inputs)
        print(wavefront.explain(optimized))
        if inputs is None:
            print("\n(return (model, example_inputs) from the factory to run it once and see how each loop ran)")
        return 0
    ids = example_ids(model, optimized, S, args.batch)
    timings = compare = None
    if args.profile or args.html:
        timings = _profiled(optimized, ids, args.repeats, not args.quiet)
        if args.html:  # the other schedule beside this one, measured the same way
            other_kind = "sequential" if args.schedule == "diagonal" else "diagonal"
            try:
                other = _optimize(model, other_kind)
            except CLIError:
                other = None  # e.g. RMT: no diagonal schedule to compare with
            if other is not None:
                other_timings = _profiled(other, ids, args.repeats, not args.quiet)
                compare = (wavefront.last_schedule(other), other_timings)
    else:
        import torch
        with torch.inference_mode():
            optimized(ids)
    schedule = wavefront.last_schedule(optimized)
    print(wavefront.explain(optimized))
    print()
    print(schedule)
    print("\ncells that run together, per step:")
    print(schedule.lanes_text())
    if timings is not None:
        print()
        print(timings.table(schedule))
    if args.html:
        schedule.to_html(args.html, timings, compare=compare)
        print(f"\nwrote {args.html}")
    if args.trace:
        schedule.to_chrome_trace(args.trace, timings, grid=build_grid(optimized.rg, schedule.n_segments))
        print(f"wrote {args.trace} (open it in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def cmd_bench(args) -> int:
    if args.family == "diagonal":
        presets = args.preset or ["tiny"]
        unknown = [p for p in presets if p not in ARMT_PRESETS]
        if unknown:
            raise CLIError(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(ARMT_PRESETS)}")
        jobs = [(f"preset {p}", lambda p=p: bench_families.diagonal_speedup(p, backend=args.backend,
                                                                              repeats=args.repeats)) for p in presets]
    else:
        jobs = [(f"{c} ch x T {T}", lambda c=c, T=T: bench_families.first_order_scan(c, T, repeats=args.repeats))
                for c in args.channels for T in args.T]
    records = []
    for label, job in _progress(jobs, f"bench {args.family}", not args.quiet and not args.json, total=len(jobs)):
        rec = job()
        records.append((label, rec))
        if args.json:
            print(json.dumps(rec), flush=True)
    if not args.json:
        base, cand = ("sequential", "diagonal") if args.family == "diagonal" else ("loop", "wavefront")
        print(f"{'config':<22} {base + ' ms':>14} {cand + ' ms':>14} {'ratio':>8} {'rel err':>9}")
        for label, rec in records:
            print(f"{label:<22} {1e3 * rec[base + '_s']:>14.3f} {1e3 * rec[cand + '_s']:>14.3f} "
                  f"{rec['ratio']:>7.2f}x {rec['error']:>9.1e}")
        print(f"({records[0][1]['device']}, median of {args.repeats}; ratios above 1: wavefront is faster)")
    return 0


def cmd_export(args) -> int:

    model, S, inputs = load_model(args)
    optimized = _optimize(model, "diagonal")
    if _segment_model(optimized):
        inputs = (example_ids(model, optimized, S, args.batch),)
    elif inputs is None:
        raise CLIError("this model has no segment recurrence, so its example inputs are unknown: return "
                       "(model, example_inputs) from the factory")
    proto = wavefront.export_onnx(optimized, tuple(inputs), args.output)
    ops = sorted({n.op_type for n in proto.graph.node})
    print(f"wrote {args.output}: {len(proto.graph.node)} nodes ({', '.join(ops[:12])}{' ...' if len(ops) > 12 else ''}),"
          f" checked against the model in onnxruntime")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wavefront", description="Schedule recurrent sequence models: see what runs "
                                "together, when, and how fast.", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("demo", help="capture an ARMT, show its schedules, run them exactly, refuse RMT (what make demo runs)")

    def model_args(sp):
        sp.add_argument("model", nargs="?", choices=EXAMPLE_MODELS, metavar="MODEL",
                        help=f"a built-in example with random weights: {', '.join(EXAMPLE_MODELS)}")
        sp.add_argument("--file", help="a Python file that builds your model (instead of MODEL)")
        sp.add_argument("--factory", default="make_model",
                        help="the function in --file that returns the nn.Module, or (module, example inputs) for models "
                        "that are not segment-recurrent (default: make_model)")
        sp.add_argument("--segments", type=int, help="number of segments in the example input (default: the "
                        "example's own, or 4 for --file)")
        sp.add_argument("--batch", type=int, default=1, help="batch size of the example input (default: 1)")
        sp.add_argument("--seed", type=int, default=0, help="seed for the example's random weights (default: 0)")

    ins = sub.add_parser("inspect", help="optimize a model, print what was found and its schedule grid; "
                         "write an HTML report or a Chrome trace")
    model_args(ins)
    ins.add_argument("--schedule", default="diagonal", choices=["diagonal", "sequential"],
                     help="schedule to run (default: diagonal)")
    ins.add_argument("--backend", default="torch", choices=["torch", "inductor", "aot_inductor"], help="default: torch")
    ins.add_argument("--profile", action="store_true", help="time each step (perf_counter on CPU, CUDA events on GPU)")
    ins.add_argument("--repeats", type=int, default=3, help="profiled runs; the median one is reported (default: 3)")
    ins.add_argument("--html", metavar="PATH", help="write a self-contained HTML report (profiles both schedules)")
    ins.add_argument("--trace", metavar="PATH", help="write Chrome trace-event JSON (Perfetto)")
    ins.add_argument("--quiet", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="run a benchmark family and print a table (or JSON lines)",
                       description="Families: " + "; ".join(f"{k}: {v}" for k, v in bench_families.FAMILIES.items()))
    b.add_argument("family", choices=sorted(bench_families.FAMILIES), help="which benchmark family")
    b.add_argument("--preset", action="append", help=f"diagonal: ARMT preset(s) ({', '.join(ARMT_PRESETS)}; "
                   "default tiny; repeat the flag for several)")
    b.add_argument("--backend", default="torch", choices=["torch", "inductor", "aot_inductor"], help="diagonal: default torch")
    b.add_argument("--channels", type=int, nargs="+", default=[256], help="scan: batch x channels (default 256)")
    b.add_argument("--T", type=int, nargs="+", default=[4096], help="scan: sequence lengths (default 4096)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per side after a warm-up (default: 5)")
    b.add_argument("--json", action="store_true", help="print one JSON line per measurement instead of a table")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="export an optimized model to ONNX (checked in onnxruntime)")
    model_args(e)
    e.add_argument("-o", "--output", required=True, metavar="PATH", help="the .onnx file to write")
    return p


COMMANDS = {"demo": cmd_demo, "inspect": cmd_inspect, "bench": cmd_bench, "export": cmd_export}


def check_output_path(flag: str, path: str, model_file: str | None = None) -> None:
    """Raise CLIError unless `path` can be written as a file (and is not the user's --file).

    >>> check_output_path("-o", ".")
    Traceback (most recent call last):
    ...
    wavefront.cli.CLIError: -o . is a directory: name a file in it
    """
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise CLIError(f"{flag} {path} is a directory: name a file in it")
    folder = existing = os.path.dirname(target)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CLIError(f"{flag} {path}: {existing} is a file, not a folder")
    if existing != folder:
        raise CLIError(f"{flag} {path}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path}: cannot write in {folder} (permission denied)")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise CLIError(f"{flag} {path} exists and is read-only")
    if model_file and os.path.isfile(model_file) and os.path.exists(target) and os.path.samefile(target, model_file):
        raise CLIError(f"{flag} {path} would overwrite your --file model: choose another path")


def check_args(args) -> None:
    """Raise CLIError for a number below 1 or an unwritable output path, before any work starts.

    >>> check_args(argparse.Namespace(T=[64, 0]))
    Traceback (most recent call last):
    ...
    wavefront.cli.CLIError: --T must be at least 1, got 0
    """
    for name in POSITIVE:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < 1:
                raise CLIError(f"--{name} must be at least 1, got {value}")
    for name, flag in OUTPUT_FLAGS.items():
        if getattr(args, name, None) is not None:
            check_output_path(flag, getattr(args, name), getattr(args, "file", None))


def _frame_in(e: BaseException, path: str):
    """The innermost traceback frame in file `path` of `e` or of an exception that led to it, or None."""
    target, seen = os.path.realpath(path), set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.realpath(f.filename) == target]
        if frames:
            return frames[-1]
        e = e.__cause__ or e.__context__
    return None


def user_mistake(e: Exception, model_file: str | None) -> str | None:
    """The one line to print for `e` when the user caused it; None for wavefront's own bugs.

    >>> user_mistake(CLIError("--T must be at least 1, got 0"), None)
    '--T must be at least 1, got 0'
    >>> user_mistake(RuntimeError("an internal slip"), None) is None  # not from the user's file: traceback
    True
    """
    if isinstance(e, (CLIError, ExportError)):
        return _first_line(e)
    where = _frame_in(e, model_file) if model_file else None
    if where is not None:  # the user's model (or its factory) failed: point at the line
        return f"{_describe(e)} (in your model: {where.filename} line {where.lineno}, in {where.name})"
    if isinstance(e, USER_ERRORS):
        return _first_line(e)
    return None


def main(argv=None) -> int:
    """Entry point of the `wavefront` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return COMMANDS[args.command](args)
    except Exception as e:
        message = user_mistake(e, getattr(args, "file", None))
        if message is None or os.environ.get("WAVEFRONT_TRACEBACK"):
            raise
        print(f"wavefront: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
