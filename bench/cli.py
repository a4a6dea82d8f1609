"""Command line of the benchmarks: ``python -m bench [--quick] [--device cuda] ...``.

``run(argv)`` is the whole command (the lead wires it as ``lowrank bench``); it returns the exit
status. See bench/README.md for what is measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time the SGD step with spectral tracking against torch.optim and "
                    "torch.linalg, with the accuracy of every estimate beside its time.")
    p.add_argument("--quick", action="store_true", help="the quick suite (about a minute on 2 CPU cores)")
    p.add_argument("--suite", choices=("full", "quick"), default=None,
                   help="suite to run (default full; --quick means --suite quick)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--out-dir", type=Path, default=results.RESULTS_DIR,
                   help="where the CSV, TABLE.md and the plot go (default bench/results)")
    p.add_argument("--providers", default="",
                   help="comma-separated glob patterns of providers to run (anchors always run)")
    p.add_argument("--workloads", default="",
                   help="comma-separated glob patterns of workloads (matrix, mlp, gpt2, resnet, "
                        "digits) or of group ids (see --list), e.g. '2048x2048/*'")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=30, help="tracked steps before the accuracy check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="do not write TABLE.md and the plot")
    p.add_argument("--list", action="store_true", help="print the groups of the suite and exit")
    return p


def run(argv=None) -> int:
    args = parser().parse_args(argv)
    suite = args.suite or ("quick" if args.quick else "full")
    if args.quick and args.suite == "full":
        raise SystemExit("--quick contradicts --suite full")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    from .suites import groups_of, run_suite

    if args.list:
        for g in groups_of(device.type, suite):
            print(g.id)
        return 0
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    rows, path = run_suite(device, suite, out_dir=args.out_dir, providers=split(args.providers),
                           workloads=split(args.workloads), warmup=args.warmup, seed=args.seed)
    if not args.no_report:
        from . import report

        df = results.read_rows([path])
        df = df[df["run_id"] == rows[0]["run_id"]]
        for written in report.write_report(df, args.out_dir):
            print(f"wrote {written}")
    return 0


def main() -> None:
    raise SystemExit(run())
