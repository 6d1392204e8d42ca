"""train.py's flags, declared once: RunConfig's fields are the flags (name, type, default, help), the parser is
built from them, a --config file is read through that parser, and check_args returns the one RunConfig a run uses.

    config = check_args(*parse_args(argv))            # what train.main does
    config.lr, config.tasks                           # typed, canonical, frozen
    config.recipe()                                   # config.json's "args", what --print-config writes

A field `lr: float = flag("optimisation", 1e-4, "peak learning rate ...")` is the flag `--lr` in the help's
"optimisation" group: its type is the annotation (bool: a switch; `int | None`: an int that may be left out), its
argparse options (choices, metavar, another type) are flag()'s keywords. Adding a flag is adding a field.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from cli import dtype_type
from data import SETTINGS, parse_settings, parse_tasks
from data.ecinstruct import DATA_SUFFIXES, VAL_FRACTION, is_all
from model.config import PRESETS
from model.load import LOCAL_KINDS, source_kind

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slm-ec" / "data"
GROUPS = ("model", "LoRA", "data", "optimisation", "output")


def flag(group: str | None, default, help: str, **options) -> dataclasses.Field:
    """A RunConfig field that is a command-line flag: its help group (None: hidden, test-only), default, help
    text and further argparse options (choices=, metavar=, type=, aliases=)."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help, **options})


