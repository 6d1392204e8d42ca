"""Fine-tune a small Llama (SmolLM2, Llama 3.2) with QLoRA on ECInstruct: a plain PyTorch loop.

    python train.py --model smollm2-360m                       # the paper's recipe, nothing else to set
    python train.py --model smollm2-360m --resume auto         # continue an interrupted run exactly
    python train.py --model FILE.gguf --dataset SAMPLE.jsonl --quant none --max-steps 50 --out runs/try
    python train.py --model smollm2-360m --dry-run             # data statistics and one example, no weights
    python train.py --model smollm2-360m --print-config > r.json && python train.py --config r.json --lr 2e-4
    torchrun --nproc_per_node=4 train.py --model llama3.2-1b   # data-parallel, same global batch, same loss

Defaults reproduce eCeLLM's recipe (finetune.sh / finetune.py) in its QLoRA form: NF4 base with bf16
compute, LoRA r=16 alpha=16 dropout=0.1, IND_Diverse_Instruction train split on all 10 tasks, AdamW
lr 1e-4, cosine schedule with 5% warm-up, 128 sequences per optimizer step, cut-off 2048, 3 epochs,
validation loss each epoch on a seeded 1,000-row subset of the val split, best adapter kept.

The flags are train_config.py's (RunConfig, one field per flag); this file reads top to bottom as a run does: data,
model, the loss, the loop, main().
What one optimizer step does (Trainer.step):
  1. the step's 128 rows come from data.plan_epoch (a pure function of seed and epoch, so resuming is
     "skip the steps already done"), already cut into the fewest micro-batches of --micro-batch-tokens;
  2. N = the supervised tokens of the whole step (all micro-batches, all ranks), known before any forward;
  3. each micro-batch, its rows laid end to end without padding (data.pack, model.Packing: attention
     row by row; on a CPU in bf16 a filler row that no loss sees rounds the tokens up to a multiple of
     FILL_TO): loss = (sum of token cross-entropies) / N, backward. The gradients add up to
     the gradient of the mean over every supervised token of the step, however the rows were split
     (not a mean of micro-batch means, the 2024 gradient-accumulation bug);
  4. under torchrun each rank runs its share of the micro-batches (round robin) and the LoRA
     gradients are summed across ranks with one all_reduce: with the 1/N above, the sum is the
     single-process gradient;
  5. clip the gradient norm, check for divergence, AdamW step (LoRA parameters only), lr from lr_at(step);
     on a CPU, the memory the step freed goes back to the OS (model.cpu.release_free_memory).
The loss never builds the full (B, T, vocab) float32 logits: hidden states at supervised positions
only go through lm_head in chunks, each under activation checkpointing.

The output folder (--out: its lock, the files it holds, checkpoints, what a resume may change) is
run_folder.py's: see its docstring. Every adapter folder holds base.json, the base it was trained on;
evaluate.py and export.py take their defaults from it.

Divergence stops the run like a NaN does, before the update: a non-finite loss or gradient, an
update that overflows or leaves a non-finite weight, a gradient of exactly zero (the model has
collapsed: at loss ln(vocab) it predicts every token alike), or a loss above --diverge-factor times
its start (the mean of the first 10 normal losses) for --diverge-steps steps in a row. The message
names the last good checkpoint; later ones are set aside, so --resume auto (with a lower --lr)
continues from the good one. Under torchrun a rank that fails tells the others through the process
group's store, and they stop within seconds (watch.PeerWatch) instead of waiting out the collective timeout.

Exit codes: 0 done; 1 the run failed (divergence, out of memory, a model that cannot be loaded, a
failed peer rank); 2 bad flags, bad data, or a refused or busy output folder; 130 interrupted (Ctrl-C
or SIGTERM: a checkpoint is written first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cli import folder_name, missing_package, resolve_device, resolve_dtype

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from data import IGNORE_INDEX, DataError, pack, parse_tasks, plan_epoch, read_rows, select_rows, tokenize_rows
    from data.ecinstruct import VAL_FRACTION, describe_counts, hold_out, is_all
    from data.batching import plan_stats
    from model import PRESETS, Packing, count_parameters, load_tokenizer
    from model.load import source_kind, source_name
    from model.cpu import limit_kernel_cache, map_large_blocks, release_free_memory, rss_gb
    from outdir import DiskFull
    from run_folder import FORMAT, RunFolder, RunRefused, data_fingerprint, list_checkpoints, rng_state, set_rng_state
    from train_config import RunConfig, check_args, parse_args
    from watch import DivergenceWatch, StopSignal, start_processes
except ModuleNotFoundError as e:   # the system python instead of .venv/bin/python
    missing_package("train.py", e)

BIG_MODEL = 1_000_000_000       # --gradient-checkpointing auto turns it on from this many parameters


def fail(message: str, code: int = 1):
    """Stop with one clear line on stderr."""
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ---- data -------------------------------------------------------------------------------------------

def read_data(args, say) -> tuple[list[dict], list[dict]]:
    """The training and validation rows, read and checked before any weight is loaded (a bad row costs no
    model load): the --tasks and --setting selection (rows that name no split held out by data.hold_out), then
    seeded subsets of --max-train-rows and --val-size."""
    settings = args.setting.split(",")

    def chosen(rows, split):
        try:
            return select_rows(rows, split=split, tasks=args.tasks, settings=settings, source=args.dataset)
        except DataError:
            return []

    try:
        all_rows = read_rows(args.dataset, skip_invalid=args.skip_invalid)
        held_train, held_val = hold_out(chosen(all_rows, "unsplit"), seed=args.seed)
        if held_train or held_val:
            say(f"rows without a split: {len(held_train)} train, {len(held_val)} held out for validation "
                f"({VAL_FRACTION:.0%} of each task's, seed {args.seed})")
        train_rows = chosen(all_rows, "train") + held_train
        if not train_rows:   # the error that says what the file holds
            select_rows(all_rows, split="train", tasks=args.tasks, settings=settings, source=args.dataset)
        lacking = [t for t in ([] if is_all(args.tasks) else parse_tasks(args.tasks))
                   if not any(r["task"] == t for r in train_rows)]
        if lacking:
            raise DataError(f"--tasks names {', '.join(lacking)}, which has no training rows in {args.dataset} "
                            f"(it holds: {describe_counts(all_rows)})")
        val_rows = (chosen(all_rows, "val") + held_val) if args.val_size else []
        if args.val_size and not val_rows:
            say(f"note: {args.dataset} has no val rows for these tasks and setting: no validation loss, no best/")
    except DataError as e:
        fail(str(e), 2)
    if args.max_train_rows and args.max_train_rows < len(train_rows):
        keep = sorted(random.Random(args.seed).sample(range(len(train_rows)), args.max_train_rows))
        train_rows = [train_rows[i] for i in keep]
    if len(val_rows) > args.val_size:
        keep = sorted(random.Random(args.seed + 1).sample(range(len(val_rows)), args.val_size))
        val_rows = [val_rows[i] for i in keep]
    return train_rows, val_rows


@dataclass
class Data:
    """Tokenized rows and the schedule they give: supervised tokens per row, steps per epoch, in all, of warm-up."""
    train: object                   # data.TokenizedData
    val: object | None
    train_sup: np.ndarray           # (rows,) supervised tokens of each training row
    val_sup: np.ndarray | None
    steps_per_epoch: int
    total_steps: int
    warmup: int


def tokenize_data(args, train_rows: list[dict], val_rows: list[dict], tokenizer, *, verbose: bool) -> Data:
    """eCeLLM's prompts, tokenized with the prompt masked and cut to --cutoff (data.tokenize_rows, cached)."""
    kw = dict(cutoff=args.cutoff, template=args.template, train_on_inputs=args.train_on_inputs,
              cache_dir=args.cache_dir or None, verbose=verbose)
    try:
        train = tokenize_rows(train_rows, tokenizer, **kw)
        val = tokenize_rows(val_rows, tokenizer, **kw) if val_rows else None
    except ValueError as e:
        fail(f"could not tokenize the data: {e}", 2)
    if len(train) == 0:
        fail(f"no training example fits in --cutoff {args.cutoff} tokens", 2)
    val = val if val is not None and len(val) else None
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.max_steps or args.epochs * steps_per_epoch
    return Data(train, val, supervised_counts(train.labels), supervised_counts(val.labels) if val else None,
                steps_per_epoch, total, math.ceil(args.warmup_ratio * total))


