"""The one way a base model is loaded, with or without an adapter: what to load is chosen once, then loaded.

    model, tokenizer, base = load_base(source, quant, dtype, device, adapter=..., merge=True)
    base = choose_base(source, quant, dtype, device, adapter)   # the choice alone: no weights read
    model, tokenizer = base.load(merge=True)

The rules of the choice (choose_base):
- an adapter's folder is checked (adapter_config.json) and its base.json read, once (lora.read_base_record);
  what the caller leaves unset is taken from it: the source (None) is its base_checkpoint, else its
  base_model, the first loadable here; the quantization (None) is nf4 when it records one; the dtype ("auto")
  is the one the base was quantized from (NF4) or computed in (dense), except bfloat16 on a CPU without native
  bf16, which is loaded in float32 (said in the choice's line).
- a value the caller gives that differs from base.json wins, with one warning line naming both.
- without base.json: the source must be given, the quantization is none unless given, dtype auto is
  model.cpu.compute_dtype's (bf16 on a GPU that has it and on a CPU with native bf16, else fp32).
- device: auto | cpu | cuda | cuda:N, or a torch.device; dtype: a --dtype word (auto, bf16, fp16, fp32, or a
  spelling cli.DTYPE_ALIASES knows), compared with base.json, or a torch.dtype, the caller's own rule, taken
  as it is. Either way the choice holds one torch.dtype: the weights' dtype, the dtype NF4 is quantized from and
  the compute dtype; `dtype_name` ("bfloat16") is its one spelling in JSON files.

Loading (BaseChoice.load): NF4 quantizes each linear layer but lm_head as it is read (lora.quantize_nf4 with the
compute dtype), so the dense base is never held whole; the base's fingerprint is compared with base.json's
(one warning line when they differ); the adapter is applied (lora.load_adapter) and merged when asked; the
model is in eval mode. One line says what was chosen and why, e.g.
    base: smollm2-135m = HuggingFaceTB/SmolLM2-135M (from runs/x/adapter/base.json), NF4 as trained,
    bfloat16 compute as trained, on cuda:0; adapter runs/x/adapter merged
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from model.config import PRESETS
from model.load import LOCAL_KINDS, source_kind

from .io import dtype_name

QUANTS = ("none", "nf4")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}   # --dtype word -> torch dtype


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def describe_record(record: dict) -> str:
    """'an NF4 base (quantized from float32, float32 compute)' or 'a dense bfloat16 base'."""
    q = record.get("quantization")
    if q:
        return f"an NF4 base (quantized from {q['quantized_from']}, {record['compute_dtype']} compute)"
    return f"a dense {record['compute_dtype']} base"


def recorded_dtype(record: dict) -> torch.dtype:
    """The dtype base.json says the base was loaded in: the one NF4 quantized from, else the compute dtype."""
    q = record.get("quantization")
    return getattr(torch, q["quantized_from"] if q else record["compute_dtype"])


def loadable_here(source: str | None) -> bool:
    """An alias or a hub id (fetched when loaded), or a local file or folder that exists."""
    if not source:
        return False
    kind = source_kind(source)
    return kind in ("alias", "hub") or (kind in LOCAL_KINDS and Path(source).expanduser().exists())


def display_source(source: str) -> str:
    """An alias with the hub id it stands for; anything else as it is."""
    return f"{source} = {PRESETS[source][0]}" if source_kind(source) == "alias" else source


def _cpu_native_bf16() -> bool:
    """model.cpu.cpu_native_bf16(), looked up when called (a test replaces it)."""
    import model.cpu

    return model.cpu.cpu_native_bf16()


def auto_why(dtype: torch.dtype, device: torch.device) -> str:
    """Why --dtype auto gave `dtype` on `device` (model.cpu.compute_dtype's rule)."""
    if device.type == "cuda":
        return " (auto: CUDA)" if dtype == torch.bfloat16 else " (auto: this GPU has no bf16)"
    return " (auto: this CPU has native bf16)" if dtype == torch.bfloat16 else " (auto: this CPU has no native bf16)"


@dataclass
class BaseChoice:
    """What load_base loads, and why each part was chosen (the *_why texts of the one line)."""
    source: str                  # an alias, a hub id, a hub-layout folder or a .gguf file
    quant: str                   # "none" or "nf4"
    dtype: torch.dtype           # weights (and NF4's source) and compute
    device: torch.device
    adapter: str | None = None
    record: dict | None = None   # the adapter's base.json, None without one
    source_why: str = ""
    quant_why: str = ""
    dtype_why: str = ""
    warn: Callable[[str], None] = field(default=_stderr, repr=False)   # where warning lines go

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def line(self, merged: bool = False) -> str:
        """The one line: what is loaded and why."""
        what = [f"base: {display_source(self.source)}{self.source_why}",
                f"{'NF4' if self.quant == 'nf4' else 'dense'}{self.quant_why}",
                f"{self.dtype_name} compute{self.dtype_why}", f"on {self.device}"]
        adapter = f"; adapter {self.adapter}{' merged' if merged else ''}" if self.adapter else ""
        return ", ".join(what) + adapter

    def load(self, *, merge: bool = False, say=_stderr, tokenizer=None):
        """(model, tokenizer) as chosen: the base (NF4: each linear quantized as read), its fingerprint checked
        against base.json, the adapter applied and, with `merge`, merged; eval mode. `say` gets the one line;
        `tokenizer`: the source's, read already by the caller (model.load_model does not read it again)."""
        from functools import partial

        from model import load_model

        from . import load_adapter, merge_lora, quantize_nf4

        say(self.line(merged=merge))
        quantize = partial(quantize_nf4, compute_dtype=self.dtype) if self.quant == "nf4" else None
        model, tokenizer = load_model(self.source, dtype=self.dtype, device=self.device, quantize_linear=quantize,
                                      tokenizer=tokenizer)
        if self.adapter:
            self.check_fingerprint(model)
            load_adapter(model, self.adapter, quantize=None if self.quant == "none" else self.quant,
                         compute_dtype=self.dtype)
            if merge:
                merge_lora(model)   # W + B A alpha/r folded in: generation runs at the base model's speed
        return model.eval(), tokenizer

    def check_fingerprint(self, model) -> None:
        """Warn (one line) when the loaded base is not the checkpoint base.json fingerprinted."""
        from . import base_fingerprint

        record = self.record
        if record is None or not record.get("base_fingerprint"):
            return
        now = base_fingerprint(model)
        if now != record["base_fingerprint"]:
            self.warn(f"warning: --model {self.source} is not the base {self.adapter} was trained on "
                      f"({record.get('base_checkpoint') or record.get('base_model')}; base fingerprint "
                      f"{record['base_fingerprint']} there, {now} here)")


def choose_base(source: str | None, quant: str | None = None, dtype: str | torch.dtype = "auto",
                device: str | torch.device = "auto", adapter: str | None = None, *, warn=_stderr) -> BaseChoice:
    """The base to load, by the rules of the module docstring; no weights are read. A bad adapter folder, a
    base.json naming a base that is not here, a bad device: ValueError or FileNotFoundError, one line.
    `warn` gets each warning line (default: stderr)."""
    from cli import DTYPE_ALIASES, resolve_device, resolve_dtype

    from . import read_adapter_config, read_base_record

    if quant not in (None, *QUANTS):
        raise ValueError(f"quant must be one of {', '.join(QUANTS)} (or None: from base.json), got {quant!r}")
    request = dtype if isinstance(dtype, torch.dtype) else DTYPE_ALIASES.get(str(dtype).strip().lower())
    if request is None:
        raise ValueError(f"dtype {dtype!r}: expected auto, bf16, fp16 or fp32 (or a torch dtype)")
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    record = None
    if adapter:
        read_adapter_config(adapter)   # a bad adapter folder fails now, not after the base model has loaded
        record = read_base_record(adapter)
    choice = BaseChoice(source=source, quant=quant or "none", dtype=torch.float32, device=device, adapter=adapter,
                        record=record, warn=warn)
    if record is None:
        if source is None:
            raise ValueError(f"--adapter {adapter} has no base.json (the record of the base it was trained on): "
                             "give --model" if adapter else "no model source given")
        if isinstance(request, torch.dtype):   # the caller's own rule (train.py's --dtype, export.py's float32)
            choice.dtype = request
        else:
            choice.dtype = resolve_dtype(request, device, warn=warn)
            choice.dtype_why = auto_why(choice.dtype, device) if request == "auto" else f" (--dtype {request})"
        return choice
    where = f"{Path(adapter) / 'base.json'}"
    if source is None:
        named = (record.get("base_checkpoint"), record.get("base_model"))
        choice.source = next((s for s in named if loadable_here(s)), None)
        if choice.source is None:
            raise ValueError(f"{where} names base {named[0] or named[1]!r}, which is not here: give --model")
        choice.source_why = f" (from {where})"
    recorded_quant = "nf4" if record.get("quantization") else "none"
    if quant is None or quant == recorded_quant:
        choice.quant, choice.quant_why = recorded_quant, " as trained"
    else:
        warn(f"warning: {adapter} was trained on {describe_record(record)} ({where}); --quant {quant} puts it on "
             f"{'an NF4' if quant == 'nf4' else 'the dense'} base instead")
        choice.quant_why = f" (--quant {quant}; trained on {'NF4' if recorded_quant == 'nf4' else 'dense'})"
    trained = recorded_dtype(record)
    if isinstance(request, torch.dtype):   # the caller's own rule (train.py's --dtype, export.py's float32)
        choice.dtype = request
    elif request == "auto":
        native = trained != torch.bfloat16 or device.type == "cuda" or _cpu_native_bf16()
        choice.dtype = trained if native else torch.float32
        choice.dtype_why = " as trained" if native else \
            (" (trained in bfloat16; this CPU has no native bf16: --dtype bf16 matches the training exactly, "
             "several times slower)")
    else:
        if DTYPES[request] != trained:
            warn(f"warning: {adapter} was trained on {describe_record(record)} ({where}); --dtype {request} loads "
                 "the base in another dtype, so its outputs can differ from the trained model's")
        choice.dtype = resolve_dtype(request, device, warn=warn)
        choice.dtype_why = " as trained" if choice.dtype == trained else f" (--dtype {request})"
    return choice


def load_base(source: str | None, quant: str | None = None, dtype: str | torch.dtype = "auto",
              device: str | torch.device = "auto", adapter: str | None = None, *, merge: bool = False,
              say=_stderr, warn=_stderr, tokenizer=None):
    """(model, tokenizer, BaseChoice): choose_base(...) then its load(merge=, say=, tokenizer=); see the module
    docstring."""
    choice = choose_base(source, quant, dtype, device, adapter, warn=warn)
    model, tokenizer = choice.load(merge=merge, say=say, tokenizer=tokenizer)
    return model, tokenizer, choice