@dataclass(frozen=True)
class RunConfig:
    """Every flag of a run, built once from the command line (and --config), checked and in canonical form by
    check_args, and never changed after: --tasks in one order and spelling, --setting a canonical list, --dtype one
    word (auto, bf16, fp32; the torch dtype it resolves to is config.json's "dtype"). Its recipe fields are
    config.json's "args", what --print-config writes and --config reads back."""
    # ---- model
    model: str = flag("model", "smollm2-360m", f"an alias ({', '.join(PRESETS)}), a hub id, a hub-layout folder or a "
                      ".gguf file (default: %(default)s)")
    quant: str = flag("model", "nf4", "nf4: frozen base quantized to 4-bit NormalFloat (QLoRA, the paper's recipe); "
                      "none: the base stays in --dtype (default: %(default)s)", choices=["nf4", "none"])
    dtype: str = flag("model", "auto", "auto, bf16 or fp32 (bfloat16, float32 too): the dtype the frozen base is "
                      "loaded (and quantized from) and computes in; LoRA weights are always float32. auto: bf16 on a "
                      "GPU that has it or on a CPU with native bf16 (amx_bf16 or avx512_bf16 in /proc/cpuinfo), else "
                      "fp32 (default: %(default)s)", type=dtype_type("auto", "bf16", "fp32"))
    device: str = flag("model", "auto", "auto, cpu, cuda or cuda:N (auto: cuda when available; under torchrun, "
                       "cuda:LOCAL_RANK) (default: %(default)s)")
    gradient_checkpointing: str = flag("model", "auto", "recompute each layer in backward to save memory "
                                       "(non-reentrant). auto: on for models of 1B parameters or more (default: "
                                       "%(default)s)", choices=["auto", "on", "off"])
    # ---- LoRA
    lora_r: int = flag("LoRA", 16, "rank r (default: %(default)s)")
    lora_alpha: float = flag("LoRA", 16.0, "alpha; the update is scaled by alpha/r (default: %(default)s)")
    lora_dropout: float = flag("LoRA", 0.1, "dropout on the LoRA branch input (default: %(default)s)")
    lora_targets: str = flag("LoRA", "default", "default: the paper's (q,k,v,o,gate,up,down and lm_head), no-head: "
                             "the seven projections only (what vLLM and llama.cpp load), or a comma list of module "
                             "names (default: %(default)s)")
    init_adapter: str | None = flag("LoRA", None, "start the LoRA weights from this adapter folder instead of the "
                                    "fresh init (the optimizer and schedule start fresh): continue tuning an adapter "
                                    "on more rows. Its r, alpha, targets and base must be this run's",
                                    metavar="ADAPTER")
    # ---- data
    dataset: str = flag("data", "NingLab/ECInstruct", "the hub dataset id or a local .json/.jsonl/.csv/.parquet "
                        "file: ECInstruct rows, or rows of your own task (instruction, input, output, task, and "
                        "optionally split and setting; see the README's 'Your own task'). Rows that name no split "
                        f"are split here: per task, a seeded {VAL_FRACTION * 100:.0f}%% (by --seed; none of a task "
                        "with fewer than 10 rows) is held out for validation, the rest trains (default: %(default)s)")
    tasks: str = flag("data", "all", "all (every task the dataset holds), or a comma list of task names: "
                      "ECInstruct's (or their abbreviations AVE,PRP,...) or your own (default: %(default)s)")
    setting: str = flag("data", "IND_Diverse_Instruction", "setting(s) to train and validate on, comma-separated: "
                        "ECInstruct's (" + ", ".join(SETTINGS) + ") filter ECInstruct rows; other names filter your "
                        "own tasks' rows, which are taken whole when none is named (default: %(default)s)",
                        aliases=["--settings"], metavar="SETTING")
    skip_invalid: bool = flag("data", False, "leave invalid dataset rows out (counted on stderr) instead of stopping "
                              "at the first")
    cutoff: int = flag("data", 2048, "maximum tokens per example; longer inputs are shortened, the answer is kept "
                       "(default: %(default)s)")
    template: str = flag("data", "alpaca", "alpaca: eCeLLM's prompt (base models); chat: the checkpoint's chat "
                         "template (default: %(default)s)", choices=["alpaca", "chat"])
    train_on_inputs: bool = flag("data", False, "also train on the prompt tokens (eCeLLM: off)")
    val_size: int = flag("data", 1000, "rows of the val split in the seeded validation subset; 0: no validation "
                         "(default: %(default)s)")
    max_train_rows: int | None = flag("data", None, "train on a seeded random subset of this many rows (quick runs)")
    cache_dir: str = flag("data", str(DEFAULT_CACHE), "tokenized-data cache; '' to turn it off (default: "
                          "$XDG_CACHE_HOME/slm-ec/data, that is %(default)s)")
    # ---- optimisation
    lr: float = flag("optimisation", 1e-4, "peak learning rate (default: %(default)s)")
    epochs: int = flag("optimisation", 3, "passes over the training rows (default: %(default)s)")
    max_steps: int | None = flag("optimisation", None, "stop after this many optimizer steps; the schedule is laid "
                                 "over them (overrides --epochs)")
    batch_size: int = flag("optimisation", 128, "sequences per optimizer step, the effective batch over "
                           "micro-batches and ranks (default: %(default)s)")
    micro_batch_tokens: int = flag("optimisation", 16384, "most tokens in a micro-batch (per rank): a step's rows run "
                                   "end to end in as few micro-batches as fit, nothing computed on padding; lower it "
                                   "on out-of-memory. Changes speed and memory, not the gradient (default: "
                                   "%(default)s)")
    warmup_ratio: float = flag("optimisation", 0.05, "fraction of steps of linear warm-up before the cosine decay "
                               "(default: %(default)s)")
    weight_decay: float = flag("optimisation", 0.0, "AdamW weight decay (default: %(default)s)")
    max_grad_norm: float = flag("optimisation", 1.0, "clip the gradient norm; 0: no clipping (default: %(default)s)")
    seed: int = flag("optimisation", 42, "seeds LoRA init, dropout, data order and the val subset (default: "
                     "%(default)s)")
    diverge_factor: float = flag("optimisation", 3.0, "stop when the loss stays above this many times its start (the "
                                 "mean of the first 10 steps) for --diverge-steps steps in a row; 0: never (default: "
                                 "%(default)s)")
    diverge_steps: int = flag("optimisation", 10, "consecutive steps of a loss above --diverge-factor times its start "
                              "that stop the run (default: %(default)s)")
    loss_chunk_tokens: int = flag("optimisation", 2048, "supervised positions per lm_head + cross-entropy chunk "
                                  "(memory, not maths) (default: %(default)s)")
    # ---- output
    out: str | None = flag("output", None, "output folder (default: runs/<model name>)")
    save_every: int = flag("output", 100, "write a checkpoint every K optimizer steps (also at each epoch end and at "
                           "the end) (default: %(default)s)")
    keep_last: int = flag("output", 3, "checkpoints kept (default: %(default)s)")
    eval_every: int | None = flag("output", None, "also compute the validation loss every N steps (it always runs at "
                                  "the start, at each epoch end and at the end)")
    log_every: int = flag("output", 10, "steps between printed progress lines when there is no progress bar "
                          "(default: %(default)s)")
    no_progress: bool = flag("output", False, "no progress bar (train_log.jsonl is still written)")
    log: str = flag("output", "jsonl", "jsonl: train_log.jsonl and val_log.jsonl, always written, the run's record; "
                    "tensorboard: also TensorBoard event files in OUT/tensorboard/ as the run goes (tensorboard "
                    "--logdir OUT); needs the tensorboard package, an extra: pip install tensorboard (default: "
                    "%(default)s)", choices=["jsonl", "tensorboard"])
    # ---- this invocation's, not the recipe's (NOT_RECIPE)
    resume: str | None = flag("output", None, "auto: continue from the newest checkpoint in --out (start fresh if "
                              "there is none); PATH: a checkpoint folder or a run folder", metavar="auto|PATH")
    overwrite: bool = flag("output", False, "start again in an --out folder that holds a run (its run files are "
                           "deleted)")
    print_config: bool = flag("output", False, "print the resolved configuration as JSON and exit (a file --config "
                              "reads back)")
    config: str | None = flag("output", None, "read the flags from FILE: what --print-config writes, or a JSON object "
                              "of flag names (lora_r, lr, ...) and values; flags given on the command line override "
                              "it", metavar="FILE")
    dry_run: bool = flag("output", False, "load the tokenizer and the data only: print statistics and one rendered "
                         "example, and exit")
    # test-only: make the loss of this step NaN (the non-finite-loss handling); make the last rank fail at this
    # step (its peers stop too)
    debug_nan_at_step: int | None = flag(None, None, "")
    debug_fail_at_step: int | None = flag(None, None, "")

    def recipe(self) -> dict:
        """The recipe fields by name: config.json's "args"."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_RECIPE}


# Flags of one invocation, not of the run's recipe: config.json and --print-config leave them out, --config
# refuses them.
NOT_RECIPE = ("config", "print_config", "dry_run", "resume", "overwrite", "debug_nan_at_step", "debug_fail_at_step")


def build_parser(description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    """The argparse parser of RunConfig's fields, in their order and groups: `--lr` for the field lr."""
    p = argparse.ArgumentParser(prog="train.py", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    types = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        options = dict(f.metadata)
        group, names = options.pop("group"), [f"--{f.name.replace('_', '-')}", *options.pop("aliases", [])]
        target = groups[group] if group else p
        if group is None:
            options["help"] = argparse.SUPPRESS
        if types[f.name] is bool:
            target.add_argument(*names, dest=f.name, action="store_true", **options)
        else:
            kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
            options.setdefault("type", kind)
            target.add_argument(*names, dest=f.name, default=f.default, **options)
    return p


def parse_args(argv: list[str] | None = None, **texts) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """(the flags, their parser): those of --config FILE first, then the command line's, so that a flag given
    overrides the file. `texts`: build_parser's description and epilog."""
    parser = build_parser(**texts)
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    path = first.parse_known_args(argv)[0].config
    return parser.parse_args((config_words(parser, path) if path else []) + argv), parser


def config_words(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """--config FILE as command-line words: the "args" of a --print-config output (or of a run's config.json), or a
    JSON object of flag names and values. A key that is not a recipe flag, or a value of the wrong kind, stops with
    one line naming the file and the key."""
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        parser.error(f"--config {file}: not a readable JSON file ({e})")
    flags = data.get("args", data) if isinstance(data, dict) else None
    if not isinstance(flags, dict):
        parser.error(f"--config {file}: expected a JSON object of flags (what --print-config writes)")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_RECIPE + ("help",)}
    words = []
    for key, value in flags.items():
        action = actions.get(key)
        if action is None:
            parser.error(f"--config {file}: {key!r} is not a train.py flag of the run's recipe")
        flag_name = action.option_strings[0]
        switch = isinstance(action, argparse._StoreTrueAction)
        kind = bool if switch else {int: int, float: (int, float)}.get(action.type, str)
        if value is None and not switch:
            if action.default is not None:
                parser.error(f"--config {file}: {key} is null; give a value or leave the key out")
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            wanted = {bool: "true or false", int: "an integer", str: "a string"}.get(kind, "a number")
            parser.error(f"--config {file}: {key} must be {wanted}, got {value!r}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {file}: {key} {value!r} is not one of {', '.join(map(str, action.choices))}")
        words += ([flag_name] if value else []) if switch else [flag_name, str(value)]
    return words


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The run's RunConfig: value checks argparse cannot do (each failure is one line and exit code 2), the
    canonical spellings."""
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
    try:   # one spelling per run: PM,PRP and prp,Product_Matching are the same run
        args.tasks = "all" if is_all(args.tasks) else ",".join(parse_tasks(args.tasks))
    except ValueError as e:
        parser.error(f"--tasks: {e}")
    try:
        args.setting = ",".join(parse_settings(args.setting) or SETTINGS)   # one spelling in config.json
    except ValueError as e:
        parser.error(f"--setting: {e}")
    text, path, kind = args.model, Path(args.model).expanduser(), source_kind(args.model)
    if kind in LOCAL_KINDS and not path.exists():
        parser.error(f"--model {text}: no such file or folder")
    if kind == "gguf" and not path.is_file():
        parser.error(f"--model {text}: not a file")
    if kind == "unknown":
        parser.error(f"--model {text!r} is not a known alias ({', '.join(PRESETS)}), a hub id (org/name), a folder "
                     "or a .gguf file")
    dpath = Path(args.dataset).expanduser()
    data_local = args.dataset.lower().endswith(DATA_SUFFIXES) or args.dataset.startswith((".", "/", "~"))
    if data_local and not dpath.is_file():
        parser.error(f"--dataset {args.dataset}: no such file")
    if args.resume not in (None, "auto") and not Path(args.resume).expanduser().is_dir():
        parser.error(f"--resume {args.resume}: no such folder (pass auto, a checkpoint folder or a run folder)")
    if args.init_adapter is not None:
        check_init_adapter(args, parser)
    if args.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        parser.error("--log tensorboard needs the tensorboard package, an extra setup.sh does not install: "
                     "pip install tensorboard (or leave --log out: train_log.jsonl is written either way)")
    return RunConfig(**vars(args))


def check_init_adapter(args, parser) -> None:
    """--init-adapter: an adapter folder whose r and alpha are this run's (targets and shapes are checked when the
    weights are copied in, the base by its fingerprint)."""
    from lora import read_adapter_config

    try:
        cfg = read_adapter_config(Path(args.init_adapter).expanduser())
    except (OSError, ValueError) as e:
        parser.error(f"--init-adapter: {e}")
    for flag_name, key, ours in (("--lora-r", "r", args.lora_r), ("--lora-alpha", "lora_alpha", args.lora_alpha)):
        if cfg[key] != ours:
            parser.error(f"--init-adapter {args.init_adapter}: its {key} is {cfg[key]}, this run's {flag_name} is "
                         f"{ours}: pass {flag_name} {cfg[key]}")
