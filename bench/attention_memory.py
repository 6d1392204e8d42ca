"""Memory held after bfloat16 kernels on the CPU over ever-new lengths, with and without rounding the lengths up to
a multiple of train.FILL_TO (what train.py does on a CPU in bf16/fp16: Packing(block=64), the filler row).

    python bench/attention_memory.py [--op attention|linear] [--calls 300] [--min-len 100] [--max-len 400]
                                     [--dtype bf16|fp16|fp32]

Each side runs in its own process (what PyTorch keeps is kept for the life of a process): `--calls` random lengths
(seed 0), forward and backward, through Packing.attention (--op attention: a row of that many tokens, 9 query and 3
key heads of 64, SmolLM2-135M's attention) or a linear layer (--op linear: that many tokens, 576 -> 1536). Prints,
per side, malloc's bytes in use (mallinfo2) and the resident memory (VmRSS) after the first call and after the last,
and the wall time of the calls. "as they are" is the same code with block 1.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.cpu import cpu_name, malloc_stats, rss_gb  # noqa: E402


def malloc_in_use_gb() -> float:
    """What malloc has handed out and not had back (mallinfo2's uordblks, every arena), in GB."""
    return malloc_stats().get("uordblks", 0) / 1e9


def worker(block: int, args) -> dict:
    """One side: `args.calls` random lengths through Packing(block=block).attention (--op attention: one row of that
    many tokens) or through a linear layer (--op linear: that many tokens, 576 -> 1536, SmolLM2-135M's up_proj),
    forward and backward; with block > 1 the lengths rounded up to a multiple of it first (what train.py's filler
    row does for a micro-batch's tokens)."""
    import torch
    import torch.nn.functional as F

    import model.llama as llama

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rng, first = random.Random(0), None
    torch.manual_seed(0)
    weight = torch.randn(1536, 576, dtype=dtype)
    start = time.perf_counter()
    for call in range(args.calls):
        n = rng.randint(args.min_len, args.max_len)
        if args.op == "attention":
            q = torch.randn(1, 9, n, 64, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(1, 3, n, 64, dtype=dtype, requires_grad=True) for _ in range(2))
            out = llama.Packing([n], block=block).attention(q, k, v, gqa=True)
        else:
            x = torch.randn(-(-n // block) * block, 576, dtype=dtype, requires_grad=True)
            out = F.linear(x, weight)
        out.float().square().sum().backward()
        if call == 0:
            first = {"in_use_gb": malloc_in_use_gb(), "rss_gb": rss_gb()}
    return {"block": block, "first": first, "last": {"in_use_gb": malloc_in_use_gb(), "rss_gb": rss_gb()},
            "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--op", choices=["attention", "linear"], default="attention",
                   help="attention: rows of that many tokens; linear: micro-batches of that many tokens")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)   # the block of one side's process
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)))
        return 0
    from train import FILL_TO

    flags = [f"--calls={args.calls}", f"--min-len={args.min_len}", f"--max-len={args.max_len}", f"--dtype={args.dtype}",
             f"--op={args.op}"]
    print(f"{cpu_name()}; {args.op}: {args.calls} calls of {args.min_len}-{args.max_len} tokens, {args.dtype}, "
          "forward + backward")
    print(f"{'lengths':<22} {'in use: first -> last (GB)':>28} {'RSS: first -> last (GB)':>26} {'seconds':>8}")
    for label, block in (("as they are", 1), (f"rounded up to {FILL_TO}", FILL_TO)):
        line = subprocess.run([sys.executable, __file__, *flags, f"--worker={block}"], check=True, text=True,
                              capture_output=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        print(f"{label:<22} {r['first']['in_use_gb']:>12.3f} -> {r['last']['in_use_gb']:.3f} "
              f"{r['first']['rss_gb']:>14.3f} -> {r['last']['rss_gb']:.3f} {r['seconds']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
