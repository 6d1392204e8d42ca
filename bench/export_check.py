"""The export's figures on a real model: logits of the exports against ours, and llama.cpp beside our generator.

    python bench/export_check.py --rows PATH/TO/ecinstruct/test_rows_dev.jsonl --adapter runs/x/adapter
    python bench/export_check.py --rows ... --scripted-adapter     # random LoRA B (std 0.02) on every target
    python bench/export_check.py --rows ... --adapter ... --threads 2 --max-new-tokens 32 --out runs/export-check

Model: --model (default: the offline SmolLM2-135M-Instruct GGUF). "Ours" is that model with the adapter
applied unmerged (W x + B A x alpha/r), in float32, on the base as the adapter's base.json records it (NF4 when
it was trained on NF4), loaded by lora.base.load_base, the loader export.py merges with; the exports are
written with that same quantization. A scripted adapter has no base.json: a dense base. Prompts: eCeLLM's
alpaca prompt of the first --n rows (default 20) of the file, taken in turn from each task's
IND_Diverse_Instruction block.

1. exports written by export.py: hf (fp32), GGUF f16 and Q8_0, each read by transformers (the folder;
   GGUF through `from_pretrained(dir, gguf_file=...)`) and by our loader. Largest |logit difference|
   over every position and vocabulary entry of every prompt against: ours unmerged; ours with the
   adapter merged into fp32 weights (evaluate.py's form, in float32); that merged model, made dense, with its
   2-D weights rounded to f16 in torch (what an f16 file holds, so a 0 there means the file adds no error of
   its own). Also how often the top-1 token agrees with ours unmerged.
2. with llama-cpp-python installed (--llama-cpp f16,q8_0): llama.cpp's greedy continuation of each prompt
   (exactly --max-new-tokens, EOS does not stop it) beside our generator's (model/generate.py, batch 1,
   fp32, the adapter merged). Answers (the tokens before the first EOS, what evaluate.py keeps) and whole
   continuations are compared; where they part, the first differing step and our logit margin there
   between our token and llama.cpp's (a near-tie is a margin of a few hundredths). Speed per engine,
   same prompts, same --threads: prompt tokens / time to the first new token, and decode tokens/s over
   the remaining steps. llama.cpp runs with its defaults otherwise (f16 KV cache).
Prints a markdown report (and writes it to --out/report.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `import model`, `import lora`

import numpy as np
import torch

import export
from data import load_rows, render_prompt
from data.encode import encode_prompt
from lora import apply_lora, load_base, lora_layers, merged_export_state, save_adapter
from model import build_model, generate, load_model
from model.cpu import cpu_name
from model.gguf import packaged_smollm2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model (default: the offline SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--adapter", help="a trained LoRA adapter folder")
    p.add_argument("--scripted-adapter", action="store_true", help="a random adapter instead: r=16, alpha=16, B ~ "
                                                                     "N(0, 0.02^2) on the 7 projections and lm_head")
    p.add_argument("--rows", required=True, help="ECInstruct rows (test_rows_dev.jsonl)")
    p.add_argument("--n", type=int, default=20, help="prompts (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of both engines (default 1)")
    p.add_argument("--llama-cpp", default="f16,q8_0", help="GGUF types llama.cpp runs (default f16,q8_0)")
    p.add_argument("--out", help="where the exports and report.md go (default: a temporary folder)")
    args = p.parse_args(argv)
    if bool(args.adapter) == args.scripted_adapter:
        p.error("give --adapter DIR or --scripted-adapter")
    return args


def pick_prompts(path: str, n: int, tokenizer) -> list[tuple[str, list[int], str]]:
    """(task, prompt ids, prompt text) of the first rows of each task's IND_Diverse_Instruction block, in turn."""
    rows = load_rows(path, split="test", tasks="all", settings=["IND_Diverse_Instruction"])
    by_task: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["task"], r["index"])):
        by_task.setdefault(row["task"], []).append(row)
    picked, i = [], 0
    while len(picked) < n:
        for task in sorted(by_task):
            if i < len(by_task[task]) and len(picked) < n:
                row = by_task[task][i]
                picked.append((task, encode_prompt(row, tokenizer, max_len=2048 - 128)[0], render_prompt(row)))
        i += 1
    return picked


@torch.no_grad()
def logits_of(model, ids: list[int]) -> torch.Tensor:
    out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out)[0].float()


def compare(model, prompts, references) -> dict:
    """Largest |logit difference| against each reference model over every position of every prompt, and
    top-1 agreement with the first. Reference logits are recomputed per prompt: all of them at once would
    be prompts x tokens x vocab floats."""
    diffs = {name: [] for name in references}
    agree, total, scale = 0, 0, 0.0
    for _, ids, _ in prompts:
        got = logits_of(model, ids)
        for k, (name, ref_model) in enumerate(references.items()):
            ref = logits_of(ref_model, ids)
            diffs[name].append((got - ref).abs().max().item())
            if k == 0:
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += len(ids)
                scale = max(scale, ref.abs().max().item())
    return {"max": {n: max(d) for n, d in diffs.items()}, "median": {n: float(np.median(d)) for n, d in diffs.items()},
            "max_abs_logit": scale, "top1_agreement": f"{agree}/{total}"}


