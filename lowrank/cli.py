"""The ``lowrank`` command line: demo, report, bench, estimate."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(argv) -> int:
    from . import demo

    return demo.main(argv)


def _cmd_report(argv) -> int:
    parser = argparse.ArgumentParser(prog="lowrank report",
                                     description="Plot the spectra of a run directory and print a summary table.")
    parser.add_argument("run_dir", help="a run directory written by lowrank.RunLog")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    from .report import make_report

    try:
        paths, table = make_report(args.run_dir, args.out)
    except FileNotFoundError as exc:
        print(f"lowrank report: {exc}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {len(paths)} plots to {paths[0].parent}")
    return 0


def _cmd_bench(argv) -> int:
    from pathlib import Path

    # bench/ sits beside lowrank/ in a source checkout (it is not installed).
    root = Path(__file__).resolve().parent.parent
    if (root / "bench" / "cli.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from bench.cli import run
    except ImportError:
        print("lowrank bench: run it from a source checkout (the bench/ folder is not installed)",
              file=sys.stderr)
        return 2
    return run(argv)


def _cmd_estimate(argv) -> int:
    parser = argparse.ArgumentParser(prog="lowrank estimate",
                                     description="Top-k singular values of matrices saved with torch.save, "
                                                 "estimated and (with --exact) checked against torch.linalg.")
    parser.add_argument("path", help="a .pt file holding a tensor or a state dict")
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--exact", action="store_true", help="also compute exact float64 svdvals")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"-k must be >= 1, got {args.k}")
    import torch

    from .oneshot import svdvals
    from .sketch import as_batched

    try:
        obj = torch.load(args.path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:  # missing, not a torch file
        print(f"lowrank estimate: cannot load {args.path}: {exc}", file=sys.stderr)
        return 2
    items = obj.items() if isinstance(obj, dict) else [("tensor", obj)]
    for name, t in items:
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or not t.is_floating_point():
            continue
        W = as_batched(t)[0]
        k = min(args.k, *W.shape)
        est = svdvals(W, k)
        line = f"{name} {tuple(W.shape)}: " + " ".join(f"{v:.5g}" for v in est.tolist())
        if args.exact:
            exact = torch.linalg.svdvals(W.double())[:k]
            line += f"   max rel err {float(((est - exact).abs() / exact[0]).max()):.2e}"
        print(line)
    return 0


COMMANDS = {
    "demo": (_cmd_demo, "train small ReLU nets and show SGD + weight decay lowering rank"),
    "report": (_cmd_report, "plot the spectra of a run directory and print a summary"),
    "bench": (_cmd_bench, "benchmarks against torch.linalg and torch.optim (source checkout)"),
    "estimate": (_cmd_estimate, "one-shot top-k singular values of saved tensors"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lowrank COMMAND [ARGS]\n\nTrack singular-value spectra of weight matrices.\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<10}{doc}")
        print("\n`lowrank COMMAND --help` describes each command.")
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"lowrank: unknown command {argv[0]!r} (see lowrank --help)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
