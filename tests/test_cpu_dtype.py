"""model/cpu.py: the compute dtype follows the CPU's bf16 flags, not get_cpu_capability(); large blocks mapped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from model.cpu import compute_dtype, cpu_flags, cpu_native_bf16

EPYC = frozenset("fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni".split())   # AVX512 but no bf16
SAPPHIRE = EPYC | {"amx_bf16", "amx_tile", "avx512_bf16"}
ROOT = Path(__file__).resolve().parents[1]


def test_flags_decide_bf16():
    assert not cpu_native_bf16(EPYC)
    assert cpu_native_bf16(SAPPHIRE) and cpu_native_bf16(EPYC | {"avx512_bf16"}) and cpu_native_bf16({"amx_bf16"})
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():   # the flags of the first flags line, read here independently
        line = next((l for l in cpuinfo.read_text(errors="replace").splitlines()
                     if l.split(":")[0].strip() in ("flags", "Features")), "")
        assert cpu_flags() == frozenset(line.partition(":")[2].split()) and (cpu_flags() or not line)


def test_auto_and_explicit_requests_on_cpu():
    said = []
    assert compute_dtype("auto", "cpu", flags=EPYC, warn=said.append) == torch.float32
    assert compute_dtype("auto", "cpu", flags=SAPPHIRE, warn=said.append) == torch.bfloat16
    assert compute_dtype("fp32", "cpu", flags=SAPPHIRE, warn=said.append) == torch.float32
    assert compute_dtype("bf16", "cpu", flags=SAPPHIRE, warn=said.append) == torch.bfloat16 and said == []
    assert compute_dtype("bf16", "cpu", flags=EPYC, warn=said.append) == torch.bfloat16   # kept, but said once
    assert len(said) == 1 and "\n" not in said[0] and "bf16" in said[0]


def test_train_uses_it(tmp_path, capsys):
    import train

    args = ["--model", "smollm2-135m", "--dtype", "auto", "--out", str(tmp_path / "run"), "--print-config"]
    assert train.main(args) == 0
    config = __import__("json").loads(capsys.readouterr().out)
    expected = compute_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert config["dtype"] == str(expected).removeprefix("torch.")


MAPPED_AFTER = """
import sys
import torch
from model.cpu import malloc_stats, map_large_blocks
done = map_large_blocks() if sys.argv[1] == "set" else None
x = torch.empty(5 << 20, dtype=torch.uint8)
del x                                       # freed: glibc's own threshold rises past 5 MB
before = malloc_stats()["hblks"]
y = torch.empty(5 << 20, dtype=torch.uint8)
print(done, malloc_stats()["hblks"] - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("mode, env, expected", [("none", {}, "None 0"), ("set", {}, "True 1"),
                                                 ("set", {"MALLOC_MMAP_THRESHOLD_": "33554432"}, "False 0")])
def test_map_large_blocks_gives_a_5_mb_block_its_own_mapping(mode, env, expected):
    """After map_large_blocks, a 5 MB tensor allocated after another was freed gets a mapping of its own (glibc alone
    puts it in the heap); a MALLOC_MMAP_THRESHOLD_ in the environment stands. In a fresh process: mallopt is global."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", MAPPED_AFTER, mode], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout.split("\n")[-2]
    assert out == expected
