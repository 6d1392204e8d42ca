"""Kill train.py at random moments and in the middle of its writes; every resume must be bit-equal.

    python tests/kill_trial.py --kills 20            # about 3-5 minutes on 2 CPU cores
    python tests/kill_trial.py --kills 50 --seed 7 --keep trial-out

A tiny random Llama (tests/tiny.py) is trained on CPU for --steps optimizer steps with a checkpoint
after every step, validation every 2 steps and dropout on. First one uninterrupted run, the
reference. Then trial runs in another folder, each started with `--resume auto` and SIGKILLed:
- at a random moment of its training (uniform over the reference's training time, from the moment
  it starts its loop), or
- while a write is in progress: as soon as a temporary name appears (a checkpoint being written,
  the adapter or best/ being replaced, a log or config rewritten, the loss curve being drawn).
Each killed run is started again at once (the folder lock must be free) until it finishes; a
finished trial is compared with the reference and a fresh trial starts while kills remain.

Passes when every finished trial equals the reference bit for bit: each step's loss and gradient
norm, each validation loss, every step logged exactly once, the final and best adapters, and every
kept checkpoint's adapter and optimizer state; and when no resume ever had to skip a damaged
checkpoint. Exit code 0 on a pass, 1 otherwise. Not collected by pytest (the name has no test_ prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from test_train import write_rows  # noqa: E402
from tiny import write_tiny_model  # noqa: E402


def train_argv(model: Path, rows: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "train.py", "--model", str(model), "--dataset", str(rows), "--quant", "none",
            "--batch-size", "8", "--cutoff", "512", "--micro-batch-tokens", "1024", "--val-size", "8",
            "--cache-dir", "", "--seed", "3", "--no-progress", "--max-steps", str(steps), "--save-every", "1",
            "--keep-last", "2", "--eval-every", "2", "--out", str(out), "--resume", "auto"]


def logged_steps(out: Path) -> int:
    try:
        return sum(1 for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def write_in_progress(out: Path) -> str | None:
    """The first temporary name found in the run folder (a write under way), or None."""
    for folder in (out, out / "checkpoints", out / "adapter", out / "best"):
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith((".tmp-", ".old-")) or (name.startswith(".") and name.endswith(".tmp")):
                        return str(Path(entry.path).relative_to(out))
        except OSError:
            continue
    return None


def training_started(log: Path) -> int:
    """How many runs logged in `log` have reached their training loop (train.py prints where it starts)."""
    try:
        return sum(line.startswith(("writing to ", "resumed from ")) for line in log.read_text().splitlines())
    except OSError:
        return 0


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    f = open(log, "a")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def compare(reference: Path, trial: Path) -> list[str]:
    """Differences between two finished runs (empty: bit-equal)."""
    problems = []
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]
    a, b = read(reference / "train_log.jsonl"), read(trial / "train_log.jsonl")
    if [r["step"] for r in b] != [r["step"] for r in a]:
        problems.append(f"steps logged {[r['step'] for r in b]} != {[r['step'] for r in a]}")
    for x, y in zip(a, b):
        if (x["loss"], x["grad_norm"], x["lr"]) != (y["loss"], y["grad_norm"], y["lr"]):
            problems.append(f"step {x['step']}: loss/grad_norm/lr {y['loss']}/{y['grad_norm']}/{y['lr']} != "
                            f"{x['loss']}/{x['grad_norm']}/{x['lr']}")
    va, vb = read(reference / "val_log.jsonl"), read(trial / "val_log.jsonl")
    if [(r["step"], r["val_loss"]) for r in va] != [(r["step"], r["val_loss"]) for r in vb]:
        problems.append("val_log differs")
    folders = ["adapter", "best"] + [f"checkpoints/{p.name}/adapter" for p in (reference / "checkpoints").glob("step-*")]
    for folder in folders:
        ta, tb = load_file(str(reference / folder / "adapter_model.safetensors")), \
            load_file(str(trial / folder / "adapter_model.safetensors"))
        if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
            problems.append(f"{folder} differs")
    for ckpt in (reference / "checkpoints").glob("step-*"):
        sa = torch.load(ckpt / "state.pt", weights_only=True)
        sb = torch.load(trial / "checkpoints" / ckpt.name / "state.pt", weights_only=True)
        for k, v in sa["optimizer"]["state"].items():
            if any(not torch.equal(v[n], sb["optimizer"]["state"][k][n]) for n in v if torch.is_tensor(v[n])):
                problems.append(f"{ckpt.name}: optimizer state differs")
                break
        if (sa["step"], sa["epoch"], sa["step_in_epoch"]) != (sb["step"], sb["epoch"], sb["step_in_epoch"]):
            problems.append(f"{ckpt.name}: position differs")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments (default: %(default)s)")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kill-trial-"))
    work.mkdir(parents=True, exist_ok=True)
    model, rows = write_tiny_model(work / "model"), write_rows(work / "rows.jsonl")

    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    t0 = time.perf_counter()
    proc = start(train_argv(model, rows, reference, args.steps), work / "reference.log")
    while training_started(work / "reference.log") == 0 and proc.poll() is None:
        time.sleep(0.01)
    t_first = time.perf_counter()
    if proc.wait() != 0:
        print(f"the reference run failed: see {work / 'reference.log'}")
        return 1
    training_s = time.perf_counter() - t_first
    print(f"reference: {args.steps} steps, {time.perf_counter() - t0:.1f} s ({training_s:.1f} s of training)")

    kills, trials, failures = [], 0, []
    while len(kills) < args.kills:
        trials += 1
        out = work / f"trial-{trials}"
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"trial-{trials}.log"
        while True:
            started = training_started(log)
            proc = start(train_argv(model, rows, out, args.steps), log)
            mode = "write" if len(kills) % 2 else "random"
            while training_started(log) == started and proc.poll() is None:   # wait until it trains
                time.sleep(0.005)
            if mode == "random":
                deadline = time.perf_counter() + rng.uniform(0, training_s)
                while time.perf_counter() < deadline and proc.poll() is None:
                    time.sleep(0.005)
                writing = write_in_progress(out)
            else:
                writing = None
                while writing is None and proc.poll() is None:
                    writing = write_in_progress(out)
            if proc.poll() is not None or len(kills) >= args.kills:
                if proc.wait() != 0:
                    failures.append(f"trial {trials}: train.py exited {proc.returncode} (see {log})")
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append((trials, mode, logged_steps(out), writing))
            print(f"kill {len(kills):>3}: trial {trials}, {mode:<6} at step {logged_steps(out):>3}"
                  + (f", during a write ({writing})" if writing else ""), flush=True)
        if proc.returncode == 0:
            text = log.read_text()
            if "cannot load" in text or "Traceback" in text:
                failures.append(f"trial {trials}: a resume met a damaged checkpoint or a traceback (see {log})")
            problems = compare(reference, out)
            failures += [f"trial {trials}: {x}" for x in problems]
            print(f"trial {trials}: finished after {sum(1 for k in kills if k[0] == trials)} kill(s) and resume(s); "
                  + ("bit-equal to the reference" if not problems else "DIFFERS: " + "; ".join(problems)), flush=True)
    during = sum(1 for k in kills if k[3])
    print(f"{len(kills)} kills ({during} during a write) over {trials} trial run(s): "
          + ("every resume bit-equal to the uninterrupted run: PASS" if not failures else "FAIL"))
    for f in failures:
        print("  " + f)
    if not args.keep and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