def describe_data(train_rows: list[dict], data: Data, args, tokenizer) -> str:
    """The --dry-run report: data.inspect's token lengths per task and example, then validation rows, steps
    and the length-grouped micro-batches."""
    from data.inspect import describe_tokenized

    plan = plan_epoch(data.train.lengths, epoch=0, seed=args.seed, seqs_per_step=args.batch_size,
                      max_tokens=args.micro_batch_tokens)
    stats = plan_stats(data.train.lengths, plan, max_tokens=args.micro_batch_tokens)
    return "\n".join([
        describe_tokenized(train_rows, data.train, tokenizer, train_on_inputs=args.train_on_inputs),
        f"\nvalidation: {len(data.val) if data.val is not None else 0} rows",
        f"steps: {data.steps_per_epoch} per epoch, {data.total_steps} in all, {data.warmup} of warm-up; "
        f"{stats['micro_batches'] / max(stats['steps'], 1):.1f} micro-batches per step, {stats['fill']:.0%} full on "
        f"average (--micro-batch-tokens {args.micro_batch_tokens}), each run padding-free (rows end to end, attention "
        "row by row)"])


# ---- model ------------------------------------------------------------------------------------------

def load_frozen_base(args, dtype, device, tokenizer, say):
    """The frozen base: lora.base.load_base, which says in one line what it loads. With --quant nf4 each linear layer
    is quantized as it is read, so the dense base is never held whole; `tokenizer` (read with the data) is not read
    again."""
    from lora.base import load_base

    try:
        return load_base(args.model, args.quant, dtype, device, say=say, tokenizer=tokenizer)[0]
    except ImportError as e:
        fail(f"--quant nf4 needs bitsandbytes ({e}); install it or pass --quant none")
    except (OSError, RuntimeError, ValueError) as e:
        fail(f"could not load the model {args.model}: {e}")