def dense_copy(model):
    """A dense float32 copy of `model` with its adapters folded in and any NF4 layer dequantized: what an hf
    export holds (lora.merged_export_state), as a model of its own."""
    config, state = merged_export_state(model)
    return build_model(config, state, dtype=torch.float32, device="cpu").eval()


def transformers_model(path: Path, gguf_file: str | None = None):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def ours_greedy(model, prompts, n: int) -> tuple[list[list[int]], float, float]:
    """Our generator (model/generate.py), batch 1, exactly n new tokens each (EOS does not stop it):
    (outputs, seconds of prompt processing, seconds of the n - 1 decoding steps). The prompt's share is
    timed by a second run with one new token."""
    outs, prefill, decode = [], 0.0, 0.0
    for _, ids, _ in prompts:
        t0 = time.perf_counter()
        generate(model, [ids], max_new_tokens=1)
        t1 = time.perf_counter()
        outs.append(generate(model, [ids], max_new_tokens=n)[0])
        t2 = time.perf_counter()
        prefill, decode = prefill + (t1 - t0), decode + (t2 - t1) - (t1 - t0)
    return outs, prefill, decode


def llama_cpp_greedy(llm, prompts, n: int) -> tuple[list[list[int]], float, float]:
    """llama.cpp's greedy sampler, same contract as ours_greedy; the prompt's share is the time to the first token."""
    outs, prefill, decode = [], 0.0, 0.0
    for _, ids, _ in prompts:
        out = []
        llm.reset()   # no reuse of the previous prompt's cached prefix: both engines start from scratch
        t0 = time.perf_counter()
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not out:
                t1 = time.perf_counter()
            out.append(token)
            if len(out) == n:
                break
        t2 = time.perf_counter()
        outs.append(out)
        prefill, decode = prefill + (t1 - t0), decode + (t2 - t1)
    return outs, prefill, decode


