"""Fine-tune a small Llama (SmolLM2, Llama 3.2) with QLoRA on ECInstruct: a plain PyTorch loop.

    python train.py --model smollm2-360m                       # the paper's recipe, nothing else to set
    python train.py --model smollm2-360m --resume auto         # continue an interrupted run exactly
    python train.py --model FILE.gguf --dataset SAMPLE.jsonl --quant none --max-steps 50 --out runs/try
    python train.py --model smollm2-360m --dry-run             # data statistics and one example, no weights
    torchrun --nproc_per_node=4 train.py --model llama3.2-1b   # data-parallel, same global batch, same loss

Defaults reproduce eCeLLM's recipe (finetune.sh / finetune.py) in its QLoRA form: NF4 base with bf16
compute, LoRA r=16 alpha=16 dropout=0.1, IND_Diverse_Instruction train split on all 10 tasks, AdamW
lr 1e-4, cosine schedule with 5% warm-up, 128 sequences per optimizer step, cut-off 2048, 3 epochs,
validation loss each epoch on a seeded 1,000-row subset of the val split, best adapter kept.

What one optimizer step does (the loop below spells it out):
  1. the step's 128 rows come from data.plan_epoch (a pure function of seed and epoch, so resuming is
     "skip the steps already done"), already cut into length-grouped micro-batches;
  2. N = the supervised tokens of the whole step (all micro-batches, all ranks), known before any forward;
  3. each micro-batch: loss = (sum of token cross-entropies) / N, backward. The gradients add up to
     the gradient of the mean over every supervised token of the step, however the rows were split
     (not a mean of micro-batch means, the 2024 gradient-accumulation bug);
  4. under torchrun each rank runs its share of the micro-batches (round robin) and the LoRA
     gradients are summed across ranks with one all_reduce: with the 1/N above, the sum is the
     single-process gradient;
  5. clip the gradient norm, AdamW step (LoRA parameters only), lr set from lr_at(step).
The loss never builds the full (B, T, vocab) float32 logits: hidden states at supervised positions
only go through lm_head in chunks, each under activation checkpointing.

Output folder (--out): one run at a time. A run holds an flock on .train.lock for as long as it
lives (the kernel drops it when the process dies, so a killed run never leaves the folder stuck); a
second train.py on the folder, fresh, resumed or overwriting, is refused with one line naming the
live run. --overwrite deletes only what a run writes (the names below) and only in a folder that
carries train_run.json, the marker train.py writes there: never a model folder's config.json.
  train_run.json           the marker: this folder is a train.py run; lists the names a run writes
  config.json              the resolved configuration (a resumed run must match it, see MUST_MATCH)
  train_log.jsonl          one JSON object per optimizer step: step, epoch, loss, lr, grad_norm,
                           tokens, supervised_tokens, tokens_per_s, peak_mem_gb, time
  val_log.jsonl            one JSON object per validation: step, epoch, val_loss, val_tokens, best
  checkpoints/step-NNNNNN/ adapter/ (PEFT format), state.pt (optimizer, schedule, RNG, data position;
                           loads with torch.load(weights_only=True)), trainer_state.json, config.json.
                           Written to checkpoints/.tmp-step-NNNNNN and renamed when complete; the
                           last --keep-last are kept.
  best/                    the adapter with the lowest validation loss (+ best.json)
  adapter/                 the adapter after the last step
Every adapter folder also holds base.json, the base it was trained on (lora.io: the --model given, NF4 or
not, the dtype it was quantized from, the compute dtype, a fingerprint of the weights): evaluate.py and
export.py take their defaults from it. A resume refuses another dtype, quantization or validation set.
  loss_curve.png           when matplotlib is installed

Divergence stops the run like a NaN does, before the update: a non-finite loss or gradient, an
update that overflows or leaves a non-finite weight, a gradient of exactly zero (the model has
collapsed: at loss ln(vocab) it predicts every token alike), or a loss above --diverge-factor times
its start (the mean of the first 10 normal losses) for --diverge-steps steps in a row. The message
names the last good checkpoint (one whose weights gave a normal loss); later checkpoints are renamed
checkpoints/diverged-step-NNNNNN, so --resume auto (with a lower --lr) continues from the good one.

Exit codes: 0 done; 1 the run failed (divergence, out of memory, a model that cannot be loaded); 2
bad flags, bad data, or a refused or busy output folder; 130 interrupted (Ctrl-C or SIGTERM: a
checkpoint is written first).

Test hook: SLM_EC_TEST_SLOW_SAVE="STEP:SECONDS" makes the checkpoint of step STEP pause SECONDS
after its adapter is written (tests kill the process there to show a half-written checkpoint is
never used). It does nothing unless set.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

from cli import dtype_type, missing_package, resolve_device, resolve_dtype

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from data import (SETTINGS, DataError, collate, parse_settings, parse_tasks, plan_epoch, read_rows,
                      select_rows, tokenize_rows)
    from data.batching import padding_stats
    from metrics.tasks import ABBREV
    from model import PRESETS, Tokenizer, count_parameters, load_model
    from outdir import FolderBusy, FolderLock, fsync_dir
except ModuleNotFoundError as e:   # the system python instead of .venv/bin/python
    missing_package("train.py", e)

IGNORE_INDEX = -100
FORMAT = 1                      # checkpoint layout version (state.pt "format")
BIG_MODEL = 1_000_000_000       # --gradient-checkpointing auto turns it on from this many parameters
# Flags that give a checkpoint its meaning: resuming with a different value is refused.
# So do the resolved dtype (config "dtype": --dtype auto is bf16 on one machine, fp32 on another) and the
# fingerprints of the tokenized training and validation rows (the same flags over an edited file).
MUST_MATCH = ("model", "quant", "lora_r", "lora_alpha", "lora_targets", "dataset", "tasks", "setting", "cutoff",
              "template", "train_on_inputs", "max_train_rows", "batch_size", "seed", "val_size")
# Flags a resumed run may change (e.g. a lower --lr after a NaN): the change is printed.
MAY_CHANGE = ("lr", "epochs", "max_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "lora_dropout",
              "micro_batch_tokens", "diverge_factor", "diverge_steps")
RUN_FILES = ("config.json", "train_log.jsonl", "val_log.jsonl", "loss_curve.png", "checkpoints", "adapter", "best")
RUN_MARKER = "train_run.json"   # written by train.py into every run folder; --overwrite needs it
LOCK_NAME = ".train.lock"       # flock-ed for the whole run
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slm-ec" / "data"


def fail(message: str, code: int = 1):
    """Stop with one clear line on stderr."""
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ---- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n" + __doc__.split("\n\n")[1])
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-360m",
                   help=f"an alias ({', '.join(PRESETS)}), a hub id, a hub-layout folder or a .gguf file "
                        "(default: %(default)s)")
    g.add_argument("--quant", choices=["nf4", "none"], default="nf4",
                   help="nf4: frozen base quantized to 4-bit NormalFloat (QLoRA, the paper's recipe); none: the "
                        "base stays in --dtype (default: %(default)s)")
    g.add_argument("--dtype", type=dtype_type("auto", "bf16", "fp32"), default="auto",
                   help="auto, bf16 or fp32 (bfloat16, float32 too): the dtype the frozen base is loaded (and "
                        "quantized from) and computes in; LoRA weights are always float32. auto: bf16 on a GPU "
                        "that has it or on a CPU with native bf16 (amx_bf16 or avx512_bf16 in /proc/cpuinfo), "
                        "else fp32 (default: %(default)s)")
    g.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (auto: cuda when available; under torchrun, cuda:LOCAL_RANK) "
                        "(default: %(default)s)")
    g.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="recompute each layer in backward to save memory (non-reentrant). auto: on for models of "
                        "1B parameters or more (default: %(default)s)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16, help="rank r (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="alpha; the update is scaled by alpha/r "
                                                                   "(default: %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the LoRA branch input "
                                                                   "(default: %(default)s)")
    g.add_argument("--lora-targets", default="default",
                   help="default: the paper's (q,k,v,o,gate,up,down and lm_head), no-head: the seven projections "
                        "only (what vLLM and llama.cpp load), or a comma list of module names (default: %(default)s)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="NingLab/ECInstruct",
                   help="the hub dataset id or a local .json/.jsonl/.parquet file (default: %(default)s)")
    g.add_argument("--tasks", default="all", help="all, or a comma list of task names or abbreviations "
                                                  "(AVE,PRP,...) (default: %(default)s)")
    g.add_argument("--setting", "--settings", dest="setting", default="IND_Diverse_Instruction", metavar="SETTING",
                   help="ECInstruct setting(s) to train and validate on, comma-separated: " + ", ".join(SETTINGS) +
                        " (default: %(default)s)")
    g.add_argument("--skip-invalid", action="store_true", help="leave invalid dataset rows out (counted on stderr) "
                                                               "instead of stopping at the first")
    g.add_argument("--cutoff", type=int, default=2048,
                   help="maximum tokens per example; longer inputs are shortened, the answer is kept "
                        "(default: %(default)s)")
    g.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                   help="alpaca: eCeLLM's prompt (base models); chat: the checkpoint's chat template "
                        "(default: %(default)s)")
    g.add_argument("--train-on-inputs", action="store_true", help="also train on the prompt tokens (eCeLLM: off)")
    g.add_argument("--val-size", type=int, default=1000,
                   help="rows of the val split in the seeded validation subset; 0: no validation "
                        "(default: %(default)s)")
    g.add_argument("--max-train-rows", type=int, default=None,
                   help="train on a seeded random subset of this many rows (quick runs)")
    g.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="tokenized-data cache; '' to turn it off (default: $XDG_CACHE_HOME/slm-ec/data, "
                        "that is %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=3, help="passes over the training rows (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps; the schedule is laid over them (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=128,
                   help="sequences per optimizer step, the effective batch over micro-batches and ranks "
                        "(default: %(default)s)")
    g.add_argument("--micro-batch-tokens", type=int, default=16384,
                   help="padded tokens per forward pass (per rank); lower it on out-of-memory. Changes speed, "
                        "not the gradient (default: %(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="fraction of steps of linear warm-up before the "
                                                                    "cosine decay (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm; 0: no clipping "
                                                                    "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=42, help="seeds LoRA init, dropout, data order and the val subset "
                                                        "(default: %(default)s)")
    g.add_argument("--diverge-factor", type=float, default=3.0,
                   help="stop when the loss stays above this many times its start (the mean of the first 10 "
                        "steps) for --diverge-steps steps in a row; 0: never (default: %(default)s)")
    g.add_argument("--diverge-steps", type=int, default=10,
                   help="consecutive steps of a loss above --diverge-factor times its start that stop the run "
                        "(default: %(default)s)")
    g.add_argument("--loss-chunk-tokens", type=int, default=2048,
                   help="supervised positions per lm_head + cross-entropy chunk (memory, not maths) "
                        "(default: %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output folder (default: runs/<model name>)")
    g.add_argument("--save-every", type=int, default=100,
                   help="write a checkpoint every K optimizer steps (also at each epoch end and at the end) "
                        "(default: %(default)s)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="also compute the validation loss every N steps (it always runs at the start, at each "
                        "epoch end and at the end)")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the newest checkpoint in --out (start fresh if there is none); "
                        "PATH: a checkpoint folder or a run folder")
    g.add_argument("--overwrite", action="store_true", help="start again in an --out folder that holds a run "
                                                            "(its run files are deleted)")
    g.add_argument("--log-every", type=int, default=10, help="steps between printed progress lines when there is "
                                                             "no progress bar (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (train_log.jsonl is still written)")
    g.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    g.add_argument("--dry-run", action="store_true",
                   help="load the tokenizer and the data only: print statistics and one rendered example, and exit")
    # Test-only: make the loss of this step NaN (shows the non-finite-loss handling).
    p.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_args(args, parser) -> None:
    """Value checks argparse cannot do; each failure is one line and exit code 2."""
    checks = [
        (args.lora_r >= 1, f"--lora-r must be at least 1 (got {args.lora_r})"),
        (args.lora_alpha > 0, f"--lora-alpha must be positive (got {args.lora_alpha})"),
        (0 <= args.lora_dropout < 1, f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})"),
        (args.lr > 0 and math.isfinite(args.lr), f"--lr must be a positive number (got {args.lr})"),
        (args.epochs >= 1, f"--epochs must be at least 1 (got {args.epochs})"),
        (args.max_steps is None or args.max_steps >= 1, f"--max-steps must be at least 1 (got {args.max_steps})"),
        (args.batch_size >= 1, f"--batch-size must be at least 1 (got {args.batch_size})"),
        (args.cutoff >= 16, f"--cutoff must be at least 16 tokens (got {args.cutoff})"),
        (args.micro_batch_tokens >= args.cutoff,
         f"--micro-batch-tokens ({args.micro_batch_tokens}) must be at least --cutoff ({args.cutoff}): one "
         "example must fit in a micro-batch (lower --cutoff too)"),
        (0 <= args.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1) (got {args.warmup_ratio})"),
        (args.weight_decay >= 0, f"--weight-decay must be 0 or more (got {args.weight_decay})"),
        (args.max_grad_norm >= 0, f"--max-grad-norm must be 0 (off) or more (got {args.max_grad_norm})"),
        (args.val_size >= 0, f"--val-size must be 0 or more (got {args.val_size})"),
        (args.max_train_rows is None or args.max_train_rows >= 1,
         f"--max-train-rows must be at least 1 (got {args.max_train_rows})"),
        (args.loss_chunk_tokens >= 1, f"--loss-chunk-tokens must be at least 1 (got {args.loss_chunk_tokens})"),
        (args.diverge_factor == 0 or (args.diverge_factor > 1 and math.isfinite(args.diverge_factor)),
         f"--diverge-factor must be 0 (off) or a number above 1 (got {args.diverge_factor})"),
        (args.diverge_steps >= 1, f"--diverge-steps must be at least 1 (got {args.diverge_steps})"),
        (args.save_every >= 1, f"--save-every must be at least 1 (got {args.save_every})"),
        (args.keep_last >= 1, f"--keep-last must be at least 1 (got {args.keep_last})"),
        (args.eval_every is None or args.eval_every >= 1, f"--eval-every must be at least 1 (got {args.eval_every})"),
        (args.log_every >= 1, f"--log-every must be at least 1 (got {args.log_every})"),
        (not (args.resume and args.overwrite), "--resume and --overwrite contradict each other; pass one"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        parse_tasks(args.tasks)
    except ValueError as e:
        parser.error(f"--tasks: {e}")
    try:
        args.setting = ",".join(parse_settings(args.setting) or SETTINGS)   # one spelling in config.json
    except ValueError as e:
        parser.error(f"--setting: {e}")
    text, path = args.model, Path(args.model).expanduser()
    looks_local = text.endswith(".gguf") or text.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        parser.error(f"--model {text}: no such file or folder")
    if text.endswith(".gguf") and not path.is_file():
        parser.error(f"--model {text}: not a file")
    if not looks_local and text not in PRESETS and not (text.count("/") == 1 and all(text.split("/"))):
        parser.error(f"--model {text!r} is not a known alias ({', '.join(PRESETS)}), a hub id (org/name), a folder "
                     "or a .gguf file")
    dpath = Path(args.dataset).expanduser()
    data_local = args.dataset.endswith((".json", ".jsonl", ".parquet")) or args.dataset.startswith((".", "/", "~"))
    if data_local and not dpath.is_file():
        parser.error(f"--dataset {args.dataset}: no such file")
    if args.resume not in (None, "auto") and not Path(args.resume).expanduser().is_dir():
        parser.error(f"--resume {args.resume}: no such folder (pass auto, a checkpoint folder or a run folder)")


def model_slug(model: str) -> str:
    """runs/<slug>: the alias, the hub name, or the file/folder name (of the resolved path, so that
    `--model ..` names the folder it points to and never makes runs/.. the current directory)."""
    if model in PRESETS:
        return model
    path = Path(model).expanduser()
    name = (path.resolve() if path.exists() else Path(model.rstrip("/"))).name
    name = name[:-5] if name.endswith(".gguf") else name
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip(".").lower()
    return name or "run"


# ---- the loss -------------------------------------------------------------------------------------

def _chunk_ce(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk; logits (n, vocab) upcast to float32 here only."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def token_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Sum over supervised tokens of -log p(label), a float32 scalar.

    labels (B, T) are aligned with input_ids (Hugging Face convention): the hidden state at position t
    predicts labels[:, t + 1]; -100 (prompt, padding) is not supervised. Only supervised positions go
    through lm_head, `chunk` at a time, each chunk under non-reentrant checkpointing so its logits are
    recomputed in backward instead of kept.
    """
    hidden = model(input_ids, return_hidden=True)               # (B, T, H)
    targets = labels[:, 1:]                                      # (B, T-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]                                     # (N, H) supervised positions only
    y = targets[keep]                                            # (N,)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.is_grad_enabled()
    for i in range(0, y.numel(), chunk):
        if grad:
            total = total + checkpoint(_chunk_ce, model.lm_head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
        else:
            total = total + _chunk_ce(model.lm_head, h[i:i + chunk], y[i:i + chunk])
    return total


def supervised_counts(labels) -> np.ndarray:
    """Per example, the labels that are targets: labels[1:] != -100 (labels[0] is never predicted)."""
    if hasattr(labels, "values") and hasattr(labels, "offsets"):  # data.encode.RaggedIds: vectorised
        sup = (np.asarray(labels.values) != IGNORE_INDEX).astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(sup)])
        starts, ends = np.asarray(labels.offsets[:-1]), np.asarray(labels.offsets[1:])
        return csum[ends] - csum[starts] - sup[np.minimum(starts, len(sup) - 1)] * (ends > starts)
    return np.array([sum(v != IGNORE_INDEX for v in row[1:]) for row in labels], dtype=np.int64)


