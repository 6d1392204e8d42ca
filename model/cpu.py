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


KERNEL_CACHE = 64   # oneDNN primitives kept (its default: 1024)


def limit_kernel_cache(capacity: int = KERNEL_CACHE) -> None:
    """Keep oneDNN's cache of compiled kernels ("primitives", one per operation and tensor shape) to `capacity`
    entries, unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set already; call before the first matrix product (oneDNN
    reads the variable once, at its first use). Packed micro-batches give every step a new token count, so every
    step compiles new kernels and the default cache of 1024 keeps filling with shapes that never come back
    (bench/train_memory.py, 24 steps, 13 validations: resident memory after each validation +61% from the second to
    the last with 1024 entries, +34% with 64, at the same speed: 205 s and 204 s). A step of one shape reuses its
    layers' kernels (about 30 distinct ones), which 64 entries hold."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def release_free_memory() -> None:
    """Hand back to the OS the memory glibc's malloc still holds after torch freed it: malloc_trim(0) (no-op
    without glibc). A CPU training step allocates tensors of sizes that change with every packed micro-batch;
    glibc serves them from its heaps and arenas and keeps what is freed there, fragmented, so a process's RSS
    climbs step after step and validation after validation without any live tensor more (bench/train_memory.py:
    4.08 GB held after 33 steps of the sample without a trim, 1.72 GB with one after every step; train.py trims
    after each validation only, since a trim after every step cost a third of its throughput)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