def add_lora(model, args, dtype, world: int) -> tuple[list[torch.nn.Parameter], int, bool]:
    """LoRA on the --lora-targets (the paper's: seven projections + lm_head), the same initial adapter on every
    rank; (its trainable parameters, the base's parameter count, gradient checkpointing on or not)."""
    from lora import TARGET_PRESETS, apply_lora
    from model import Llama

    with torch.device("meta"):
        n_params = count_parameters(Llama(model.config))   # counted dense: an NF4 parameter packs two weights a byte
    use_gc = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and n_params >= BIG_MODEL)
    targets = args.lora_targets
    if targets not in ("default", *TARGET_PRESETS):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    try:   # the base arrives NF4 or dense from load_base: LoRA wraps its layers as they are
        apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, compute_dtype=dtype,
                   lora_dtype=torch.float32, **({} if targets == "default" else {"targets": targets}))
    except (ValueError, KeyError) as e:
        fail(f"--lora-targets {args.lora_targets}: {e}", 2)
    model.gradient_checkpointing = use_gc
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:  # identical starting adapter on every rank, whatever happened to the RNG
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    return params, n_params, use_gc


# ---- the loss -------------------------------------------------------------------------------------

def _chunk_ce(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk; logits (n, vocab) upcast to float32 here only."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def token_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = 2048,
                   packing: Packing | None = None) -> torch.Tensor:
    """Sum over supervised tokens of -log p(label), a float32 scalar.

    labels (B, T) are aligned with input_ids (Hugging Face convention): the hidden state at position t
    predicts labels[:, t + 1]; -100 (prompt, padding) is not supervised. With `packing`, input_ids and
    labels are (1, N), the rows end to end (data.pack: each row's first label is -100, so no row
    predicts the next one's first token). Only supervised positions go through lm_head, `chunk` at a
    time, each chunk under non-reentrant checkpointing so its logits are recomputed in backward.
    """
    hidden = model(input_ids, packing=packing, return_hidden=True)   # (B, T, H); packed: (1, N, H)
    targets = labels[:, 1:]                                      # (B, T-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]                                     # (n, H) supervised positions only
    y = targets[keep]                                            # (n,)
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


# On a CPU computing in bf16/fp16 a micro-batch's token count is rounded up to a multiple of this (data.pack's filler
# row, which no loss sees) and each row's attention length too (model.Packing's block): PyTorch's low-precision CPU
# kernels are built and kept for every shape they meet, so rows and micro-batches of ever-new lengths made a run's
# memory climb step after step; with lengths in steps of 64 it stays flat (bench/train_memory.py, README). float32
# keeps no such kernels and gets neither.
FILL_TO = 64


def token_multiple(device: torch.device, dtype_name: str) -> int:
    """The multiple micro-batches and attention rows are filled up to: FILL_TO on a CPU in bfloat16 or float16, else
    1 (none)."""
    return FILL_TO if device.type == "cpu" and dtype_name in ("bfloat16", "float16") else 1


