"""What the CPU can compute natively, read from /proc/cpuinfo, and the compute dtype that follows.

torch.backends.cpu.get_cpu_capability() names the widest vector ISA ("AVX512" even on a CPU with
AMX), not whether bf16 arithmetic is native, so the flags are read directly: bf16 matrix products
are native with `amx_bf16` (AMX tiles) or `avx512_bf16` (AVX512-BF16 dot products). Without them
torch emulates bf16 through float32 conversions, several times slower than float32 itself (a
QLoRA step of SmolLM2-135M on a 2-core EPYC: 297 s in bf16 against 27 s in fp32).
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo); empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_native_bf16(flags=None) -> bool:
    """True where the CPU multiplies bf16 natively (amx_bf16 or avx512_bf16 among its flags)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def compute_dtype(request: str, device, *, flags=None, warn=None) -> torch.dtype:
    """The compute dtype for `request` ("auto", "bf16" or "fp32") on `device`.

    auto: bf16 on a CUDA device that supports it, and on a CPU with native bf16; fp32 otherwise.
    bf16 asked for on a CPU without native bf16 is kept, with a one-line warning (through `warn`,
    default: stderr) that it is emulated and far slower than fp32.
    """
    device = torch.device(device)
    if request == "fp32":
        return torch.float32
    if device.type == "cuda":
        if request == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16
    native = cpu_native_bf16(flags)
    if request == "auto":
        return torch.bfloat16 if native else torch.float32
    if request != "bf16":
        raise ValueError(f"unknown dtype request {request!r} (auto, bf16, fp32)")
    if not native:
        (warn or (lambda m: print(m, file=sys.stderr)))(
            "warning: bf16 on a CPU without native bf16 (no amx_bf16/avx512_bf16 flag) is emulated and several "
            "times slower than fp32 (--dtype fp32 or auto)")
    return torch.bfloat16


def rss_gb() -> float:
    """This process's resident memory now, in GB (/proc/self/statm; 0.0 where there is none). ru_maxrss is the
    peak; this is the current value, which can fall."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


@lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def malloc_stats() -> dict[str, int]:
    """glibc's mallinfo2() over every arena, in bytes and counts ({} without glibc): "uordblks" is what malloc has
    handed out and not had back, "hblks"/"hblkhd" the blocks (and bytes) that have a mapping of their own, "arena"
    the heap's size. For benchmarks and tests of the memory below."""
    import ctypes

    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(n, ctypes.c_size_t) for n in names]})
    info = libc.mallinfo2()
    return {n: getattr(info, n) for n in names}


KERNEL_CACHE = 64   # oneDNN primitives kept (its default: 1024)


def limit_kernel_cache(capacity: int = KERNEL_CACHE) -> None:
    """Keep oneDNN's cache of compiled kernels ("primitives", one per operation and tensor shape) to `capacity`
    entries, unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set already; call before the first matrix product (oneDNN
    reads the variable once, at its first use). Packed micro-batches come in many token counts (train.py rounds them
    to multiples of 64: up to --micro-batch-tokens / 64 of them), each with its own kernels, and the default cache
    keeps 1,024 of them; a step of one shape reuses its layers' kernels (about 30 distinct ones), which 64 hold
    (bench/train_memory.py --max-steps 24 --eval-every 2, Walmart-Amazon rows, on the code before the rounding,
    10ab490, with ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 and 64: resident memory +61% and +34% over 13 validations,
    205 s both)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


MMAP_THRESHOLD = 4 * 2**20   # bytes: blocks this large or larger get their own mapping (map_large_blocks)


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc's malloc give every block of `threshold` bytes or more its own mapping, handed back to the OS the
    moment it is freed (mallopt M_MMAP_THRESHOLD; glibc's own rule raises the threshold up to 32 MB as blocks are
    freed, so activations of 1-32 MB live in the heap). True when set; nothing is done where the environment sets
    MALLOC_MMAP_THRESHOLD_ (that choice stands: 33554432 is glibc's own ceiling) or without glibc.

    Why: a CPU training step frees and allocates activations of a few MB by the thousand; with glibc's own rule
    they live in the heap, where they land depends on what the steps before left, and a step's peak stepped up now
    and then. Mapped on their own they leave no such history: bench/train_memory.py (the README's 200-step command, 2,304 Walmart-Amazon rows,
    bf16): peak 2.56 -> 2.75 GB in 891 s; a fixed threshold of 32 MB instead (MALLOC_MMAP_THRESHOLD_=33554432): 3.15
    -> 3.18 GB in 852 s."""
    libc = _glibc()
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(-3, threshold))   # M_MMAP_THRESHOLD in malloc.h


def release_free_memory() -> None:
    """Hand back to the OS the memory glibc's malloc still holds after torch freed it: malloc_trim(0) (no-op
    without glibc). A CPU training step frees about as much as it allocates (activations, dequantized weights),
    and glibc keeps what is freed in its heap, fragmented: without a trim the resident memory after a step and the
    peak during the next one drift up step by step. train.py trims after every step and every validation on a CPU
    (a trim after every step cost a third of the throughput while kernels piled up; with the shapes bounded,
    train.FILL_TO and model.llama.pad_to_block, the runs that trim after every step are faster than before: the
    README's bench/train_memory.py figures)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
