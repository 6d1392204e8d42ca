"""The benchmarks keep working: bench/generate_throughput.py and bench/train_throughput.py on the
tiny random model, every side in its own process, and bench/attention_memory.py on a few rows, in seconds (the
figures themselves mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # each runs a benchmark script end to end

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_throughput_smoke(tmp_path, capsys):
    pytest.importorskip("transformers")
    script = load_script("generate_throughput")
    assert script.main(["--tiny", "--n", "5", "--max-new-tokens", "6", "--batch-sizes", "1,3", "--repeats", "2",
                        "--threads", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| tiny (random) | 3 | ours |" in printed and "identical rows" in printed
    lines = json.loads((tmp_path / "results.json").read_text())
    assert [line["batch_size"] for line in lines] == [1, 3]
    for line in lines:
        assert line["identical_rows"] == line["prompts"] == 5          # greedy ids agree with transformers
        assert line["ours"]["tokens"] == line["peer"]["tokens"] > 0
        assert line["ratio_tokens_per_s"] > 0 and len(line["ours"]["seconds"]["values"]) == 2
        assert line["ours"]["memory_kind"] == "peak RSS" and line["peer"]["peak_memory_gib"] > 0


def test_generate_throughput_runs_evaluates_workload(tmp_path, capsys):
    """--workload: every 8th test row of every task and setting, each capped as evaluate.py caps its task."""
    pytest.importorskip("transformers")
    script = load_script("generate_throughput")
    sample = ROOT / "data" / "sample" / "ecinstruct_sample.jsonl"
    assert script.main(["--tiny", "--workload", str(sample), "--every", "8", "--max-new-tokens", "5,PM=2,SR=3",
                        "--batch-sizes", "4", "--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
                        "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "evaluate.py's workload: 1 in 8 of the test rows" in printed and "in prefixes shared" in printed
    assert script.shared_prefix_tokens([[1, 2, 3], [5], [1, 2, 4], [1, 2], [1, 2]]) == 1 + 2 + 2 + 0
    (line,) = json.loads((tmp_path / "results.json").read_text())
    from data import load_rows
    rows = load_rows(sample, split="test", tasks="all", settings=None)[::8]
    assert line["prompts"] == len(rows) == 14 and line["identical_rows"] == line["prompts"]
    caps = [2 if r["task"] == "Product_Matching" else 3 if r["task"] == "Sequential_Recommendation" else 5
                      for r in rows]
    assert line["ours"]["tokens"] <= sum(caps) and line["ours"]["tokens"] == line["peer"]["tokens"]


def test_train_throughput_smoke(tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    script = load_script("train_throughput")
    assert script.main(["--tiny", "--n", "3", "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu",
                        "--dtype", "fp32", "--out", str(tmp_path)]) == 0
    assert "ours/peer tokens/s" in capsys.readouterr().out
    (line,) = json.loads((tmp_path / "results.json").read_text())
    ours, peer = line["ours"], line["peer"]
    assert line["rows"] == 3 and ours["tokens"] == peer["tokens"] == line["tokens"]
    assert ours["trainable_parameters"] == peer["trainable_parameters"]  # the same adapter on both sides
    assert abs(ours["losses"][0] - peer["losses"][0]) < 1e-3 * peer["losses"][0]   # B = 0: the NF4 base's loss
    assert all(math.isfinite(l) for l in ours["losses"] + peer["losses"])
    assert line["ratio_tokens_per_s"] > 0 and line["ratio_peak_memory"] > 0


def test_attention_memory_smoke(capsys):
    """bench/attention_memory.py: both sides run (each in its own process) and print their line."""
    assert load_script("attention_memory").main(["--calls", "3", "--min-len", "20", "--max-len", "40"]) == 0
    out = capsys.readouterr().out
    assert "as they are" in out and "rounded up to 64" in out