def packed_micro_batch(tokenized, micro_batch: list[int], device,
                       multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """A micro-batch padding-free: ids and labels (1, N), its rows end to end (and a filler row up to a multiple of
    `multiple` tokens, which no loss sees: see FILL_TO), and their Packing (attention rows padded to `multiple`)."""
    b = pack([tokenized.input_ids[i] for i in micro_batch], [tokenized.labels[i] for i in micro_batch],
             multiple=multiple)
    return (b["input_ids"].to(device, non_blocking=True), b["labels"].to(device, non_blocking=True),
            Packing(b["lengths"], device, block=multiple))


@torch.no_grad()
def validation_loss(model, val, micro_batches, val_sup, *, device, rank, world, chunk,
                    multiple: int = 1) -> tuple[float, int]:
    """Mean cross-entropy per supervised token over the validation subset (dropout off), all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for mb in micro_batches[rank::world]:
        ids, labels, packing = packed_micro_batch(val, mb, device, multiple)
        total += token_loss_sum(model, ids, labels, chunk, packing).double()
        count += int(val_sup[mb].sum())
    both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
    if world > 1:
        torch.distributed.all_reduce(both)
    model.train(was_training)
    loss_sum, tokens = both.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def weights_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all the trainable weights together: inf or nan when any weight is not finite
    (or the weights have grown past what float32 holds)."""
    norms = torch._foreach_norm([p.detach() for p in params])
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


# ---- the loop ---------------------------------------------------------------------------------------

def peak_memory_gb(device) -> float:
    """The peak so far: GPU memory allocated by torch on a GPU, the process's resident set (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


@dataclass
class Progress:
    """Where the run is (with the optimizer and the RNG, what a checkpoint's state.pt holds)."""
    step: int = 0                   # optimizer steps done
    epoch: int = 0
    pos: int = 0                    # steps done in this epoch
    best_val: float | None = None
    best_step: int | None = None
    elapsed: float = 0.0            # seconds of training over every session of the run


@dataclass
class Trainer:
    """The training of one run: the model's LoRA parameters, AdamW over them, the data, the folder it writes."""
    args: RunConfig
    model: torch.nn.Module
    params: list
    data: Data
    folder: RunFolder
    config: dict
    base_name: str | None            # the hub id adapters name as their base (never a path of this machine)
    base: dict                       # base.json of every adapter
    device: torch.device
    rank: int = 0
    world: int = 1
    progress: Progress = field(default_factory=Progress)
    stop: StopSignal = field(default_factory=StopSignal)

    def __post_init__(self):
        a = self.args
        self.optimizer = torch.optim.AdamW(self.params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=a.weight_decay)
        self.watch = DivergenceWatch(a.diverge_factor, a.diverge_steps, self.model.config.vocab_size)
        val = self.data.val
        self.val_micro = plan_epoch(val.lengths, epoch=0, seed=a.seed, seqs_per_step=len(val),
                                    max_tokens=a.micro_batch_tokens)[0] if val is not None else []
        self.say = print if self.rank == 0 else (lambda *x, **k: None)
        self.token_multiple = token_multiple(self.device, self.config["dtype"])   # see FILL_TO

    def resume(self, candidates: list[Path]) -> Path | None:
        """Continue exactly where the newest loadable checkpoint left off; a damaged one is reported and the one
        before it tried. None: nothing to resume, a fresh start (dropout seeded per rank)."""
        from lora import load_adapter

        for folder in candidates:
            try:
                state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
                load_adapter(self.model, folder / "adapter")
            except Exception as e:
                self.say(f"warning: cannot load {folder} ({type(e).__name__}: {e}); trying an older checkpoint")
                continue
            self.optimizer.load_state_dict(state["optimizer"])
            self.progress = Progress(state["step"], state["epoch"], state["step_in_epoch"], state["best_val_loss"],
                                     state["best_step"], state["elapsed_s"])
            self.watch = DivergenceWatch(self.args.diverge_factor, self.args.diverge_steps,
                                         self.model.config.vocab_size, state.get("divergence"))
            rngs = state["rng"]
            if len(rngs) != self.world:
                self.say(f"note: the checkpoint was written by {len(rngs)} process(es), this run has {self.world}: "
                         "the data order and the maths are the same, the dropout masks differ")
            set_rng_state(rngs[self.rank % len(rngs)])
            return folder
        if candidates:
            fail(f"no checkpoint under {candidates[0].parent} could be loaded")
        torch.manual_seed(self.args.seed + self.rank)   # dropout masks: seeded, different on each rank
        return None

    def state(self) -> dict:
        """state.pt of a checkpoint (every rank takes part: the RNG states are gathered)."""
        p, d, a = self.progress, self.data, self.args
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            torch.distributed.all_gather_object(rngs, rng_state())
        return {"format": FORMAT, "step": p.step, "epoch": p.epoch, "step_in_epoch": p.pos,
                "total_steps": d.total_steps, "steps_per_epoch": d.steps_per_epoch,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {"kind": "cosine", "lr": a.lr, "warmup_steps": d.warmup, "total_steps": d.total_steps,
                              "last_lr": lr_at(max(p.step - 1, 0), lr=a.lr, warmup=d.warmup, total=d.total_steps)},
                "rng": rngs, "best_val_loss": p.best_val, "best_step": p.best_step, "elapsed_s": p.elapsed,
                "world_size": self.world, "divergence": self.watch.state()}

    def checkpoint(self) -> None:
        state = self.state()
        self.folder.save_checkpoint(self.progress.step, model=self.model, base_name=self.base_name, base=self.base,
                                    train_state=state, config=self.config, keep_last=self.args.keep_last,
                                    suspect_from=self.watch.suspect_from)
        if self.world > 1:
            torch.distributed.barrier()

    def validate(self) -> float | None:
        """The validation loss (logged; best/ rewritten when it improves), or None without validation rows."""
        d, p = self.data, self.progress
        if d.val is None:
            return None
        loss, tokens = validation_loss(self.model, d.val, self.val_micro, d.val_sup, device=self.device,
                                       rank=self.rank, world=self.world, chunk=self.args.loss_chunk_tokens,
                                       multiple=self.token_multiple)
        improved = p.best_val is None or loss < p.best_val
        if improved:
            p.best_val, p.best_step = loss, p.step
            self.folder.save_adapter("best", self.model, self.base_name, self.base,
                                     {"best.json": {"step": p.step, "val_loss": loss}})
        release_free_memory()   # what validation (and the step before it) freed goes back to the OS (model/cpu.py)
        self.folder.log("val_log.jsonl", {"step": p.step, "epoch": round(p.step / d.steps_per_epoch, 4),
                                          "val_loss": loss, "val_tokens": tokens, "best": improved,
                                          "rss_gb": round(rss_gb(), 3),
                                          "peak_mem_gb": round(peak_memory_gb(self.device), 3)})
        return loss

    def stop_diverged(self, at_step: int, reason: str, suspect_from: int | None) -> None:
        """One line, exit 1; checkpoints whose weights are suspect are set aside, the last good one named."""
        good, moved = self.folder.set_aside(suspect_from)
        aside = (f"; {len(moved)} checkpoint(s) from the divergence on set aside as "
                 f"{self.folder.checkpoints}/diverged-step-*" if moved else "")
        fail(f"training diverged at step {at_step}: {reason}. Stopped; nothing from this step is saved{aside}. "
             + (f"The last good checkpoint is {good}: " if good else "No checkpoint predates the divergence: ")
             + f"lower --lr (now {self.args.lr:g}) or check the data, then --resume auto "
             + ("continues from it" if good else "starts again from step 0"))

    def step(self, micro: list[list[int]]) -> dict:
        """One optimizer step over the micro-batches `micro` (this rank's share of them); its log record."""
        a, d, p, t0 = self.args, self.data, self.progress, time.perf_counter()
        if a.debug_fail_at_step == p.step + 1 and self.rank == self.world - 1:
            fail(f"rank {self.rank} fails at step {p.step + 1} (--debug-fail-at-step)")
        rows = [i for mb in micro for i in mb]
        n_sup = max(int(d.train_sup[rows].sum()), 1)   # supervised tokens of the whole step, all ranks
        n_tok = int(sum(d.train.lengths[i] for i in rows))
        lr = lr_at(p.step, lr=a.lr, warmup=d.warmup, total=d.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        try:
            for mb in micro[self.rank::self.world]:
                n_tokens = sum(int(d.train.lengths[i]) for i in mb)   # for the out-of-memory line (ids may not exist)
                ids, labels, packing = packed_micro_batch(d.train, mb, self.device, self.token_multiple)
                loss = token_loss_sum(self.model, ids, labels, a.loss_chunk_tokens, packing) / n_sup
                if a.debug_nan_at_step is not None and p.step + 1 == a.debug_nan_at_step:
                    loss = loss * float("nan")
                loss.backward()
                step_loss += loss.detach()
        except torch.OutOfMemoryError:
            fail(f"out of memory at step {p.step + 1} (micro-batch of {len(mb)} rows, {n_tokens} tokens): "
                 f"lower --micro-batch-tokens (now {a.micro_batch_tokens})"
                 + ("" if self.model.gradient_checkpointing else ", or pass --gradient-checkpointing on")
                 + f", or lower --cutoff (now {a.cutoff}); the last checkpoint is kept. "
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True can help with fragmentation")
        if self.world > 1:   # sum the LoRA gradients (and the loss, and the stop flag) over ranks, one bucket
            flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in self.params]
                             + [step_loss.reshape(1), torch.tensor([float(self.stop.asked)], device=self.device)])
            torch.distributed.all_reduce(flat)
            offset = 0
            for q in self.params:
                q.grad = flat[offset:offset + q.numel()].view_as(q)
                offset += q.numel()
            step_loss, self.stop.asked = flat[offset], bool(flat[offset + 1].item() > 0)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm or float("inf"))
        loss_value, norm_value = torch.stack([step_loss, grad_norm.to(step_loss)]).tolist()  # one sync
        reason = self.watch.check(p.step + 1, loss_value, norm_value)
        if reason is not None:
            self.stop_diverged(p.step + 1, reason, self.watch.suspect_from)
        # a failed update: its own weights are never saved; earlier ones are suspect only in a run of abnormal losses
        suspect = p.step + 1 if self.watch.suspect_from is None else self.watch.suspect_from
        try:
            self.optimizer.step()
        except RuntimeError as e:   # AdamW's step size itself overflows float32 (--lr 1e38)
            if "overflow" not in str(e):
                raise
            self.stop_diverged(p.step + 1, f"the update overflows float32 ({e})", suspect)
        if not math.isfinite(weights_norm(self.params).item()):   # the other sync of the step
            self.stop_diverged(p.step + 1, "the update left adapter weights that are not finite or beyond float32",
                               suspect)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu":
            release_free_memory()   # the step's freed activations go back to the OS: a flat peak (model/cpu.py)
        dt = time.perf_counter() - t0
        p.elapsed += dt
        return {"loss": loss_value, "lr": lr, "grad_norm": norm_value, "tokens": n_tok, "supervised_tokens": n_sup,
                "tokens_per_s": round(n_tok / dt, 1), "seconds": dt}

    def train(self, resumed: bool) -> None:
        """Steps until --max-steps or --epochs are done: validation at the start, every --eval-every steps and at
        each epoch end; a checkpoint every --save-every steps, at each epoch end and at the end. Ctrl-C or SIGTERM:
        the step finishes, a checkpoint is written, exit 130 (a second Ctrl-C stops at once)."""
        from tqdm import tqdm

        a, d, p = self.args, self.data, self.progress
        if p.step > d.total_steps:
            self.say(f"the run in {self.folder.out} is already at step {p.step}, past the {d.total_steps} steps these "
                     "flags ask for (--max-steps/--epochs): nothing to do; its later steps are kept")
        elif p.step == d.total_steps:
            self.say(f"the run in {self.folder.out} is already complete ({p.step} steps)")
        elif not resumed and (v := self.validate()) is not None:
            self.say(f"step 0: val loss {v:.4f}")
        plan, plan_for, last_saved = None, None, p.step if resumed else -1
        self.session = (time.perf_counter(), 0, 0)   # start, tokens, steps of this session
        with self.stop, tqdm(total=d.total_steps, initial=p.step, unit="step", dynamic_ncols=True,
                             disable=self.rank != 0 or a.no_progress or not sys.stderr.isatty()) as bar:
            while p.step < d.total_steps:
                if plan_for != p.epoch:
                    plan = plan_epoch(d.train.lengths, epoch=p.epoch, seed=a.seed, seqs_per_step=a.batch_size,
                                      max_tokens=a.micro_batch_tokens)
                    plan_for = p.epoch
                record = self.step(plan[p.pos])
                if p.step == 0 and not resumed:  # the adapter must move (a frozen graph would train nothing)
                    if not any(float(m.lora_B.weight.detach().abs().sum()) > 0
                               for m in self.model.modules() if hasattr(m, "lora_B")):
                        fail("after step 1 every lora_B is still zero: no gradient reached the adapter")
                p.step, p.pos = p.step + 1, p.pos + 1
                epoch_end = p.pos == len(plan)
                if epoch_end:
                    p.epoch, p.pos = p.epoch + 1, 0
                start, tokens, steps = self.session
                self.session = (start, tokens + record["tokens"], steps + 1)
                self.report(record, len(plan), bar)
                if epoch_end or p.step == d.total_steps or (a.eval_every and p.step % a.eval_every == 0):
                    if (v := self.validate()) is not None and self.rank == 0:
                        tqdm.write(f"step {p.step}: val loss {v:.4f} (best {p.best_val:.4f} at step {p.best_step})")
                if epoch_end or p.step == d.total_steps or p.step % a.save_every == 0 or self.stop.asked:
                    self.checkpoint()
                    last_saved = p.step
                if self.stop.asked:
                    self.say(f"stopped at step {p.step}; continue with --resume auto (--out {self.folder.out})",
                             file=sys.stderr)
                    raise SystemExit(130)
        if last_saved != p.step and p.step > 0:
            self.checkpoint()

    @property
    def memory_kind(self) -> str:
        """What peak_memory_gb measures here."""
        return "GPU allocated" if self.device.type == "cuda" else "RSS"

    def report(self, record: dict, steps_in_epoch: int, bar) -> None:
        """The step's line in train_log.jsonl, the progress bar, a printed line every --log-every steps."""
        p, total = self.progress, self.data.total_steps
        mem = peak_memory_gb(self.device)
        self.folder.log("train_log.jsonl", {
            "step": p.step, "epoch": round(p.epoch + p.pos / steps_in_epoch, 4),
            **{k: record[k] for k in ("loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s")},
            "peak_mem_gb": round(mem, 3), "rss_gb": round(rss_gb(), 3), "time": round(p.elapsed, 3)})
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        peak=f"{mem:.1f}GB", refresh=False)
        bar.update(1)
        if bar.disable and (p.step % self.args.log_every == 0 or p.step == total):
            start, _, steps = self.session
            eta = timedelta(seconds=round((time.perf_counter() - start) / steps * (total - p.step)))
            self.say(f"step {p.step}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                     f"{record['tokens_per_s']:.0f} tok/s | peak {mem:.1f} GB {self.memory_kind} | eta {eta}", flush=True)

    def finish(self, t_start: float) -> None:
        """The final adapter, the loss curve and the summary."""
        if self.rank != 0:
            return
        p, d, out = self.progress, self.data, self.folder.out
        self.folder.save_adapter("adapter", self.model, self.base_name, self.base)
        curve = self.folder.plot_losses()
        start, tokens, steps = getattr(self, "session", (time.perf_counter(), 0, 0))
        vals = self.folder.read_log("val_log.jsonl")
        say = self.say
        say("---- summary " + "-" * 48)
        say(f"steps: {p.step} ({p.step / d.steps_per_epoch:.2f} epochs) in {timedelta(seconds=round(p.elapsed))} of "
            "training" + (f", {tokens / (time.perf_counter() - start):.0f} tokens/s this session" if steps else ""))
        say(f"peak memory: {peak_memory_gb(self.device):.2f} GB {self.memory_kind}")
        if vals:
            say(f"validation loss: {vals[0]['val_loss']:.4f} (step {vals[0]['step']}) -> {vals[-1]['val_loss']:.4f} "
                f"(step {vals[-1]['step']}); best {p.best_val:.4f} at step {p.best_step} in {out / 'best'}")
        say(f"adapter: {out / 'adapter'}; log: {out / 'train_log.jsonl'}; loss curve: {curve}")
        say(f"total time {timedelta(seconds=round(time.time() - t_start))}")


# ---- processes ------------------------------------------------------------------------------------

def place(args, device, world: int, rank: int, local_rank: int):
    """(device, compute dtype): under torchrun rank r takes cuda:LOCAL_RANK. dtype auto: bf16 on a GPU that has it
    or a CPU with native bf16 (cpuinfo flags), else fp32; bf16 asked for on a CPU that emulates it warns."""
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 or device.index is None else device.index)
        torch.cuda.set_device(device)
    return device, resolve_dtype(args.dtype, device, warn=None if rank == 0 else (lambda message: None))


