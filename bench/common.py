"""What the two peer benchmarks share: weights both sides load, prompts and rows, one subprocess per
measurement, timing statistics and peak memory.

Each measurement runs in a subprocess of its own (`python bench/<script>.py --worker SPEC.json`),
so one side's peak RSS never mixes with the other's and each starts from a cold process.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: `import model`, `import lora`

import torch  # noqa: E402

SAMPLE_ROWS = ROOT / "data" / "sample" / "ecinstruct_sample.jsonl"
CUDA_PRESETS = ("smollm2-360m", "smollm2-1.7b", "llama3.2-1b")


# ---- weights both sides load ------------------------------------------------------------------------

def hub_folder_from_gguf(gguf: str | Path, folder: Path) -> Path:
    """The GGUF dequantized to float32 in hub layout (config.json, model.safetensors, tokenizer files)."""
    from lora import export_merged
    from model import load_model

    model, tokenizer = load_model(gguf)
    export_merged(model, tokenizer, folder, dtype=torch.float32)
    return folder


def random_hub_folder(preset: str, folder: Path, *, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A preset's released configuration with random weights (std 0.02, norms 1), in hub layout, no tokenizer."""
    from lora import export_merged
    from model import PRESETS, Llama, ModelConfig

    config = ModelConfig(**PRESETS[preset][1])
    torch.manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    export_merged(model, None, folder, dtype=dtype)
    return folder


def tiny_hub_folder(folder: Path) -> Path:
    """The tests' tiny random Llama (tests/tiny.py): what the CPU smoke test runs on."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import write_tiny_model

    return write_tiny_model(folder, seed=0)


def load_ours(folder: Path, dtype, device):
    """Our Llama from a hub folder (the tokenizer is not needed: prompts travel as ids)."""
    from model import ModelConfig, build_model, read_safetensors

    config = ModelConfig.from_json(folder / "config.json")
    return build_model(config, read_safetensors(folder), dtype=dtype, device=device).eval()


def default_gguf() -> Path:
    from model.gguf import packaged_smollm2

    return packaged_smollm2()


def bench_models(args, tmp: Path, dtype):
    """(label, hub-layout folder, tokenizer) of each model a benchmark measures: --tiny, each of --preset
    (random weights in `dtype`), else --model or the offline SmolLM2 GGUF (dequantized to a folder in `tmp`)."""
    if args.tiny:
        folder = tiny_hub_folder(tmp / "tiny")
        yield "tiny (random)", folder, tokenizer_for(folder, None)
    elif args.preset:
        for preset in args.preset.split(","):
            folder = random_hub_folder(preset, tmp / preset, dtype=dtype)
            yield f"{preset} (random)", folder, tokenizer_for(folder, None)
    else:
        source = Path(args.model) if args.model else default_gguf()
        folder = hub_folder_from_gguf(source, tmp / "hub") if source.suffix == ".gguf" else source
        yield source.stem, folder, tokenizer_for(folder, None)


def run_peer_bench(args, *, worker, measure, report, dtype_name, dtypes: dict) -> int:
    """main() of the benchmarks that measure ours beside a peer (train_throughput, generate_throughput): with
    --worker SPEC this process is one side's worker; else each model of bench_models is measured in the dtype
    dtype_name(args, device) names (a key of `dtypes`): measure(label, folder, tokenizer, args, device, name) -> its
    table lines, each side in a worker; the report is printed (and written, with --out)."""
    if args.worker:
        worker(args.worker)
        return 0
    device = pick_device(args.device)
    name = dtype_name(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        lines = [line for label, folder, tokenizer in bench_models(args, Path(tmp), dtypes[name])
                 for line in measure(label, folder, tokenizer, args, device, name)]
    publish_report(report(lines, args, name), lines, args.out)
    return 0


def publish_report(text: str, lines: list[dict], out: str | None) -> None:
    """Print the markdown report; with --out, also write it (report.md) and the rows (results.json) there."""
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.md").write_text(text)
        (Path(out) / "results.json").write_text(json.dumps(lines, indent=2) + "\n")


def tokenizer_for(folder: Path, gguf: Path | None):
    """The tokenizer of the folder, else of the GGUF (random presets borrow SmolLM2's ids as prompts)."""
    from model import Tokenizer

    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_dir(folder)
    from model.gguf import open_gguf

    return Tokenizer.from_gguf(open_gguf(gguf or default_gguf()), source=str(gguf))


def pick_rows(path: str | Path, n: int, *, setting: str = "IND_Diverse_Instruction") -> list[dict]:
    """The first rows of each task's `setting` block (any split; test first), taken from each task in turn."""
    from data import load_rows

    rows = load_rows(path, split=None, tasks="all", settings=[setting])
    by_task: dict[str, list[dict]] = {}
    split_rank = {"test": 0, "val": 1, "train": 2}
    for row in sorted(rows, key=lambda r: (r["task"], split_rank.get(r.get("split"), 3), r["index"])):
        by_task.setdefault(row["task"], []).append(row)
    picked, i = [], 0
    while len(picked) < n and any(i < len(v) for v in by_task.values()):
        for task in sorted(by_task):
            if i < len(by_task[task]) and len(picked) < n:
                picked.append(by_task[task][i])
        i += 1
    if len(picked) < n:
        raise ValueError(f"{path}: only {len(picked)} rows in setting {setting}, {n} asked for")
    return picked


# ---- measuring -------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> tuple[str, float]:
    """('cuda peak allocated', GiB) since the last reset_peak on a GPU; ('peak RSS', GiB) of this process on a CPU."""
    if torch.device(device).type == "cuda":
        return "cuda peak allocated", torch.cuda.max_memory_allocated() / 2**30
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30   # Linux: KiB


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def spread(values: list[float]) -> dict:
    """median, min, max (and the values) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def run_worker(script: Path, spec: dict, timeout: float | None = None) -> dict:
    """Run `script --worker SPEC` in a fresh process; its JSON result (stderr passes through)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
        done = subprocess.run([sys.executable, str(script), "--worker", str(spec_path)], timeout=timeout,
                              stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{script.name} worker ({spec.get('side')}) failed with exit code {done.returncode}")
        return json.loads(result_path.read_text())


def worker_setup(spec: dict) -> torch.device:
    """In a worker: threads, seeds, determinism of what can be made deterministic; the device."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    return pick_device(spec["device"])


def machine(threads: int | None = None) -> str:
    from model.cpu import cpu_name

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads or torch.get_num_threads()} torch threads per worker"


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(out)