def cut(tokens: list[int], stops) -> list[int]:
    """The answer: the tokens before the first stop token (what evaluate.py keeps)."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


@torch.no_grad()
def margin_at_divergence(model, ids, ours, theirs) -> tuple[int, float]:
    """(first differing step, our logit of our token minus our logit of llama.cpp's token there)."""
    step = next(i for i, (a, b) in enumerate(zip(ours + [-1], theirs + [-1])) if a != b)
    logits = logits_of(model, ids + ours[:step])[-1]
    mine = ours[step] if step < len(ours) else None
    other = theirs[step] if step < len(theirs) else None
    if mine is None or other is None:   # one stopped (EOS) where the other went on
        return step, float("nan")
    return step, (logits[mine] - logits[other]).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="export-check-"))
    out.mkdir(parents=True, exist_ok=True)
    source = args.model or str(packaged_smollm2())
    if args.scripted_adapter:
        model, tok, base = load_base(source, "none", torch.float32, "cpu")
        torch.manual_seed(0)
        apply_lora(model, r=16, alpha=16, dropout=0.0)
        g = torch.Generator().manual_seed(1)
        for layer in lora_layers(model).values():
            layer.lora_B.weight.data.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
        adapter = out / "scripted-adapter"
        save_adapter(model, adapter)
    else:
        adapter = Path(args.adapter)
        model, tok, base = load_base(source, None, torch.float32, "cpu", str(adapter))   # NF4 when trained on NF4
    model.eval()
    prompts = pick_prompts(args.rows, args.n, tok)
    lines = [f"# Export check: {Path(source).name} + {'scripted adapter' if args.scripted_adapter else adapter.name}", "",
             f"- adapter targets: {', '.join(model.lora_config['targets'])}; r={model.lora_config['r']}, "
             f"alpha={model.lora_config['alpha']}",
             f"- {base.line()}",
             f"- prompts: {len(prompts)} ({', '.join(sorted({t for t, _, _ in prompts}))}), "
             f"{min(len(i) for _, i, _ in prompts)}-{max(len(i) for _, i, _ in prompts)} tokens",
             f"- CPU: {cpu_name()}, {args.threads} thread(s); torch {torch.__version__}", ""]

    exports = {"hf-f32": ["--format", "hf", "--dtype", "f32"], "gguf-f16": ["--format", "gguf", "--gguf-quant", "f16"],
               "gguf-q8_0": ["--format", "gguf", "--gguf-quant", "q8_0"]}
    paths = {}
    for name, flags in exports.items():
        paths[name] = out / (name if name.startswith("hf") else f"{name}.gguf")
        export.main(["--model", source, "--quant", base.quant, "--adapter", str(adapter), *flags, "--out",
                     str(paths[name]), "--overwrite"])

    # evaluate.py's form: the adapter folded into the weights (an NF4 base dequantized), here in fp32
    merged = load_base(source, base.quant, torch.float32, "cpu", str(adapter), merge=True)[0]
    rounded = dense_copy(merged)   # what an f16 GGUF holds: every 2-D weight rounded to f16, norms fp32
    for p in rounded.parameters():
        if p.dim() == 2:
            p.data = p.data.half().float()
    references = {"unmerged": model, "merged": merged, "f16": rounded}
    lines += ["## Logits of the exports against ours", "",
              "Largest |difference| over every position and vocabulary entry of the prompts (median: of the "
              "per-prompt largest) against ours with the adapter unmerged (fp32, the base as the adapter's base.json "
              "records it); against ours with it merged into the fp32 weights (evaluate.py's form); against that "
              "merged model with its 2-D weights rounded to f16 in torch (what an f16 file holds).", "",
              "| export | read by | max vs unmerged | median vs unmerged | max vs merged | max vs merged, f16-rounded | "
              "max abs logit | top-1 agreement (vs unmerged) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, path in paths.items():
        for reader in ("transformers", "ours"):
            if reader == "transformers":
                m = transformers_model(path) if name.startswith("hf") else transformers_model(path.parent, path.name)
            else:
                m = load_model(path)[0]
            r = compare(m, prompts, references)
            lines.append(f"| {name} | {reader} | {r['max']['unmerged']:.2e} | {r['median']['unmerged']:.2e} | "
                         f"{r['max']['merged']:.2e} | {r['max']['f16']:.2e} | {r['max_abs_logit']:.1f} | "
                         f"{r['top1_agreement']} |")
            print(lines[-1], flush=True)
            del m
    # where the f16 error comes from: the same rounding with the (tied) embedding and head kept in fp32
    rounded_body = dense_copy(merged)
    for n, p in rounded_body.named_parameters():
        if p.dim() == 2 and "embed_tokens" not in n and "lm_head" not in n:
            p.data = p.data.half().float()
    for name, m in (("(none) ours merged, fp32", merged), ("(none) ours merged, f16-rounded", rounded),
                    ("(none) ours merged, f16-rounded but embedding and head", rounded_body)):
        r = compare(m, prompts, references)
        lines.append(f"| {name} | ours | {r['max']['unmerged']:.2e} | {r['median']['unmerged']:.2e} | "
                     f"{r['max']['merged']:.2e} | {r['max']['f16']:.2e} | {r['max_abs_logit']:.1f} | "
                     f"{r['top1_agreement']} |")
    del rounded, rounded_body

    stops = set(tok.stop_ids)
    n, k = args.max_new_tokens, len(prompts)
    prompt_tokens = sum(len(ids) for _, ids, _ in prompts)
    ours, ours_prefill, ours_decode = ours_greedy(merged, prompts, n)
    lines += ["", f"## Greedy generation: {n} new tokens per prompt (EOS does not stop it), batch 1, "
                  f"{args.threads} thread(s)", "",
              f"Answers: the tokens before the first EOS, as evaluate.py keeps them. Prompt tokens/s: "
              f"{prompt_tokens} prompt tokens / seconds to the first new token; decode tokens/s: {k} x {n - 1} "
              "steps / the rest.", ""]
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        lines.append("llama-cpp-python is not installed: ours alone.")
    lines += ["| engine | weights | answers equal to ours | all tokens equal to ours | prompt tokens/s | "
              "decode tokens/s |", "| --- | --- | ---: | ---: | ---: | ---: |",
              f"| ours (model/generate.py) | fp32, adapter merged | - | - | {prompt_tokens / ours_prefill:.0f} | "
              f"{k * (n - 1) / ours_decode:.1f} |"]
    details = []
    show = lambda ids: tok.decode(ids, skip_special_tokens=False)
    for name in ([] if llama_cpp is None else args.llama_cpp.split(",")):
        llm = llama_cpp.Llama(str(paths[f"gguf-{name}"]), n_ctx=2048, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        same_ids = sum(llm.tokenize(text.encode(), add_bos=tok.add_bos, special=False) == tok.encode(text, bos=True)
                       for _, _, text in prompts)
        theirs, prefill, decode = llama_cpp_greedy(llm, prompts, n)
        answers = sum(cut(a, stops) == cut(b, stops) for a, b in zip(ours, theirs))
        whole = sum(a == b for a, b in zip(ours, theirs))
        lines.append(f"| llama.cpp {llama_cpp.__version__} | GGUF {name} | {answers}/{k} | {whole}/{k} | "
                     f"{prompt_tokens / prefill:.0f} | {k * (n - 1) / decode:.1f} |")
        print(lines[-1], flush=True)
        details.append(f"- GGUF {name}: llama.cpp's tokenizer gives our prompt ids on {same_ids}/{k} prompt texts.")
        for i, ((task, ids, _), a, b) in enumerate(zip(prompts, ours, theirs)):
            if a != b:
                step, margin = margin_at_divergence(model, ids, a, b)
                details.append(f"- GGUF {name}, prompt {i} ({task}): first difference at step {step}"
                               f"{' (after the answer)' if cut(a, stops) == cut(b, stops) else ''}; our logit margin "
                               f"there {margin:.3f} (ours {show(a[:step + 1])!r}, llama.cpp {show(b[:step + 1])!r})")
        del llm
    lines += [""] + details
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
