"""Greedy generation against transformers' `generate`, same weights, same prompts, same batch size.

    python bench/generate_throughput.py --rows PATH/TO/ecinstruct/test_rows_dev.jsonl        # CPU: real SmolLM2-135M
    python bench/generate_throughput.py --rows ... --n 32 --batch-sizes 1,8,32 --repeats 3 --out runs/bench-gen
    python bench/generate_throughput.py --preset smollm2-360m,smollm2-1.7b,llama3.2-1b       # CUDA: random weights
    python bench/generate_throughput.py --tiny --n 6 --max-new-tokens 8 --repeats 1          # smoke (seconds)
    python bench/generate_throughput.py --workload ROWS.jsonl --max-new-tokens 100,MPC=40,PRP=8,PM=8,PSI=8 \
        --batch-sizes 16 --repeats 1 --warmup 0                                            # evaluate.py's workload

Weights: on the CPU (default) the offline SmolLM2-135M-Instruct GGUF (or --model FILE.gguf) dequantized
to a float32 hub-layout folder that both sides load, so the weights are identical; --preset runs the
released configurations with random weights (std 0.02; rows then rarely stop at EOS); --tiny the
tests' tiny random model. Prompts: eCeLLM's alpaca prompt of the first --n rows of --rows (default:
the sample in this repository), IND_Diverse_Instruction, taken from each task in turn. --workload FILE
instead takes what evaluate.py generates for FILE: every test row of every task and setting (--every K:
every K-th of them), each prompt cut to leave room for its task's cap, the caps given as evaluate.py's
--max-new-tokens (100,MPC=40,...).

Ours: model/generate.py `generate_batched` (continuous batching) at --batch-size rows. Peer:
`LlamaForCausalLM.generate` (greedy, left padding, its default attention) on the same prompts grouped
by token cap, each group sorted longest first and cut into batches of the same size, each batch running
until its last row stops, as evaluate.py ran before continuous batching. Both stop at the tokenizer's
stop ids.

Each (side, batch size) runs in a process of its own: load, --warmup runs of the first batch (8 new
tokens), then --repeats timed runs of the whole workload. Reported: wall seconds and new tokens/s
(answer tokens, stop tokens excluded: the same count on both sides when outputs agree), median and
min-max over repeats; peak memory (peak RSS of the process on a CPU, CUDA peak allocated on a GPU);
the headline ratio ours/peer of tokens/s (= peer time / our time); and output agreement: rows whose
ids are identical, and the first differing step of the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file or hub-layout folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--preset", help="comma list of presets with random weights (e.g. " + ",".join(common.CUDA_PRESETS) + ")")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random model (smoke test)")
    p.add_argument("--rows", default=str(common.SAMPLE_ROWS), help="ECInstruct rows (default: the in-repo sample)")
    p.add_argument("--n", type=int, default=32, help="prompts (default 32)")
    p.add_argument("--max-new-tokens", default="100",
                   help="N, or evaluate.py's N,TASK=N,... per-task caps (default 100, eCeLLM's)")
    p.add_argument("--workload", help="evaluate.py's workload on this rows file: every test row, all tasks and "
                                      "settings (instead of --rows and --n)")
    p.add_argument("--every", type=int, default=1, help="with --workload: every K-th row only (default 1: all)")
    p.add_argument("--batch-sizes", default="1,32", help="comma list (default 1,32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the whole workload (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short runs first (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on a CPU, bf16 on CUDA")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's)")
    p.add_argument("--sides", default="ours,peer", help="ours, peer or both (default)")
    p.add_argument("--out", help="folder for report.md and results.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the two sides, in a worker process --------------------------------------------------------------

def ours_runner(folder: Path, dtype, device, spec):
    from model import generate_batched

    model = common.load_ours(folder, dtype, device)

    def run(prompts, max_new):
        return generate_batched(model, prompts, batch_size=spec["batch_size"], max_new_tokens=max_new,
                                stop_ids=spec["stop_ids"], pad_id=spec["pad_id"])
    return run


def peer_runner(folder: Path, dtype, device, spec):
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    stops, pad, B = spec["stop_ids"], spec["pad_id"], spec["batch_size"]

    def cut(row: list[int]) -> list[int]:
        for k, t in enumerate(row):
            if t in stops:
                return row[:k]
        return row

    @torch.inference_mode()
    def run(prompts, max_new):
        out = [None] * len(prompts)
        for cap in sorted(set(max_new)):
            order = sorted((i for i in range(len(prompts)) if max_new[i] == cap), key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), B):
                chunk = order[start:start + B]
                L = max(len(prompts[i]) for i in chunk)
                ids = torch.tensor([[pad] * (L - len(prompts[i])) + list(prompts[i]) for i in chunk], device=device)
                mask = torch.tensor([[0] * (L - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cap, do_sample=False,
                                     eos_token_id=stops, pad_token_id=pad, top_p=None, top_k=None, temperature=None)
                for i, row in zip(chunk, gen[:, L:].tolist()):
                    out[i] = cut(row)
        return out
    return run


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    device = common.worker_setup(spec)
    dtype = DTYPES[spec["dtype"]]
    prompts, max_new = spec["prompts"], spec["max_new_tokens"]
    runner = (ours_runner if spec["side"] == "ours" else peer_runner)(Path(spec["folder"]), dtype, device, spec)
    for _ in range(spec["warmup"]):
        runner(prompts[:spec["batch_size"]], [min(8, m) for m in max_new[:spec["batch_size"]]])
    common.reset_peak(device)
    seconds, outputs = [], None
    for _ in range(spec["repeats"]):
        t, outputs = common.timed(lambda: runner(prompts, max_new), device)
        seconds.append(t)
    kind, peak = common.peak_memory_gib(device)
    tokens = sum(map(len, outputs))
    result = {"side": spec["side"], "batch_size": spec["batch_size"], "seconds": common.spread(seconds),
              "tokens": tokens, "tokens_per_s": common.spread([tokens / t for t in seconds]),
              "memory_kind": kind, "peak_memory_gib": peak, "outputs": outputs}
    Path(spec["result"]).write_text(json.dumps(result))


# ---- the driver ------------------------------------------------------------------------------------

def first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def workload(args, tokenizer) -> tuple[list[list[int]], list[int]]:
    """The prompts (ids) and their token caps: --n rows of --rows, or evaluate.py's test rows of --workload."""
    from data import load_rows
    from data.encode import encode_prompt
    from evaluate import parse_max_new_tokens

    default, by_task = parse_max_new_tokens(args.max_new_tokens)
    if args.workload:
        rows = load_rows(args.workload, split="test", tasks="all", settings=None)[::args.every]
    else:
        rows = common.pick_rows(args.rows, args.n)
    caps = [by_task.get(r["task"], default) for r in rows]
    prompts = []
    for row, cap in zip(rows, caps):
        encoded = encode_prompt(row, tokenizer, max_len=2048 - cap)
        if encoded is None:
            raise ValueError(f"{args.workload or args.rows}: {row['task']}/{row['setting']} row {row['index']}: "
                             f"the prompt does not fit 2048 - {cap} tokens")
        prompts.append(encoded[0])
    return prompts, caps


