"""Resident memory of a training run at each validation pass: does it stay flat, or climb?

    python bench/train_memory.py --model MODEL --dataset ROWS --tasks TASK [--code DIR ...] [-- TRAIN FLAGS]

Runs train.py (of this checkout, and of each --code DIR, another checkout such as an older commit's `git worktree`)
as a child process with the same flags (default: NF4, 48 steps of 8 rows, validation every 4 steps on 100 rows:
13 validation passes), and reads the child's /proc/PID/status each time it prints a validation line: VmRSS (the
memory it holds now) and VmHWM (the peak so far, what train.py's `mem` shows). Prints one table per checkout and
the growth from the second validation to the last, and the run's wall time; with --out, writes the figures as
JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.cpu import cpu_name  # noqa: E402

DEFAULT_FLAGS = ["--quant", "nf4", "--batch-size", "8", "--max-steps", "48", "--eval-every", "4", "--val-size", "100",
                 "--save-every", "1000", "--micro-batch-tokens", "4096", "--seed", "0", "--no-progress",
                 "--log-every", "1000", "--cache-dir", ""]
VAL_LINE = re.compile(r"^step (\d+): val loss")


def status_gb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in GB, from /proc/PID/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e9   # kB
    return fields["VmRSS"], fields["VmHWM"]


def measure(code: Path, argv: list[str]) -> tuple[list[dict], float]:
    """([{step, rss_gb, peak_gb}] at each validation line, wall seconds) of one train.py run of the checkout `code`."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-u", str(code / "train.py"), *argv, "--out", str(Path(tmp) / "run")],
                                cwd=code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        points = []
        for line in proc.stdout:
            if m := VAL_LINE.match(line.strip()):
                rss, peak = status_gb(proc.pid)
                points.append({"step": int(m.group(1)), "rss_gb": round(rss, 3), "peak_gb": round(peak, 3)})
        if proc.wait() != 0:
            raise SystemExit(f"train.py of {code} failed (exit {proc.returncode})")
    return points, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--tasks", required=True)
    p.add_argument("--code", action="append", default=[], type=Path,
                   help="another checkout whose train.py to measure too (repeatable), e.g. a worktree of an older commit")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    p.add_argument("train_flags", nargs="*", help="after --: train.py flags replacing the defaults")
    args = p.parse_args(argv)
    flags = ["--model", args.model, "--dataset", str(Path(args.dataset).resolve()), "--tasks", args.tasks,
             *(args.train_flags or DEFAULT_FLAGS)]
    results = {}
    for code in [*args.code, ROOT]:
        points, seconds = measure(code.resolve(), flags)
        results[str(code)] = {"points": points, "seconds": round(seconds, 1)}
        print(f"\n{code} ({len(points)} validation passes, {seconds:.0f} s):")
        print(f"{'step':>6} {'RSS now (GB)':>13} {'peak (GB)':>10}")
        for pt in points:
            print(f"{pt['step']:>6} {pt['rss_gb']:>13.2f} {pt['peak_gb']:>10.2f}")
        if len(points) > 1:
            first, last = points[1], points[-1]   # after the first pass, which sets the working size
            print(f"from the 2nd validation to the last: RSS {last['rss_gb'] / first['rss_gb'] - 1:+.0%}, "
                  f"peak {last['peak_gb'] / first['peak_gb'] - 1:+.0%}")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "flags": flags, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