# ---- main -------------------------------------------------------------------------------------------

def run_config(args, device, dtype, world: int) -> dict:
    """config.json's start: the flags, the resolved model, folder, device and dtype (data facts come later)."""
    from lora import dtype_name

    out = Path(args.out or Path("runs") / folder_name(source_name(args.model))).expanduser()
    init = {}
    if args.init_adapter:   # what the LoRA weights started from: a resume with other weights is another run
        weights = (Path(args.init_adapter).expanduser() / "adapter_model.safetensors").read_bytes()
        init["init_adapter_sha256"] = hashlib.sha256(weights).hexdigest()[:16]
    return {"args": args.recipe(),
            "model_id": PRESETS[args.model][0] if args.model in PRESETS else args.model,
            "out": str(out), "device": device.type, "dtype": dtype_name(dtype), "world_size": world,
            "format": FORMAT, **init}


def init_from_adapter(model, args, base: dict) -> None:
    """Copy --init-adapter's LoRA weights into the fresh LoRA layers (names and shapes checked both ways); refused when
    the adapter's base.json fingerprints another base than the one loaded."""
    from lora import load_adapter, read_base_record

    path = Path(args.init_adapter).expanduser()
    try:
        record = read_base_record(path)
        if record and record.get("base_fingerprint") and record["base_fingerprint"] != base["base_fingerprint"]:
            trained_on = record.get("base_checkpoint") or record.get("base_model")
            fail(f"--init-adapter {path}: trained on another base ({trained_on}, fingerprint "
                 f"{record['base_fingerprint']}; --model {args.model} gives {base['base_fingerprint']})", 2)
        quant = "nf4" if record and record.get("quantization") else "none"
        if record and quant != args.quant:
            kind = "an NF4" if quant == "nf4" else "a dense"
            fail(f"--init-adapter {path}: trained on {kind} base; pass --quant {quant}", 2)
        load_adapter(model, path)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"--init-adapter: {e}", 2)