def shared_prefix_tokens(prompts: list[list[int]]) -> int:
    """Prompt tokens a prefix cache can skip: in token order, each prompt's reusable prefix with the one before
    it, what model/generate.py copies instead of computing (all of it at batch size 1)."""
    from model.generate import reusable_prefix

    ordered = sorted(prompts)
    return sum(reusable_prefix(before, prompt) for before, prompt in zip(ordered, ordered[1:]))


def measure_model(label: str, folder: Path, tokenizer, args, device, dtype_name: str) -> list[dict]:
    prompts, caps = workload(args, tokenizer)
    base = {"folder": str(folder), "prompts": prompts, "max_new_tokens": caps,
            "stop_ids": sorted(tokenizer.stop_ids), "pad_id": tokenizer.pad_id if tokenizer.pad_id is not None else 0,
            "dtype": dtype_name, "device": str(device), "threads": args.threads, "warmup": args.warmup,
            "repeats": args.repeats}
    script = Path(__file__).resolve()
    shared = shared_prefix_tokens(prompts)
    lines = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        got = {}
        for side in args.sides.split(","):
            print(f"{label}: {side}, batch {B} ...", file=sys.stderr, flush=True)
            got[side] = common.run_worker(script, {**base, "side": side, "batch_size": B})
        line = {"model": label, "batch_size": B, "prompts": len(prompts),
                "prompt_tokens": sum(map(len, prompts)), "shared_prefix_tokens": shared,
                **{s: {k: v for k, v in r.items() if k != "outputs"} for s, r in got.items()}}
        if "ours" in got and "peer" in got:
            a, b = got["ours"]["outputs"], got["peer"]["outputs"]
            same = [x == y for x, y in zip(a, b)]
            line["identical_rows"] = sum(same)
            line["first_differences"] = [first_difference(x, y) for x, y, s in zip(a, b, same) if not s]
            line["ratio_tokens_per_s"] = (got["ours"]["tokens_per_s"]["median"] / got["peer"]["tokens_per_s"]["median"])
            line["ratio_wall"] = got["ours"]["seconds"]["median"] / got["peer"]["seconds"]["median"]
        lines.append(line)
    return lines