def lr_at(step: int, *, lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to lr over `warmup` steps
    (step 0 already trains, at lr/warmup), then cosine decay towards 0 over the remaining steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batches_of(tokenized, micro_batch: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    b = collate([tokenized.input_ids[i] for i in micro_batch], [tokenized.labels[i] for i in micro_batch],
                pad_id=pad_id)
    return b["input_ids"].to(device, non_blocking=True), b["labels"].to(device, non_blocking=True)


@torch.no_grad()
def validation_loss(model, val, micro_batches, val_sup, *, pad_id, device, rank, world, chunk) -> tuple[float, int]:
    """Mean cross-entropy per supervised token over the validation subset (dropout off), all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for mb in micro_batches[rank::world]:
        ids, labels = batches_of(val, mb, pad_id, device)
        total += token_loss_sum(model, ids, labels, chunk).double()
        count += int(val_sup[mb].sum())
    both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
    if world > 1:
        torch.distributed.all_reduce(both)
    model.train(was_training)
    loss_sum, tokens = both.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


class DivergenceWatch:
    """Decides after each step's loss and gradient norm, before the update, whether training diverged.

    A step is abnormal when its loss or gradient norm is not finite, when its gradient is exactly
    zero (nothing can move any more; at loss ln(vocab) the model predicts every token alike, what an
    overflowed hidden state gives), or when its loss is above `factor` times the start (the mean of
    the first START_STEPS normal losses of the run). `check` returns the reason to stop, or None:
    at once for the first two, after `patience` abnormal steps in a row for the third.

    The loss of step s is computed with the weights after s - 1 updates, the ones checkpoint
    step-(s-1) holds; `suspect_from` is the first checkpoint step whose weights gave an abnormal loss
    in the current run of abnormal steps (None when the last step was normal).
    """

    START_STEPS = 10

    def __init__(self, factor: float, patience: int, vocab_size: int, state: dict | None = None):
        self.factor, self.patience, self.ln_vocab = factor, patience, math.log(vocab_size)
        state = state or {}
        self.start: list[float] = list(state.get("start", []))
        self.abnormal_since: int | None = state.get("abnormal_since")

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run judges divergence as the uninterrupted one."""
        return {"start": list(self.start), "abnormal_since": self.abnormal_since}

    @property
    def suspect_from(self) -> int | None:
        return None if self.abnormal_since is None else self.abnormal_since - 1

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        start = sum(self.start) / len(self.start) if self.start else None
        far = finite and bool(self.factor) and start is not None and loss > self.factor * start
        zero = finite and grad_norm == 0.0
        if finite and not far and not zero:
            self.abnormal_since = None
            if len(self.start) < self.START_STEPS:
                self.start.append(loss)
            return None
        if self.abnormal_since is None:
            self.abnormal_since = step
        if not finite:
            return f"the loss is {loss} (gradient norm {grad_norm})"
        if zero:
            uniform = abs(loss - self.ln_vocab) < 1e-3 * self.ln_vocab
            return (f"the gradient is exactly zero at loss {loss:.4f}" +
                    (f" = ln(vocab size) = {self.ln_vocab:.4f}: the model predicts every token alike (its hidden "
                     "state collapsed)" if uniform else ": nothing reaches the adapter any more"))
        run = step - self.abnormal_since + 1
        if run >= self.patience:
            return (f"the loss has been above {self.factor:g} x its start ({start:.4f}) for {run} steps in a row "
                    f"(now {loss:.6g}; --diverge-factor {self.factor:g}, --diverge-steps {self.patience})")
        return None


def weights_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the trainable weights together: inf or nan when any weight is not finite
    (or the weights have grown past what float32 holds)."""
    norms = torch._foreach_norm([p.detach() for p in params])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


# ---- files ------------------------------------------------------------------------------------------

def write_json(path: Path, obj) -> None:
    """Write a JSON file atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk before it is renamed into place."""
    for path in sorted(folder.rglob("*")) + [folder]:
        fsync_dir(path)   # an fsync of a file opened read-only, as of a folder


def replace_dir(tmp: Path, final: Path) -> None:
    """Put a complete folder `tmp` at `final`; an old `final` is removed only after the rename."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def save_adapter_dir(model, final: Path, base_name: str, extra: dict | None = None, base: dict | None = None) -> None:
    """An adapter folder (PEFT format, and base.json: the base it was trained on), written beside `final`
    and renamed into place."""
    from lora import save_adapter

    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(model, tmp, base_model_name_or_path=base_name, base=base)
    for name, obj in (extra or {}).items():
        write_json(tmp / name, obj)
    fsync_tree(tmp)
    replace_dir(tmp, final)


def rng_state() -> dict:
    """This process's RNG states in types torch.load(weights_only=True) accepts."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(keys), gauss],
             "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def slow_save_hook(step: int) -> None:
    """Test hook (see the module docstring): pause inside the checkpoint of one step."""
    spec = os.environ.get("SLM_EC_TEST_SLOW_SAVE")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (sorted by step number, not by name)."""
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if p.name[5:].isdigit() and (p / "state.pt").is_file() and (p / "adapter").is_dir():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, step: int, *, model, base_name: str, train_state: dict, config: dict,
                    keep_last: int, keep_also: Path | None = None, base: dict | None = None) -> Path:
    """checkpoints/step-NNNNNN, written under .tmp-step-NNNNNN and renamed when complete; then prune
    all but the last `keep_last` (and `keep_also`: the last good one while the loss looks abnormal)."""
    from lora import save_adapter

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_adapter(model, tmp / "adapter", base_model_name_or_path=base_name, base=base)
    slow_save_hook(step)
    torch.save(train_state, tmp / "state.pt")
    summary = {k: v for k, v in train_state.items() if k not in ("optimizer", "rng")}
    write_json(tmp / "trainer_state.json", summary)
    write_json(tmp / "config.json", config)
    fsync_tree(tmp)
    replace_dir(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:  # only once the new one is complete
        if old != keep_also:
            shutil.rmtree(old)
    return final


def set_aside_checkpoints(root: Path, from_step: int | None) -> tuple[Path | None, list[Path]]:
    """After a divergence: rename the checkpoints of steps >= from_step to diverged-step-NNNNNN (so that
    --resume auto skips them) and return (the newest remaining checkpoint, the renamed ones)."""
    saved = list_checkpoints(root)
    bad = [p for p in saved if from_step is not None and int(p.name[5:]) >= from_step]
    moved = []
    for p in bad:
        target = p.with_name(f"diverged-{p.name}")
        if target.exists():
            shutil.rmtree(target)
        os.rename(p, target)
        moved.append(target)
    good = [p for p in saved if p not in bad]
    return (good[-1] if good else None), moved


def is_train_config(path: Path) -> bool:
    """A config.json that train.py wrote (a run from before run markers existed), not a model's."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("args"), dict) and "format" in cfg and "model_id" in cfg


def run_leftovers(out: Path) -> list[Path]:
    """What a run writes into `out`: RUN_FILES and the temporary names it writes them under."""
    names = set(RUN_FILES)
    for name in RUN_FILES:
        names |= {f".tmp-{name}", f".old-{name}", f".{name}.tmp"}
    return sorted(p for p in (out / n for n in names) if p.exists() or p.is_symlink())


def remove_run_files(out: Path) -> list[str]:
    """--overwrite: delete what a run writes, nothing else (the marker and the lock stay)."""
    removed = []
    for p in run_leftovers(out):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p.name)
    return removed


def load_checkpoint(folder: Path) -> dict:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)


def find_resume(args, out: Path) -> list[Path]:
    """Checkpoint folders to try, newest first ([] = start fresh)."""
    if args.resume is None:
        return []
    if args.resume == "auto":
        return list_checkpoints(out / "checkpoints")[::-1]
    path = Path(args.resume).expanduser()
    if (path / "state.pt").is_file():
        return [path]
    found = list_checkpoints(path / "checkpoints")[::-1] or list_checkpoints(path)[::-1]
    if not found:
        fail(f"--resume {args.resume}: no complete checkpoint there (a checkpoint folder holds state.pt and "
             "adapter/)", 2)
    return found


def data_fingerprint(tokenized) -> str | None:
    """sha256 (16 hex digits) of tokenized rows' input ids and labels; None for no rows."""
    if tokenized is None:
        return None
    digest = hashlib.sha256()
    for ragged in (tokenized.input_ids, tokenized.labels):
        for part in (getattr(ragged, "values", None), getattr(ragged, "offsets", None)):
            digest.update(np.ascontiguousarray(part).tobytes() if part is not None else
                          json.dumps(list(map(list, ragged))).encode())
    return digest.hexdigest()[:16]


def compare_configs(saved: dict, now: dict, where: str, say) -> None:
    """Refuse a resume whose MUST_MATCH flags, resolved dtype or data differ; print the changes that are allowed."""
    s, n = saved.get("args", {}), now["args"]
    differ = [k for k in MUST_MATCH if k in s and s[k] != n[k]]
    if saved.get("dtype") and saved["dtype"] != now["dtype"]:
        differ.append(f"the base's dtype ({saved['dtype']} there, {now['dtype']} now: --dtype)")
    if saved.get("data_fingerprint") and now.get("data_fingerprint") and \
            saved["data_fingerprint"] != now["data_fingerprint"]:
        differ.append("data (the tokenized training rows differ)")
    if "val_fingerprint" in saved and "val_fingerprint" in now and saved["val_fingerprint"] != now["val_fingerprint"]:
        differ.append("validation set (the tokenized validation rows differ)")
    if differ:
        text = ", ".join(f"--{k.replace('_', '-')} {s[k]!r} there, {n[k]!r} now" if k in s else k for k in differ)
        fail(f"{where} holds a different run ({text}); use another --out, or --overwrite to start again", 2)
    changed = [k for k in MAY_CHANGE if k in s and s[k] != n[k]]
    if changed:
        say("resuming with changed settings: " + ", ".join(f"--{k.replace('_', '-')} {s[k]} -> {n[k]}"
                                                             for k in changed))


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return out


def keep_log_until(path: Path, step: int) -> None:
    """Drop log lines of steps after `step` (they are redone after a resume)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def plot_losses(out: Path) -> Path | None:
    """loss_curve.png from the logs, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = read_jsonl(out / "train_log.jsonl")
    val = read_jsonl(out / "val_log.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per supervised token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".loss_curve.png.tmp"
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, out / "loss_curve.png")   # a kill while drawing leaves no torn picture
    return out / "loss_curve.png"


def load_tokenizer_only(source: str) -> Tokenizer:
    """The tokenizer of a model source without its weights (for --dry-run)."""
    path = Path(source).expanduser()
    try:
        if source.endswith(".gguf"):
            return Tokenizer.from_gguf(path)
        if path.is_dir():
            return Tokenizer.from_dir(path)
    except (OSError, ValueError) as e:
        fail(f"could not read the tokenizer of {source}: {e}", 2)
    repo = PRESETS[source][0] if source in PRESETS else source
    try:
        from huggingface_hub import snapshot_download

        from model.hub import why_offline
        folder = snapshot_download(repo, allow_patterns=["tokenizer.json", "tokenizer_config.json", "config.json",
                                                         "generation_config.json", "special_tokens_map.json"],
                                   local_files_only=why_offline() is not None)   # no 25 s of retries offline
    except Exception as e:  # offline, gated, not found: one line, the library's reason
        fail(f"could not get the tokenizer of {repo} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "pass a local folder or .gguf file, or set HF_HUB_OFFLINE=1 to use the cache")
    try:
        return Tokenizer.from_dir(folder)
    except (OSError, ValueError) as e:
        fail(f"could not read the tokenizer of {repo}: {e}", 2)


def describe_data(train_rows, train, val_rows, val, steps_per_epoch, total_steps, warmup, args, tokenizer) -> str:
    """The --dry-run report: rows, lengths, truncation per task; steps; one rendered example."""
    lines = [f"{'task':<6} {'rows':>7} {'kept':>7} {'dropped':>7} {'truncated':>9} {'p50':>6} {'p95':>6} {'max':>6} "
             f"{'sup.tok':>9}"]
    sup = supervised_counts(train.labels)
    by_task: dict[str, list[int]] = {}
    for k, src in enumerate(train.source_index):
        by_task.setdefault(train_rows[src]["task"], []).append(k)
    for task, c in train.stats["per_task"].items():
        ks = by_task.get(task, [])
        lens = np.array([train.lengths[k] for k in ks]) if ks else np.zeros(1)
        lines.append(f"{ABBREV.get(task, task):<6} {c['rows']:>7} {len(ks):>7} {c['dropped']:>7} {c['truncated']:>9} "
                     f"{np.percentile(lens, 50):>6.0f} {np.percentile(lens, 95):>6.0f} {lens.max():>6.0f} "
                     f"{int(sup[ks].sum()) if ks else 0:>9}")
    s = train.stats
    lines.append(f"{'all':<6} {s['rows']:>7} {s['kept']:>7} {s['dropped']:>7} {s['truncated']:>9} "
                 f"{np.percentile(train.lengths, 50):>6.0f} {np.percentile(train.lengths, 95):>6.0f} "
                 f"{max(train.lengths):>6} {int(sup.sum()):>9}")
    lines.append(f"validation: {len(val) if val is not None else 0} rows (of {len(val_rows)} in the val split)")
    pad = padding_stats(train.lengths, plan_epoch(train.lengths, epoch=0, seed=args.seed, seqs_per_step=args.batch_size,
                                                  max_tokens=args.micro_batch_tokens))
    lines.append(f"steps: {steps_per_epoch} per epoch, {total_steps} in all, {warmup} of warm-up; "
                 f"{pad['micro_batches'] / max(pad['steps'], 1):.1f} micro-batches per step, "
                 f"{pad['padding']:.1%} padding")
    row = train_rows[train.source_index[0]]
    ids, labels = train.input_ids[0], train.labels[0]
    first = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX and i > 0)
    lines += ["", f"example ({row['task']}, {len(ids)} tokens, {sup[0]} supervised):",
              "---- prompt (masked) " + "-" * 40, tokenizer.decode(ids[:first], skip_special_tokens=False),
              "---- target (trained) " + "-" * 39, tokenizer.decode(ids[first:], skip_special_tokens=False),
              "-" * 61]
    return "\n".join(lines)


# ---- the run ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The command line: run(), with the output folder's lock released however it ends."""
    with contextlib.ExitStack() as held:
        return run(argv, held)


def run(argv: list[str] | None, held: contextlib.ExitStack) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)

    # Processes: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python train.py` is one rank.
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0),
                                                                        ("LOCAL_RANK", 0)))
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 or device.index is None else device.index)
        torch.cuda.set_device(device)
    # auto: bf16 on a GPU that has it or a CPU with native bf16 (cpuinfo flags); bf16 emulated on a CPU warns
    dtype = resolve_dtype(args.dtype, device, warn=None if rank == 0 else (lambda message: None))
    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out or Path("runs") / model_slug(args.model)).expanduser()
    run_args = {k: v for k, v in vars(args).items()
                if k not in ("print_config", "dry_run", "resume", "overwrite", "debug_nan_at_step")}
    config = {"args": run_args, "model_id": PRESETS[args.model][0] if args.model in PRESETS else args.model,
              "out": str(out), "device": device.type, "dtype": str(dtype).removeprefix("torch."), "world_size": world,
              "format": FORMAT}
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0

    # The output folder: one live run at a time (the lock, held until main returns); a folder holding a
    # run is only continued (--resume) or replaced (--overwrite, only where train.py left its marker).
    if not args.dry_run:
        if rank == 0:
            try:
                held.enter_context(FolderLock(out, "train.py", LOCK_NAME))
            except FolderBusy as e:
                fail(str(e), 2)
            except OSError as e:
                fail(f"--out {out}: cannot write there ({e.strerror or e})", 2)
        found = [p.name + ("/" if p.is_dir() else "") for p in run_leftovers(out)]
        if found and not (out / RUN_MARKER).is_file():
            legacy = is_train_config(out / "config.json")
            if not (legacy and args.resume):
                fail(f"{out} holds {', '.join(found)} but no {RUN_MARKER}, so train.py did not write it"
                     + (" (a run from before run markers: continue it with --resume auto, or delete it yourself)"
                        if legacy else " (a model folder?): pass another --out; --overwrite deletes only folders "
                                       "train.py wrote"), 2)
        holds_run = (out / "config.json").is_file() or bool(list_checkpoints(out / "checkpoints"))
        if holds_run and not args.resume and not args.overwrite:
            fail(f"{out} already holds a run; pass --resume auto to continue it, --overwrite to start again, or "
                 "another --out", 2)
        if args.resume == "auto" and (out / "config.json").is_file():  # flags now, the data once it is read
            compare_configs(json.loads((out / "config.json").read_text()), config, str(out), lambda *a: None)
        resume_from = find_resume(args, out)
        if resume_from and args.resume != "auto":
            compare_configs(json.loads((resume_from[0] / "config.json").read_text()), config,
                            str(resume_from[0]), say)

    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(minutes=30))

    # ---- data: read and checked before any weight is loaded (a bad row costs no model load) -----------
    t_start = time.time()
    settings = args.setting.split(",")
    try:
        all_rows = read_rows(args.dataset, skip_invalid=args.skip_invalid)
        train_rows = select_rows(all_rows, split="train", tasks=args.tasks, settings=settings, source=args.dataset)
        try:
            val_rows = select_rows(all_rows, split="val", tasks=args.tasks, settings=settings,
                                   source=args.dataset) if args.val_size else []
        except DataError:
            val_rows = []
            say(f"note: {args.dataset} has no val rows for these tasks and setting: no validation loss, no best/")
    except DataError as e:
        fail(str(e), 2)
    tokenizer = load_tokenizer_only(args.model) if args.dry_run else None
    model = None
    if tokenizer is None:
        say(f"loading {config['model_id']} ({'NF4' if args.quant == 'nf4' else config['dtype']} base, "
            f"{config['dtype']} compute) on {device}")
        quantize = None
        if args.quant == "nf4":   # each linear quantized as it is read: the dense base is never held whole
            from functools import partial

            from lora import quantize_nf4
            quantize = partial(quantize_nf4, compute_dtype=dtype)
        try:
            model, tokenizer = load_model(args.model, dtype=dtype, device=device, quantize_linear=quantize)
        except ImportError as e:
            fail(f"--quant nf4 needs bitsandbytes ({e}); install it or pass --quant none")
        except (OSError, RuntimeError, ValueError) as e:
            fail(f"could not load the model {args.model}: {e}")
    del all_rows
    if args.max_train_rows and args.max_train_rows < len(train_rows):
        keep = sorted(random.Random(args.seed).sample(range(len(train_rows)), args.max_train_rows))
        train_rows = [train_rows[i] for i in keep]
    if len(val_rows) > args.val_size:
        keep = sorted(random.Random(args.seed + 1).sample(range(len(val_rows)), args.val_size))
        val_rows = [val_rows[i] for i in keep]
    cache = args.cache_dir or None
    tok_kw = dict(cutoff=args.cutoff, template=args.template, train_on_inputs=args.train_on_inputs, cache_dir=cache,
                  verbose=rank == 0)
    try:
        train = tokenize_rows(train_rows, tokenizer, **tok_kw)
        val = tokenize_rows(val_rows, tokenizer, **tok_kw) if val_rows else None
    except ValueError as e:
        fail(f"could not tokenize the data: {e}", 2)
    if len(train) == 0:
        fail(f"no training example fits in --cutoff {args.cutoff} tokens", 2)
    if val is not None and len(val) == 0:
        val = None
    train_sup = supervised_counts(train.labels)
    val_sup = supervised_counts(val.labels) if val is not None else None
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = math.ceil(args.warmup_ratio * total_steps)
    config.update(data_fingerprint=data_fingerprint(train), val_fingerprint=data_fingerprint(val),
                  tokenizer_fingerprint=tokenizer.fingerprint[:16],
                  train_rows=len(train), val_rows=len(val) if val is not None else 0, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, warmup_steps=warmup)
    if args.dry_run:
        say(describe_data(train_rows, train, val_rows, val, steps_per_epoch, total_steps, warmup, args, tokenizer))
        return 0
    if args.resume == "auto" and (out / "config.json").is_file():
        compare_configs(json.loads((out / "config.json").read_text()), config, str(out), say)

    # ---- model: frozen base (NF4 or dense) + LoRA -----------------------------------------------------
    from lora import TARGET_PRESETS, apply_lora, load_adapter

    from model import Llama

    with torch.device("meta"):
        n_params = count_parameters(Llama(model.config))   # counted dense: an NF4 parameter packs two weights a byte
    use_gc = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and n_params >= BIG_MODEL)
    targets = args.lora_targets
    if targets not in ("default", *TARGET_PRESETS):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    kw = {} if targets == "default" else {"targets": targets}
    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    try:
        apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   quantize="nf4" if args.quant == "nf4" else None, compute_dtype=dtype, lora_dtype=torch.float32, **kw)
    except (ValueError, KeyError) as e:
        fail(f"--lora-targets {args.lora_targets}: {e}", 2)
    except ImportError as e:
        fail(f"--quant nf4 needs bitsandbytes ({e}); install it or pass --quant none")
    model.gradient_checkpointing = use_gc
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    if world > 1:  # identical starting adapter on every rank, whatever happened to the RNG
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    # The adapter names its base only by hub id (never a path of this machine); lora falls back to config.name.
    base_name = config["model_id"] if args.model in PRESETS or not Path(args.model).expanduser().exists() else None
    from lora import base_fingerprint, base_record

    base = base_record(base_model=base_name, base_checkpoint=args.model, quantization=model.lora_config["quantize"],
                       dtype=dtype, compute_dtype=dtype, fingerprint=base_fingerprint(model))   # base.json of every adapter
    config.update(base_model=base_name, parameters=n_params, trainable_parameters=n_train,
                  gradient_checkpointing=use_gc)
    say(f"model: {n_params / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable ({100 * n_train / n_params:.2f}%), "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g}, "
        f"gradient checkpointing {'on' if use_gc else 'off'}")
    say(f"data: {len(train)} training examples ({train.stats.get('truncated', 0)} truncated, "
        f"{train.stats.get('dropped', 0)} dropped), {len(val) if val is not None else 0} validation; "
        f"{steps_per_epoch} steps per epoch of {args.batch_size} sequences, {total_steps} steps, {warmup} warm-up"
        + (f", {world} processes" if world > 1 else ""))

    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    val_mbs = plan_epoch(val.lengths, epoch=0, seed=args.seed, seqs_per_step=len(val),
                         max_tokens=args.micro_batch_tokens)[0] if val is not None else []

    # ---- where to start: fresh, or exactly where a checkpoint left off ------------------------------------
    step, epoch, pos = 0, 0, 0
    best_val, best_step, elapsed = None, None, 0.0
    watch = DivergenceWatch(args.diverge_factor, args.diverge_steps, model.config.vocab_size)
    resumed_from = None
    for folder in resume_from:
        try:
            state = load_checkpoint(folder)
            load_adapter(model, folder / "adapter")
        except Exception as e:  # a damaged checkpoint: say so and fall back to the one before
            say(f"warning: cannot load {folder} ({type(e).__name__}: {e}); trying an older checkpoint")
            continue
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, pos = state["step"], state["epoch"], state["step_in_epoch"]
        best_val, best_step, elapsed = state["best_val_loss"], state["best_step"], state["elapsed_s"]
        watch = DivergenceWatch(args.diverge_factor, args.diverge_steps, model.config.vocab_size,
                                state.get("divergence"))
        rngs = state["rng"]
        if len(rngs) != world:
            say(f"note: the checkpoint was written by {len(rngs)} process(es), this run has {world}: the data "
                "order and the maths are the same, the dropout masks differ")
        set_rng_state(rngs[rank % len(rngs)])
        resumed_from = folder
        break
    if resume_from and resumed_from is None:
        fail(f"no checkpoint under {resume_from[0].parent} could be loaded")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:   # only now, once the model and the data have loaded: a failed start deletes nothing
            removed = remove_run_files(out)
            if removed:
                say(f"--overwrite: removed {', '.join(removed)} from {out}")
        if not (out / RUN_MARKER).is_file():
            write_json(out / RUN_MARKER, {
                "written_by": "slm-ec train.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "run_files": list(RUN_FILES),
                "note": "this folder holds a train.py run; --overwrite deletes the run files (and their "
                        ".tmp-/.old- forms) here, and nothing else"})
        write_json(out / "config.json", config)
        for name in ("train_log.jsonl", "val_log.jsonl"):
            if resumed_from is not None:
                keep_log_until(out / name, step)
            else:
                (out / name).write_text("")
        for stale in (out / "checkpoints").glob(".tmp-step-*") if (out / "checkpoints").is_dir() else []:
            shutil.rmtree(stale)  # left by a run killed while writing a checkpoint
    if resumed_from is not None:
        say(f"resumed from {resumed_from} at step {step} (epoch {epoch}, step {pos} of it)")
    else:
        torch.manual_seed(args.seed + rank)  # dropout masks: seeded, different on each rank
        say(f"writing to {out}")
    if step >= total_steps:
        say(f"the run in {out} is already complete ({step} steps)")

    def train_state() -> dict:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        return {"format": FORMAT, "step": step, "epoch": epoch, "step_in_epoch": pos, "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch, "optimizer": optimizer.state_dict(),
                "scheduler": {"kind": "cosine", "lr": args.lr, "warmup_steps": warmup, "total_steps": total_steps,
                              "last_lr": lr_at(max(step - 1, 0), lr=args.lr, warmup=warmup, total=total_steps)},
                "rng": rngs, "best_val_loss": best_val, "best_step": best_step, "elapsed_s": elapsed,
                "world_size": world, "divergence": watch.state()}

    def checkpoint_now() -> Path | None:
        state = train_state()  # every rank takes part (RNG gather)
        path = None
        if rank == 0:
            suspect = watch.suspect_from   # while the loss looks abnormal, the last good checkpoint is never pruned
            good = [p for p in list_checkpoints(out / "checkpoints") if int(p.name[5:]) < suspect] if suspect else []
            path = save_checkpoint(out / "checkpoints", step, model=model, base_name=base_name, train_state=state,
                                   config=config, keep_last=args.keep_last, keep_also=good[-1] if good else None,
                                   base=base)
        if world > 1:
            torch.distributed.barrier()
        return path

    def run_validation() -> float | None:
        nonlocal best_val, best_step
        if val is None:
            return None
        loss, tokens = validation_loss(model, val, val_mbs, val_sup, pad_id=tokenizer.pad_id, device=device,
                                       rank=rank, world=world, chunk=args.loss_chunk_tokens)
        improved = best_val is None or loss < best_val
        if improved:
            best_val, best_step = loss, step
        if rank == 0:
            with open(out / "val_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "epoch": round(step / steps_per_epoch, 4), "val_loss": loss,
                                    "val_tokens": tokens, "best": improved}) + "\n")
            if improved:
                save_adapter_dir(model, out / "best", base_name, {"best.json": {"step": step, "val_loss": loss}}, base)
        return loss

    def stop_diverged(at_step: int, reason: str, suspect_from: int) -> None:
        """One line, exit 1; checkpoints whose weights are suspect are set aside, the last good one named."""
        good, moved = None, []
        if rank == 0:
            good, moved = set_aside_checkpoints(out / "checkpoints", suspect_from)
        aside = (f"; {len(moved)} checkpoint(s) from the divergence on set aside as {out / 'checkpoints'}/diverged-step-*"
                 if moved else "")
        fail(f"training diverged at step {at_step}: {reason}. Stopped; nothing from this step is saved{aside}. "
             + (f"The last good checkpoint is {good}: " if good else "No checkpoint predates the divergence: ")
             + f"lower --lr (now {args.lr:g}) or check the data, then --resume auto "
             + ("continues from it" if good else "starts again from step 0"))

    # Ctrl-C / SIGTERM: finish the step, write a checkpoint, exit 130. A second Ctrl-C stops at once.
    stop = {"asked": False}
    old_handlers = {}

    def ask_stop(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              "(again to stop now)", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, ask_stop)
        except ValueError:  # not the main thread
            pass

    # ---- the loop ---------------------------------------------------------------------------------
    from tqdm import tqdm

    first_val = run_validation() if resumed_from is None and step < total_steps else None
    if first_val is not None:
        say(f"step 0: val loss {first_val:.4f}")
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=rank != 0 or args.no_progress or not sys.stderr.isatty())
    plan, plan_for = None, None
    last_saved = step if resumed_from is not None else -1
    run_t0, run_tokens, steps_here = time.perf_counter(), 0, 0
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            if plan_for != epoch:
                plan = plan_epoch(train.lengths, epoch=epoch, seed=args.seed, seqs_per_step=args.batch_size,
                                  max_tokens=args.micro_batch_tokens)
                plan_for = epoch
            micro = plan[pos]
            rows = [i for mb in micro for i in mb]
            n_sup = max(int(train_sup[rows].sum()), 1)   # supervised tokens of the whole step, all ranks
            n_tok = int(sum(train.lengths[i] for i in rows))
            lr = lr_at(step, lr=args.lr, warmup=warmup, total=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), dtype=torch.float32, device=device)
            try:
                for mb in micro[rank::world]:
                    ids, labels = batches_of(train, mb, tokenizer.pad_id, device)
                    loss = token_loss_sum(model, ids, labels, args.loss_chunk_tokens) / n_sup
                    if args.debug_nan_at_step is not None and step + 1 == args.debug_nan_at_step:
                        loss = loss * float("nan")
                    loss.backward()
                    step_loss += loss.detach()
            except torch.OutOfMemoryError:
                fail(f"out of memory at step {step + 1} (micro-batch of {ids.shape[0]} x {ids.shape[1]} tokens): "
                     f"lower --micro-batch-tokens (now {args.micro_batch_tokens})"
                     + ("" if use_gc else ", or pass --gradient-checkpointing on")
                     + f", or lower --cutoff (now {args.cutoff}); the last checkpoint is kept. "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True can help with fragmentation")
            if world > 1:  # sum the LoRA gradients (and the loss, and the stop flag) over ranks, one bucket
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                                 + [step_loss.reshape(1), torch.tensor([float(stop["asked"])], device=device)])
                torch.distributed.all_reduce(flat)
                offset = 0
                for p in params:
                    p.grad = flat[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
                step_loss, stop["asked"] = flat[offset], bool(flat[offset + 1].item() > 0)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
            loss_value, norm_value = torch.stack([step_loss, grad_norm.to(step_loss)]).tolist()  # one sync
            reason = watch.check(step + 1, loss_value, norm_value)
            if reason is not None:
                stop_diverged(step + 1, reason, watch.suspect_from)
            # a failed update: its own weights are never saved; earlier ones are suspect only in a run of abnormal losses
            suspect = step + 1 if watch.suspect_from is None else watch.suspect_from
            try:
                optimizer.step()
            except RuntimeError as e:   # AdamW's step size itself overflows float32 (--lr 1e38)
                if "overflow" not in str(e):
                    raise
                stop_diverged(step + 1, f"the update overflows float32 ({e})", suspect)
            if not math.isfinite(weights_norm(params).item()):   # the other sync of the step
                stop_diverged(step + 1, "the update left adapter weights that are not finite or beyond float32",
                              suspect)
            optimizer.zero_grad(set_to_none=True)
            if step == 0 and resumed_from is None:  # the adapter must move (a frozen graph would train nothing)
                moved = any(float(m.lora_B.weight.detach().abs().sum()) > 0 for m in model.modules() if hasattr(m, "lora_B"))
                if not moved:
                    fail("after step 1 every lora_B is still zero: no gradient reached the adapter")
            step, pos = step + 1, pos + 1
            epoch_end = pos == len(plan)
            if epoch_end:
                epoch, pos = epoch + 1, 0

            dt = time.perf_counter() - t0
            elapsed += dt
            run_tokens += n_tok
            steps_here += 1
            mem = peak_memory_gb(device)
            record = {"step": step, "epoch": round(epoch + pos / len(plan), 4), "loss": loss_value, "lr": lr,
                      "grad_norm": norm_value, "tokens": n_tok, "supervised_tokens": n_sup,
                      "tokens_per_s": round(n_tok / dt, 1), "peak_mem_gb": round(mem, 3), "time": round(elapsed, 3)}
            if rank == 0:
                with open(out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:.0f}", mem=f"{mem:.1f}GB",
                            refresh=False)
            bar.update(1)
            if bar.disable and (step % args.log_every == 0 or step == total_steps):
                rate = (time.perf_counter() - run_t0) / steps_here
                say(f"step {step}/{total_steps} | loss {loss_value:.4f} | lr {lr:.2e} | {n_tok / dt:.0f} tok/s | "
                    f"mem {mem:.1f} GB | eta {timedelta(seconds=round(rate * (total_steps - step)))}", flush=True)

            if epoch_end or step == total_steps or (args.eval_every and step % args.eval_every == 0):
                v = run_validation()
                if v is not None and rank == 0:
                    tqdm.write(f"step {step}: val loss {v:.4f} (best {best_val:.4f} at step {best_step})")
            if epoch_end or step == total_steps or step % args.save_every == 0 or stop["asked"]:
                checkpoint_now()
                last_saved = step
            if stop["asked"]:
                say(f"stopped at step {step}; continue with --resume auto (--out {out})", file=sys.stderr)
                raise SystemExit(130)
    finally:
        bar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    # ---- the end: final adapter, curve, summary -----------------------------------------------------------
    if last_saved != step and step > 0:
        checkpoint_now()
    if rank == 0:
        save_adapter_dir(model, out / "adapter", base_name, base=base)
        curve = plot_losses(out)
        wall = time.perf_counter() - run_t0
        vals = read_jsonl(out / "val_log.jsonl")
        say("---- summary " + "-" * 48)
        say(f"steps: {step} ({step / steps_per_epoch:.2f} epochs) in {timedelta(seconds=round(elapsed))} of training"
            + (f", {run_tokens / wall:.0f} tokens/s this session" if steps_here else ""))
        say(f"peak memory: {peak_memory_gb(device):.2f} GB ({'GPU allocated' if device.type == 'cuda' else 'RSS'})")
        if vals:
            say(f"validation loss: {vals[0]['val_loss']:.4f} (step {vals[0]['step']}) -> {vals[-1]['val_loss']:.4f} "
                f"(step {vals[-1]['step']}); best {best_val:.4f} at step {best_step} in {out / 'best'}")
        say(f"adapter: {out / 'adapter'}; log: {out / 'train_log.jsonl'}; "
            + (f"loss curve: {curve}" if curve else "no loss curve (pip install matplotlib)"))
        say(f"total time {timedelta(seconds=round(time.time() - t_start))}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")   # a path that cannot be encoded is shown escaped
    sys.stderr.reconfigure(errors="backslashreplace")
    sys.exit(main())