def build_trainer(args, model, tokenizer, data: Data, folder: RunFolder, config: dict, dtype, device,
                  rank: int, world: int, say) -> Trainer:
    """LoRA on the base, the record of the base every adapter carries (base.json), the run's facts in config."""
    from lora import base_fingerprint, base_record

    params, n_params, use_gc = add_lora(model, args, dtype, world)
    # The adapter names its base only by hub id (never a path of this machine); lora falls back to config.name.
    base_name = config["model_id"] if source_kind(args.model) in ("alias", "hub") else None
    base = base_record(base_model=base_name, base_checkpoint=args.model, quantization=model.lora_config["quantize"],
                       dtype=dtype, compute_dtype=dtype, fingerprint=base_fingerprint(model))
    if args.init_adapter:
        init_from_adapter(model, args, base)
    n_train = sum(p.numel() for p in params)
    config.update(base_model=base_name, parameters=n_params, trainable_parameters=n_train, gradient_checkpointing=use_gc)
    say(f"model: {n_params / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable ({100 * n_train / n_params:.2f}%), "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g}, "
        f"gradient checkpointing {'on' if use_gc else 'off'}")
    n_val = len(data.val) if data.val is not None else 0
    say(f"data: {len(data.train)} training examples ({data.train.stats.get('truncated', 0)} truncated, "
        f"{data.train.stats.get('dropped', 0)} dropped), {n_val} validation; {data.steps_per_epoch} steps per epoch "
        f"of {args.batch_size} sequences, {data.total_steps} steps, {data.warmup} warm-up"
        + (f", {world} processes" if world > 1 else ""))
    return Trainer(args, model, params, data, folder, config, base_name, base, device, rank, world)


