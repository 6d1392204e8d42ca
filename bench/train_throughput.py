"""A QLoRA training step against transformers + peft + bitsandbytes, same weights, same batch.

    python bench/train_throughput.py --rows PATH/TO/ecinstruct/test_rows_dev.jsonl         # CPU: real SmolLM2-135M
    python bench/train_throughput.py --rows ... --n 8 --steps 5 --out runs/bench-train
    python bench/train_throughput.py --preset smollm2-360m,smollm2-1.7b,llama3.2-1b --n 32  # CUDA: random weights
    python bench/train_throughput.py --tiny --n 4 --steps 2 --warmup 1                      # smoke (seconds)

Weights as in bench/generate_throughput.py: the offline SmolLM2-135M-Instruct GGUF (or --model)
dequantized to a float32 hub-layout folder both sides load; --preset: released configurations with
random weights; --tiny: the tests' tiny model. Batch: the first --n rows of --rows (default: the
in-repo sample), IND_Diverse_Instruction, taken from each task in turn, encoded as train.py encodes
them (eCeLLM's prompt masked, answer + EOS supervised, cut-off --cutoff).

Both sides: the paper's QLoRA recipe, NF4 base with double quantization and --dtype compute, LoRA
r=16 alpha=16 dropout=0.1 on q,k,v,o,gate,up,down and lm_head, float32 adapter weights, AdamW
(lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay), gradient norm clipped at 1; gradient
checkpointing as train.py's auto (on from 1B parameters) unless --gradient-checkpointing says.
One step = forward, loss = mean cross-entropy over the supervised tokens, backward, clip, AdamW.
Ours: train.py's `token_loss_sum` on the batch as one padding-free micro-batch (data.pack +
model.Packing), as train.py runs it; side `ours-padded` runs the same rows right-padded (data.collate), the
layout before train.py went padding-free, to show what packing itself is worth. Peer: `LlamaForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4))` +
`peft.get_peft_model`, `model(input_ids, attention_mask, labels).loss` on the same padded tensors.

Each side runs in a process of its own: --warmup untimed steps, then --steps timed steps. Reported:
step seconds and tokens/s (real tokens of the batch, padding excluded), median and min-max; peak
memory (peak RSS of the process on a CPU, CUDA peak allocated on a GPU); the loss of the first step
on each side (the adapters start at B = 0, so it is the NF4 base's loss: the two should agree
closely); the headline ratio ours/peer of tokens/s and of peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file or hub-layout folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--preset", help="comma list of presets with random weights (e.g. " + ",".join(common.CUDA_PRESETS) + ")")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random model (smoke test)")
    p.add_argument("--rows", default=str(common.SAMPLE_ROWS), help="ECInstruct rows (default: the in-repo sample)")
    p.add_argument("--n", type=int, default=8, help="rows in the batch (default 8)")
    p.add_argument("--cutoff", type=int, default=2048, help="(default 2048)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="compute dtype (auto: as train.py, by the GPU or the CPU's bf16 flags)")
    p.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's)")
    p.add_argument("--sides", default="ours,peer", help="comma list of ours, ours-padded, peer (default: ours,peer)")
    p.add_argument("--out", help="folder for report.md and results.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the two sides, in a worker process --------------------------------------------------------------

def adamw_stepper(model, loss_of):
    """(step, trainable parameter count): one step is loss_of() (mean CE over supervised tokens), backward,
    gradient norm clipped at 1, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay); the same on both sides."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step() -> float:
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step, sum(p.numel() for p in params)


def ours_stepper(folder: Path, dtype, device, spec, batch):
    from data import pack
    from lora import apply_lora
    from model import Packing
    from train import token_loss_sum

    model = common.load_ours(folder, dtype, device)
    apply_lora(model, r=16, alpha=16, dropout=0.1, quantize="nf4", compute_dtype=dtype, lora_dtype=torch.float32)
    model.gradient_checkpointing = spec["gradient_checkpointing"]
    if spec["side"] == "ours-padded":
        ids, labels, packing = batch["input_ids"].to(device), batch["labels"].to(device), None
    else:   # the rows end to end: (1, N), as train.py runs them
        packed = pack(spec["input_ids"], spec["labels"])
        ids, labels, packing = packed["input_ids"].to(device), packed["labels"].to(device), Packing(packed["lengths"], device)
    n_sup = int((labels[:, 1:] != -100).sum())
    assert n_sup == int((batch["labels"][:, 1:] != -100).sum()), "packing changed the supervised tokens"
    return adamw_stepper(model, lambda: token_loss_sum(model, ids, labels, packing=packing) / n_sup)