def describe_prompts(args) -> str:
    if args.workload:
        every = f"1 in {args.every} of " if args.every > 1 else ""
        return f"evaluate.py's workload: {every}the test rows of {args.workload} (all tasks and settings)"
    return f"{args.n} prompts of {args.rows}"


def report(lines: list[dict], args, dtype_name: str) -> str:
    def cell(r, key):
        s = r[key]
        return f"{s['median']:.4g} ({s['min']:.4g}-{s['max']:.4g})"

    out = ["# Generation: ours against transformers' generate", "",
           f"- machine: {common.machine(args.threads)}; {common.versions()}",
           f"- {dtype_name}, greedy, up to {args.max_new_tokens} new tokens, "
           f"{describe_prompts(args)}; "
           f"{args.repeats} timed runs (median, min-max), {args.warmup} warm-up", "",
           "| model | batch | side | wall s | new tokens/s | peak memory GiB | ours/peer tokens/s | identical rows |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for line in lines:
        for side in ("ours", "peer"):
            if side not in line:
                continue
            r = line[side]
            ratio = f"**{line['ratio_tokens_per_s']:.2f}x**" if side == "ours" and "ratio_tokens_per_s" in line else ""
            same = f"{line['identical_rows']}/{line['prompts']}" if side == "ours" and "identical_rows" in line else ""
            out.append(f"| {line['model']} | {line['batch_size']} | {side} | {cell(r, 'seconds')} | "
                       f"{cell(r, 'tokens_per_s')} | {r['peak_memory_gib']:.2f} ({r['memory_kind']}) | {ratio} | {same} |")
    one_per_model = {line["model"]: line for line in lines}.values()   # the prompts are the same at every batch size
    out += [f"\n{line['model']}: {line['prompts']} prompts, {line['prompt_tokens']} prompt tokens, "
            f"{line['shared_prefix_tokens']} ({line['shared_prefix_tokens'] / line['prompt_tokens']:.0%}) in prefixes "
            "shared with the prompt before (token order)" for line in one_per_model]
    diffs = [(l["model"], l["batch_size"], l["first_differences"]) for l in lines if l.get("first_differences")]
    for model, B, d in diffs:
        out.append(f"\n{model}, batch {B}: rows that differ part at new-token step(s) {d}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    def dtype_name(args, device) -> str:   # default: fp32 on a CPU, bf16 on CUDA
        return args.dtype or ("bf16" if device.type == "cuda" else "fp32")

    return common.run_peer_bench(parse_args(argv), worker=worker, measure=measure_model, report=report,
                                 dtype_name=dtype_name, dtypes=DTYPES)


if __name__ == "__main__":
    sys.exit(main())