def main(argv: list[str] | None = None) -> int:
    intro, examples = __doc__.split("\n\n")[:2]
    args, parser = parse_args(argv, description=intro, epilog="Examples:\n" + examples)
    args = check_args(args, parser)
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    device, dtype = place(args, device, world, rank, local_rank)
    if device.type == "cpu":   # memory that stays flat over a run (model/cpu.py)
        limit_kernel_cache()   # before the first matrix product
        map_large_blocks()
    say = print if rank == 0 else (lambda *a, **k: None)
    config = run_config(args, device, dtype, world)
    if args.print_config:
        return print(json.dumps(config, indent=2)) or 0
    t_start = time.time()
    with contextlib.ExitStack() as held:   # the folder's lock, released however the run ends
        folder = RunFolder(Path(config["out"]), rank)
        peers = start_processes(world, device)
        try:
            train_rows, val_rows = read_data(args, say)       # checked before any weight is loaded
            try:
                tokenizer = load_tokenizer(args.model)
            except (OSError, ValueError) as e:
                fail(f"could not get the tokenizer of {args.model}: {e}", 2)
            data = tokenize_data(args, train_rows, val_rows, tokenizer, verbose=rank == 0)
            if args.dry_run:
                return say(describe_data(train_rows, data, args, tokenizer)) or 0
            config.update(data_fingerprint=data_fingerprint(data.train), val_fingerprint=data_fingerprint(data.val),
                          tokenizer_fingerprint=tokenizer.fingerprint[:16], train_rows=len(data.train),
                          val_rows=len(data.val) if data.val is not None else 0, steps_per_epoch=data.steps_per_epoch,
                          total_steps=data.total_steps, warmup_steps=data.warmup)
            try:   # the lock; a resume only of the same run: the same flags over the same rows
                resume_from = folder.open(held, resume=args.resume, overwrite=args.overwrite, config=config, say=say)
            except RunRefused as e:
                fail(str(e), 2)
            model = load_frozen_base(args, dtype, device, tokenizer, say)
            trainer = build_trainer(args, model, tokenizer, data, folder, config, dtype, device, rank, world, say)
            resumed = trainer.resume(resume_from)
            folder.start(config, resumed_at=trainer.progress.step if resumed else None, overwrite=args.overwrite,
                         say=say, tensorboard=args.log == "tensorboard")
            if folder.tensorboard is not None:
                held.callback(folder.tensorboard.close)
            p = trainer.progress
            say(f"resumed from {resumed} at step {p.step} (epoch {p.epoch}, step {p.pos} of it)" if resumed
                else f"writing to {folder.out}")
            trainer.train(resumed=resumed is not None)
            trainer.finish(t_start)
        except DiskFull as e:   # one line; what was written before stays, the next run resumes from it
            last = list_checkpoints(folder.checkpoints)
            fail(f"{e}. Stopped; " + (f"the last complete checkpoint is {last[-1]}: free some space and run the same "
                                      "command with --resume auto to continue exactly from it" if last else
                                      "no checkpoint was written yet: free some space and start again"), 1)
        except BaseException as e:
            if peers is not None:
                peers.failed(e)
            raise
    if peers is not None:
        peers.close()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")   # a path that cannot be encoded is shown escaped
    sys.stderr.reconfigure(errors="backslashreplace")
    sys.exit(main())