def peer_stepper(folder: Path, dtype, device, spec, batch):
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, quantization_config=quant,
                                                          device_map={"": str(device)})
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    mask = batch["attention_mask"].to(device).long()
    return adamw_stepper(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def worker(spec_path: str) -> None:
    from data import collate

    spec = json.loads(Path(spec_path).read_text())
    device = common.worker_setup(spec)
    dtype = DTYPES[spec["dtype"]]
    batch = collate(spec["input_ids"], spec["labels"], pad_id=spec["pad_id"])
    step, n_train = (peer_stepper if spec["side"] == "peer" else ours_stepper)(Path(spec["folder"]), dtype, device,
                                                                              spec, batch)
    losses = [step() for _ in range(spec["warmup"])]
    common.reset_peak(device)
    seconds = []
    for _ in range(spec["steps"]):
        t, loss = common.timed(step, device)
        seconds.append(t)
        losses.append(loss)
    kind, peak = common.peak_memory_gib(device)
    tokens = sum(map(len, spec["input_ids"]))
    result = {"side": spec["side"], "seconds": common.spread(seconds), "tokens": tokens,
              "tokens_per_s": common.spread([tokens / t for t in seconds]), "memory_kind": kind,
              "peak_memory_gib": peak, "losses": losses, "trainable_parameters": n_train}
    Path(spec["result"]).write_text(json.dumps(result))


# ---- the driver ------------------------------------------------------------------------------------

def measure_model(label: str, folder: Path, tokenizer, args, device, dtype_name: str) -> dict:
    from data.encode import encode_example
    from model import ModelConfig

    examples = [e for e in (encode_example(r, tokenizer, cutoff=args.cutoff) for r in common.pick_rows(args.rows, args.n))
                if e is not None]
    n_params = config_parameters(ModelConfig.from_json(folder / "config.json"))
    gc = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and n_params >= 1_000_000_000)
    lengths = [len(e["input_ids"]) for e in examples]
    padded = len(lengths) * -(-max(lengths) // 8) * 8
    spec = {"folder": str(folder), "input_ids": [e["input_ids"] for e in examples],
            "labels": [e["labels"] for e in examples],
            "pad_id": tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id, "dtype": dtype_name,
            "device": str(device), "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
            "gradient_checkpointing": gc}
    script = Path(__file__).resolve()
    line = {"model": label, "rows": len(examples), "tokens": sum(lengths), "padded_tokens": padded,
            "padding": 1 - sum(lengths) / padded, "gradient_checkpointing": gc}
    for side in args.sides.split(","):
        print(f"{label}: {side} ...", file=sys.stderr, flush=True)
        line[side] = common.run_worker(script, {**spec, "side": side})
    if "ours" in line and "peer" in line:
        line["ratio_tokens_per_s"] = line["ours"]["tokens_per_s"]["median"] / line["peer"]["tokens_per_s"]["median"]
        line["ratio_peak_memory"] = line["ours"]["peak_memory_gib"] / line["peer"]["peak_memory_gib"]
    return line


def config_parameters(config) -> int:
    from model import Llama, count_parameters

    with torch.device("meta"):
        return count_parameters(Llama(config))


def report(lines: list[dict], args, dtype_name: str) -> str:
    def cell(s):
        return f"{s['median']:.4g} ({s['min']:.4g}-{s['max']:.4g})"

    out = ["# QLoRA training step: ours against transformers + peft + bitsandbytes", "",
           f"- machine: {common.machine(args.threads)}; {common.versions()}",
           f"- {dtype_name} compute, NF4 base (double quant), LoRA r=16 alpha=16 dropout 0.1 on 7 projections + "
           f"lm_head, AdamW; {args.steps} timed steps (median, min-max) after {args.warmup} warm-up", "",
           "| model | rows | tokens (padding) | side | step s | tokens/s | peak memory GiB | first loss | "
           "ours/peer tokens/s | ours/peer memory |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for line in lines:
        for side in ("ours", "ours-padded", "peer"):
            if side not in line:
                continue
            r = line[side]
            ratios = (f"**{line['ratio_tokens_per_s']:.2f}x** | **{line['ratio_peak_memory']:.2f}x**"
                      if side == "ours" and "ratio_tokens_per_s" in line else " | ")
            out.append(f"| {line['model']}{' (grad. checkpointing)' if line['gradient_checkpointing'] else ''} | "
                       f"{line['rows']} | {line['tokens']} ({line['padding']:.0%}) | {side} | {cell(r['seconds'])} | "
                       f"{cell(r['tokens_per_s'])} | {r['peak_memory_gib']:.2f} ({r['memory_kind']}) | "
                       f"{r['losses'][0]:.4f} | {ratios} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    from model.cpu import compute_dtype

    def dtype_name(args, device) -> str:   # --dtype auto: bf16 where it is native, as train.py decides
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}[compute_dtype(args.dtype, device)]

    return common.run_peer_bench(parse_args(argv), worker=worker, measure=lambda *a: [measure_model(*a)],
                                 report=report, dtype_name=dtype_name, dtypes=DTYPES)


if __name__ == "__main__":
    sys.exit(main())
