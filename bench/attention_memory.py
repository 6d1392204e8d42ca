"""Memory held after bfloat16 attention on the CPU over rows of ever-new lengths, with and without rounding the
lengths up to a multiple of train.FILL_TO (what train.py's Packing does on a CPU in bf16/fp16: Packing(block=64)).

    python bench/attention_memory.py [--calls 300] [--min-len 100] [--max-len 400] [--dtype bf16]

Each side runs in its own process (what PyTorch keeps is kept for the life of a process): `--calls` rows of
random lengths (seed 0) through Packing.attention, forward and backward, 9 query and 3 key heads of 64 (SmolLM2-
135M's attention). Prints, per side, malloc's bytes in use (mallinfo2) and the resident memory (VmRSS) after the
first call and after the last, and the wall time of the calls. "as they are" is the same code with block 1.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.cpu import cpu_name, rss_gb  # noqa: E402


class MallInfo2(ctypes.Structure):   # glibc's struct mallinfo2, in its field order
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use_gb() -> float:
    """Bytes malloc has handed out and not had back (mallinfo2().uordblks, every arena), in GB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().uordblks / 1e9


def worker(block: int, args) -> dict:
    """One side: `args.calls` rows of random lengths through Packing(block=block).attention."""
    import torch

    import model.llama as llama

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rng, first = random.Random(0), None
    torch.manual_seed(0)
    start = time.perf_counter()
    for call in range(args.calls):
        n = rng.randint(args.min_len, args.max_len)
        q = torch.randn(1, 9, n, 64, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(1, 3, n, 64, dtype=dtype, requires_grad=True) for _ in range(2))
        out = llama.Packing([n], block=block).attention(q, k, v, gqa=True)
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
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)   # the block of one side's process
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)))
        return 0
    from train import FILL_TO

    flags = [f"--calls={args.calls}", f"--min-len={args.min_len}", f"--max-len={args.max_len}", f"--dtype={args.dtype}"]
    print(f"{cpu_name()}; {args.calls} rows of {args.min_len}-{args.max_len} tokens, {args.dtype}, forward + backward")
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
