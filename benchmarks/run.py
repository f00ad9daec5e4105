"""Run the benchmarks: ``python -m benchmarks.run [--only NAME[,NAME]] [--quick]``.

Each benchmark prints its rows (with ratios) and appends them to ``benchmarks/results.csv``
as soon as it finishes, so an interrupted suite keeps what it measured. A benchmark that fails
gets an ``error`` row naming the exception, its traceback is printed, the others still run,
and the process exits with status 1.

Examples:
    OMP_NUM_THREADS=1 python -m benchmarks.run --only collector_throughput
    OMP_NUM_THREADS=1 python -m benchmarks.run --quick --csv /tmp/x.csv
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
import traceback

import torch

from benchmarks import DEFAULT_CSV, Row, append_rows, format_row

#: benchmark name -> module (each has ``run(quick=..., workdir=...) -> list[Row]``)
BENCHMARKS: dict[str, str] = {
    "collector_throughput": "benchmarks.bench_collector",
    "ppo_vs_sb3": "benchmarks.bench_ppo_sb3",
    "maml_vs_fomaml": "benchmarks.bench_maml",
    "method_sps": "benchmarks.bench_methods",
    "batched_env": "benchmarks.bench_batched",
    "checkpoint_overhead": "benchmarks.bench_checkpoint",
    "ddp": "benchmarks.bench_ddp",
}


def parse_only(values: list[str] | None) -> list[str]:
    """Benchmark names from repeated/comma-separated ``--only`` values (all if none)."""
    if not values:
        return list(BENCHMARKS)
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for n in names:
        if n not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {n!r}; allowed: {', '.join(BENCHMARKS)}")
    return names


def command_line(argv: list[str]) -> str:
    """The command as a user would retype it (recorded in every CSV row)."""
    env = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
        if "OMP_NUM_THREADS" in os.environ
        else ""
    )
    return f"{env}python -m benchmarks.run {shlex.join(argv)}".strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", help="benchmark name(s), comma-separated")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes (smoke test, not a measurement)"
    )
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="results file to append to")
    p.add_argument("--workdir", default=None, help="folder for temporary training runs")
    p.add_argument("--list", action="store_true", help="list the benchmark names and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    try:
        names = parse_only(args.only)
    except ValueError as e:
        p.error(str(e))
    # one thread: the cores are shared, and thread start-up would dominate these tiny MLPs
    torch.set_num_threads(1)
    command = command_line(argv)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name} {'(quick)' if args.quick else ''}", flush=True)
        mod = importlib.import_module(BENCHMARKS[name])
        try:
            rows = mod.run(quick=args.quick, workdir=args.workdir)
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            # keep the rows a benchmark measured before failing, then the error itself
            rows = list(getattr(e, "rows", [])) + [
                Row(name, "error", None, notes=f"failed: {type(e).__name__}: {e}")
            ]
        if args.quick:
            for r in rows:
                r.notes = f"QUICK (smoke sizes, not a measurement); {r.notes}"
        append_rows(args.csv, rows, command=command)
        for r in rows:
            print(format_row(r), flush=True)
        print(
            f"== {name}: {time.perf_counter() - t0:.1f} s, rows appended to {args.csv}", flush=True
        )
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
