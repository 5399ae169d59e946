"""The ``python -m bench`` command line: machine, optimizer_step, train_step, sam_step, host and quality sections; table, JSON, PNG."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from amp_fused import backends

from . import host, optimizer_step, report, sam_step, train_step
from .machine import machine_info

SECTIONS = ("optimizer_step", "train_step", "sam_step", "host", "quality")
DEFAULT_SECTIONS = ("optimizer_step", "train_step")  # sam_step, host, quality: on request (--sections ...)
DEVICES = ("cpu", "cuda")
# (rounds, optimizer_step min_run_time, train_step min_run_time): full run, then --quick
FULL_TIMING = (5, 0.5, 1.5)
QUICK_TIMING = (3, 0.3, 1.0)


@dataclass
class Config:
    device: str
    backends: list[str]
    sections: list[str]
    sets: list[str]
    host_sets: list[str]
    host_backends: list[str]
    skipped_sets: list[str]
    models: list[str]
    rounds: int
    optimizer_min_run_time: float
    train_min_run_time: float
    threads: int
    quick: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="AMP benchmarks: the optimizer-side step per backend against the memory-bandwidth floor, and "
                    "whole training steps of ERM vs AMP. Prints tables; --json and --plot save them.")
    parser.add_argument("--quick", action="store_true",
                        help="a run of under 2 minutes on 2 CPU cores: parameter sets "
                             f"{','.join(optimizer_step.QUICK_SETS)} only (unless --sets), fewer and shorter rounds")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every number (and the machine) here")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG with one bar chart per section")
    parser.add_argument("--backends", metavar="A,B,...",
                        help="AMP backends to time (default: every one available for --device, reference included); "
                             "the torch.optim.SGD(fused=True) row 'sgd_fused' is always timed")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="where the tensors live (default: cpu)")
    parser.add_argument("--sections", metavar="A,B",
                        help=f"sections to run, of {','.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--sets", metavar="A,B,...",
                        help=f"optimizer_step and sam_step parameter sets (default: {','.join(optimizer_step.PARAM_SETS)})")
    parser.add_argument("--host-sets", metavar="A,B,...",
                        help=f"host parameter sets (default: {','.join(host.HOST_SETS)}; quick "
                             f"{','.join(host.QUICK_HOST_SETS)})")
    parser.add_argument("--models", metavar="A,B",
                        help=f"train_step models (default: {','.join(train_step.MODELS)})")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help=f"interleaved timing rounds per statement (default: {FULL_TIMING[0]}, quick "
                             f"{QUICK_TIMING[0]})")
    parser.add_argument("--min-run-time", type=float, metavar="SECONDS",
                        help="seconds per blocked_autorange measurement in both sections (default: optimizer_step "
                             f"{FULL_TIMING[1]}, train_step {FULL_TIMING[2]}; quick {QUICK_TIMING[1]}, "
                             f"{QUICK_TIMING[2]})")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cache", type=Path, metavar="DIR", default=Path("out/quality/cache"),
                        help="quality: directory of cached training runs (default out/quality/cache); --plot PATH puts "
                             "its two plots beside PATH, else in out/quality")
    return parser


def _names(parser, flag: str, text: str | None, allowed, default, explain=None, where="") -> list[str]:
    """A comma-separated list of names from ``allowed``; the default when the flag is absent."""
    if text is None:
        return list(default)
    names = [n.strip() for n in text.split(",")]
    choices = f"allowed{where}: " + ", ".join(allowed)
    for name in names:
        if name not in allowed:
            why = explain(name) if explain else None
            parser.error(f"argument {flag}: {name!r} is " + (f"not available ({why})" if why else "unknown")
                         + f"; {choices}")
    if len(set(names)) != len(names):
        parser.error(f"argument {flag}: {text!r} names something twice; {choices}")
    return names


def benchmark_backends(device: str) -> list[str]:
    """The AMP backends worth timing on ``device`` tensors, reference first."""
    names = backends.available_backends(device)
    if device == "cpu" and "triton" in names:
        names.remove("triton")  # Triton's interpreter: for testing kernels, not for timing them
    return sorted(names, key=lambda n: n != "reference")


def _why_not(device: str, name: str) -> str | None:
    if name not in backends.BACKEND_NAMES:
        return None
    reason = backends.unavailable_reason(name)
    if reason is not None:
        return reason
    if name == "triton" and device == "cpu":
        return "on CPU tensors it runs in Triton's interpreter, a correctness tool, not a benchmark"
    return f"it does not run on {device} tensors"


def resolve_config(args, parser) -> Config:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' needs a CUDA device and torch.cuda.is_available() is False here; "
                     "allowed on this machine: cpu")
    sections = _names(parser, "--sections", args.sections, SECTIONS, DEFAULT_SECTIONS)
    allowed_backends = benchmark_backends(args.device)
    # The host section also times Triton on CPU tensors, with its launches stubbed out (bench/host.py), so a
    # run of that section alone may name it.
    all_host_backends = host.host_backends(args.device) if "host" in sections else []
    names = _names(parser, "--backends", args.backends,
                   all_host_backends if sections == ["host"] else allowed_backends, allowed_backends,
                   lambda name: _why_not(args.device, name), where=f" with --device {args.device}")
    host_sets = _names(parser, "--host-sets", args.host_sets, list(host.HOST_SETS),
                       host.QUICK_HOST_SETS if args.quick else list(host.HOST_SETS))
    host_backends = [n for n in all_host_backends if args.backends is None or n in names]
    all_sets = list(optimizer_step.PARAM_SETS)
    default_sets = optimizer_step.QUICK_SETS if args.quick else all_sets
    sets = _names(parser, "--sets", args.sets, all_sets, default_sets)
    models = _names(parser, "--models", args.models, list(train_step.MODELS), train_step.MODELS)
    rounds, optimizer_time, train_time = QUICK_TIMING if args.quick else FULL_TIMING
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"argument --rounds: must be an int >= 1, got {args.rounds}")
        rounds = args.rounds
    if args.min_run_time is not None:
        if not args.min_run_time > 0:
            parser.error(f"argument --min-run-time: must be a number of seconds > 0, got {args.min_run_time}")
        optimizer_time = train_time = args.min_run_time
    if args.threads is not None and args.threads < 1:
        parser.error(f"argument --threads: must be an int >= 1, got {args.threads}")
    return Config(device=args.device, backends=names, sections=sections, sets=sets, host_sets=host_sets,
                  host_backends=host_backends,
                  skipped_sets=[s for s in all_sets if s not in sets] if args.sets is None else [],
                  models=models, rounds=rounds, optimizer_min_run_time=optimizer_time,
                  train_min_run_time=train_time, threads=args.threads or torch.get_num_threads(), quick=args.quick)


def pick_fastest(config: Config, optimizer_rows: list[dict] | None) -> tuple[str, str]:
    """The backend the train_step section times besides reference, and why it is that one."""
    candidates = [b for b in config.backends if b != "reference"]
    if not candidates:
        return "reference", "reference (the only backend asked for)"
    if optimizer_rows:
        largest = max(optimizer_rows, key=lambda r: r["numel"])["params"]
        rows = [r for r in optimizer_rows if r["params"] == largest and r["backend"] in candidates]
        best = min(rows, key=lambda r: r["ms"])["backend"]
        return best, f"{best!r} (the fastest optimizer_step on {largest})"
    auto = backends.resolve("auto", config.device).NAME
    if auto in candidates:
        return auto, f"{auto!r} (what backend='auto' picks)"
    return candidates[0], f"{candidates[0]!r} (the first backend asked for)"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = resolve_config(args, parser)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    machine = machine_info(config.device)
    print(report.machine_text(machine))
    print(f"backends: {', '.join(config.backends)}; sections: {', '.join(config.sections)}; {config.rounds} rounds")
    if config.skipped_sets and "optimizer_step" in config.sections:
        print(f"--quick: parameter sets {', '.join(config.skipped_sets)} skipped (run without --quick for them)")
    print(flush=True)
    result: dict = {"machine": machine, "config": asdict(config)}

    optimizer_rows = train_rows = None
    if "optimizer_step" in config.sections:
        rows, bandwidths = optimizer_step.measure(config.sets, config.backends, config.device, config.rounds,
                                                  config.optimizer_min_run_time, progress)
        result["triad"] = optimizer_step.bandwidth_summary(bandwidths)
        optimizer_rows = result["optimizer_step"] = optimizer_step.to_json(rows, statistics.median(bandwidths))
        print(report.optimizer_step_text(optimizer_rows, result["triad"]) + "\n", flush=True)
        schedule_rows = result["optimizer_step_schedules"] = optimizer_step.schedule_json(
            rows, statistics.median(bandwidths))
        print(report.schedule_steps_text(schedule_rows) + "\n", flush=True)
    if "train_step" in config.sections:
        fastest, why = pick_fastest(config, optimizer_rows)
        rows = train_step.measure(config.models, config.backends, fastest, config.device, config.rounds,
                                  config.train_min_run_time, progress)
        train_rows = result["train_step"] = train_step.to_json(rows)
        result["train_step_fastest_backend"] = fastest
        print(report.train_step_text(train_rows, why) + "\n", flush=True)

    if "sam_step" in config.sections:
        rows = sam_step.measure(config.sets, config.backends, config.device, config.rounds,
                                config.optimizer_min_run_time, progress)
        result["sam_step"] = sam_step.to_json(rows)
        print(sam_step.sam_step_text(result["sam_step"]) + "\n", flush=True)

    if "host" in config.sections:
        rows = host.measure(config.host_sets, config.host_backends, config.device, config.rounds,
                            config.optimizer_min_run_time, progress)
        result["host"] = host.to_json(rows)
        print(host.host_text(result["host"]) + "\n", flush=True)

    if "quality" in config.sections:
        from . import quality  # trains for up to 40 minutes (--quick: a few): only on request

        result["quality"] = quality.bench_section(config.quick, args.cache, args.plot, progress)

    result["wall_seconds"] = time.perf_counter() - started
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        progress(f"wrote {args.json}")
    if args.plot is not None and (optimizer_rows or train_rows):  # quality draws its own plots beside PATH
        report.plot(args.plot, optimizer_rows, train_rows,
                    f"amp_fused benchmarks on {machine['cpu']} ({config.threads} threads, {config.device}), "
                    f"{machine['date']}")
        progress(f"wrote {args.plot}")
    progress("done")
    return 0
