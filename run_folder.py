"""The --out folder of a train.py run: who may write it, what it holds, how a run continues from it.

One run at a time. A run holds an flock on .train.lock for as long as it lives (the kernel drops it when
the process dies, so a killed run never leaves the folder stuck); a second train.py on the folder, fresh,
resumed or overwriting, is refused with one line naming the live run. --overwrite deletes only what a run
writes (RUN_FILES) and only in a folder that carries train_run.json, the marker written into every run
folder: never a model folder's config.json.

  train_run.json           the marker: this folder is a train.py run; lists the names a run writes
  config.json              the resolved configuration (a resumed run must match it, see MUST_MATCH)
  train_log.jsonl          one JSON object per optimizer step: step, epoch, loss, lr, grad_norm,
                           tokens, supervised_tokens, tokens_per_s, peak_mem_gb (the peak RSS on a CPU),
                           rss_gb (the RSS now), time
  val_log.jsonl            one JSON object per validation: step, epoch, val_loss, val_tokens, best, rss_gb (after
                           the memory freed is handed back), peak_mem_gb
  checkpoints/step-NNNNNN/ adapter/ (PEFT format), state.pt (optimizer, schedule, RNG, data position;
                           loads with torch.load(weights_only=True)), trainer_state.json, config.json.
                           Written to checkpoints/.tmp-step-NNNNNN and renamed when complete; the last
                           --keep-last are kept
  best/                    the adapter with the lowest validation loss (+ best.json)
  adapter/                 the adapter after the last step
  loss_curve.png           the training and validation losses (matplotlib)
  tensorboard/             with --log tensorboard only: TensorBoard event files mirroring the two logs
                           (TENSORBOARD_TAGS), flushed at every record; a resume purges the steps it redoes

Every adapter folder also holds base.json, the base it was trained on (lora.io.base_record): evaluate.py
and export.py take their defaults from it. Every file goes through outdir.write_atomic or a folder
renamed into place when complete, so a kill at any moment leaves the previous state readable.

Resuming: a checkpoint's meaning is fixed by the MUST_MATCH flags, the resolved dtype and the
fingerprints of the tokenized training and validation rows; a resume that changes any of them is
refused. MAY_CHANGE flags (a lower --lr after a divergence) may change, and the change is printed.
After a divergence, the checkpoints written from its first abnormal step on are renamed
checkpoints/diverged-step-NNNNNN, so --resume auto continues from the last good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from data import parse_tasks
from data.ecinstruct import is_all
from outdir import (DiskFull, FolderBusy, FolderLock, disk_full, fsync_tree, is_disk_full, open_append,
                    read_jsonl, read_marker, remove_path, swap_in, write_atomic, write_json)

FORMAT = 1                      # checkpoint layout version (state.pt "format")
# Flags that give a checkpoint its meaning: resuming with a different value is refused. So do the resolved
# dtype (--dtype auto is bf16 on one machine, fp32 on another) and the fingerprints of the tokenized rows.
MUST_MATCH = ("model", "quant", "lora_r", "lora_alpha", "lora_targets", "dataset", "tasks", "setting", "cutoff",
              "template", "train_on_inputs", "max_train_rows", "batch_size", "seed", "val_size")
# Flags a resumed run may change (e.g. a lower --lr after a NaN): the change is printed.
MAY_CHANGE = ("lr", "epochs", "max_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "lora_dropout",
              "micro_batch_tokens", "diverge_factor", "diverge_steps")
RUN_FILES = ("config.json", "train_log.jsonl", "val_log.jsonl", "loss_curve.png", "checkpoints", "adapter", "best",
             "tensorboard")
RUN_MARKER = "train_run.json"   # written into every run folder; --overwrite needs it (read by content: read_marker)
LOCK_NAME = ".train.lock"       # flock-ed for the whole run
# --log tensorboard: log file -> {record key: TensorBoard tag}
TENSORBOARD_TAGS = {"train_log.jsonl": {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                                        "tokens_per_s": "train/tokens_per_s", "peak_mem_gb": "memory/peak_gb",
                                        "rss_gb": "memory/rss_gb"},
                    "val_log.jsonl": {"val_loss": "val/loss"}}


class RunRefused(ValueError):
    """The folder cannot be used as asked (busy, not a run, a different run, no checkpoint): one line."""


# ---- checkpoints ----------------------------------------------------------------------------------

def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (sorted by step number, not by name)."""
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if p.name[5:].isdigit() and (p / "state.pt").is_file() and (p / "adapter").is_dir():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def write_adapter_dir(model, final: Path, base_name: str | None, base: dict, extra: dict | None = None) -> None:
    """An adapter folder (PEFT format, base.json, the `extra` JSON files), written beside `final` and renamed
    into place when complete."""
    from lora import save_adapter

    tmp = final.with_name(f".tmp-{final.name}")
    remove_path(tmp)
    with writing(tmp, adapter_bytes(model)):
        save_adapter(model, tmp, base_model_name_or_path=base_name, base=base)
        for name, obj in (extra or {}).items():
            write_json(tmp / name, obj)
        fsync_tree(tmp)
    swap_in(tmp, final, final.with_name(f".old-{final.name}"))


def adapter_bytes(model) -> int:
    """Bytes of the trainable tensors an adapter file holds (what a save needs on disk, roughly)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def writing(path: Path, needed: int | None):
    """Turn a full disk while writing `path` (torch's and safetensors' own errors for it included) into DiskFull:
    one line naming `path` and the bytes it needed. What was half written is the caller's to drop."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(path, needed) from None
        raise


def slow_save_hook(step: int) -> None:
    """Test hook: SLM_EC_TEST_SLOW_SAVE="STEP:SECONDS" pauses the checkpoint of step STEP after its adapter is
    written (tests kill the process there to show a half-written checkpoint is never used)."""
    spec = os.environ.get("SLM_EC_TEST_SLOW_SAVE")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


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


def canonical(flag: str, value):
    """A flag's value in the one spelling runs are compared in (runs before canonical --tasks wrote `PM,PRP`)."""
    if flag == "tasks" and isinstance(value, str) and not is_all(value):
        with contextlib.suppress(ValueError):
            return ",".join(parse_tasks(value))
    return value


def compare_configs(saved: dict, now: dict, where: str, say) -> None:
    """Refuse (RunRefused) a resume whose MUST_MATCH flags, resolved dtype or data differ; say the allowed changes."""
    s, n = saved.get("args", {}), now["args"]
    differ = [k for k in MUST_MATCH if k in s and canonical(k, s[k]) != canonical(k, n[k])]
    if saved.get("dtype") and saved["dtype"] != now["dtype"]:
        differ.append(f"the base's dtype ({saved['dtype']} there, {now['dtype']} now: --dtype)")
    if saved.get("data_fingerprint") and now.get("data_fingerprint") and \
            saved["data_fingerprint"] != now["data_fingerprint"]:
        differ.append("data (the tokenized training rows differ)")
    if "val_fingerprint" in saved and "val_fingerprint" in now and saved["val_fingerprint"] != now["val_fingerprint"]:
        differ.append("validation set (the tokenized validation rows differ)")
    if saved.get("init_adapter_sha256") != now.get("init_adapter_sha256"):
        differ.append("the adapter the LoRA weights started from (--init-adapter)")
    if differ:
        text = ", ".join(f"--{k.replace('_', '-')} {s[k]!r} there, {n[k]!r} now" if k in s else k for k in differ)
        raise RunRefused(f"{where} holds a different run ({text}); use another --out, or --overwrite to start again")
    changed = [k for k in MAY_CHANGE if k in s and s[k] != n[k]]
    if changed:
        say("resuming with changed settings: " + ", ".join(f"--{k.replace('_', '-')} {s[k]} -> {n[k]}"
                                                             for k in changed))


def is_train_config(path: Path) -> bool:
    """A config.json that train.py wrote (a run from before run markers existed), not a model's."""
    try:
        read_run_config(path)
    except RunRefused:
        return False
    return True


def read_run_config(path: Path) -> dict:
    """The run configuration train.py wrote at `path`; RunRefused naming the file when it is not one (damaged,
    not JSON, or another program's config.json such as a model's)."""
    path = Path(path)
    if path.is_symlink():
        raise RunRefused(f"{path} is a link, not the run's configuration; refusing to follow it")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunRefused(f"{path} is damaged (not JSON: {e}); it is not a train.py run configuration, so the run "
                         "there cannot be continued: pass another --out, or --overwrite to start again") from None
    except OSError as e:
        raise RunRefused(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise RunRefused(f"{path} is damaged (a JSON {type(cfg).__name__}, not an object); it is not a train.py run "
                         "configuration, so the run there cannot be continued: pass another --out, or --overwrite to "
                         "start again")
    if not (isinstance(cfg.get("args"), dict) and "format" in cfg and "model_id" in cfg):
        raise RunRefused(f"{path} is not a train.py run configuration (a model's config.json?); refusing to use or "
                         "replace it: pass another --out")
    return cfg


# ---- the folder -----------------------------------------------------------------------------------

class RunFolder:
    """The --out folder of one run. Rank 0 writes; every method is safe to call on every rank."""

    def __init__(self, out: Path, rank: int = 0):
        self.out, self.rank = Path(out), rank
        self.checkpoints = self.out / "checkpoints"
        self.tensorboard = None   # --log tensorboard: the SummaryWriter start() opens

    def open(self, held, *, resume: str | None, overwrite: bool, config: dict, say=print) -> list[Path]:
        """Take the lock (held until `held` closes) and decide where the run starts: the checkpoint folders to
        try, newest first ([]: fresh). `config` is the whole run's, the data's fingerprints included (the data is
        read first). Refuses (RunRefused) a busy folder, one train.py did not write, a run there without --resume
        or --overwrite, or a different run (other flags or other rows), for --resume auto and PATH alike."""
        out = self.out
        if self.rank == 0:
            try:
                held.enter_context(FolderLock(out, "train.py", LOCK_NAME))
            except FolderBusy as e:
                raise RunRefused(str(e)) from None
            except OSError as e:
                raise RunRefused(f"--out {out}: cannot write there ({e.strerror or e})") from None
        marked = read_marker(out / RUN_MARKER, "train.py") is not None
        has_config = (out / "config.json").exists() or (out / "config.json").is_symlink()
        if has_config:   # a run's own configuration, read by content: a model's config.json is never a run's
            try:
                read_run_config(out / "config.json")
            except RunRefused as e:   # a damaged one in a marked run folder is the run's own: --overwrite may go
                if not (marked and overwrite and "is damaged" in str(e)):
                    raise
        foreign = self.foreign()
        if foreign and not marked:
            legacy = is_train_config(out / "config.json")
            if not (legacy and resume):
                raise RunRefused(
                    f"{out} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} but no {RUN_MARKER} "
                    "of train.py, so train.py did not write it"
                    + (" (a run from before run markers: continue it with --resume auto, or delete it yourself)"
                       if legacy else " (a model or adapter folder?): pass another --out; train.py writes and "
                                      "deletes only in folders it created"))
        holds_run = has_config or bool(list_checkpoints(self.checkpoints))
        if holds_run and not resume and not overwrite:
            raise RunRefused(f"{out} already holds a run; pass --resume auto to continue it, --overwrite to start "
                             "again, or another --out")
        if resume == "auto":
            if has_config:
                compare_configs(read_run_config(out / "config.json"), config, str(out), say)
            return list_checkpoints(self.checkpoints)[::-1]
        if resume is None:
            return []
        path = Path(resume).expanduser()
        found = [path] if (path / "state.pt").is_file() else \
            list_checkpoints(path / "checkpoints")[::-1] or list_checkpoints(path)[::-1]
        if not found:
            raise RunRefused(f"--resume {resume}: no complete checkpoint there (a checkpoint folder holds state.pt "
                             "and adapter/)")
        compare_configs(read_run_config(found[0] / "config.json"), config, str(found[0]), say)
        return found

    def foreign(self) -> list[str]:
        """What the folder holds besides run files and the lock: names a run did not write (a model's, the user's)."""
        if not self.out.is_dir():
            return []
        ours = {p.name for p in self.leftovers()} | {LOCK_NAME, RUN_MARKER}
        return sorted(p.name + ("/" if p.is_dir() else "") for p in self.out.iterdir() if p.name not in ours)

    def leftovers(self) -> list[Path]:
        """What a run writes into the folder: RUN_FILES and the temporary names it writes them under."""
        names = set(RUN_FILES)
        for name in RUN_FILES:
            names |= {f".tmp-{name}", f".old-{name}", f".{name}.tmp"}
        return sorted(p for p in (self.out / n for n in names) if p.exists() or p.is_symlink())

    def start(self, config: dict, *, resumed_at: int | None, overwrite: bool, say, tensorboard: bool = False) -> None:
        """Make the folder ready to write: --overwrite's deletions (only now, once the model and the data have
        loaded, so a failed start deletes nothing), the marker, config.json, logs cut back to the step resumed
        at (or emptied), the half-written checkpoints of a killed run removed; with `tensorboard`, the event
        writer (the steps after `resumed_at` purged from what it shows: they are redone)."""
        if self.rank != 0:
            return
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            removed = []
            for p in self.leftovers():   # fixed names of run files only; a link among them goes as a link
                remove_path(p)
                removed.append(p.name)
            if removed:
                say(f"--overwrite: removed {', '.join(removed)} from {out}")
        if read_marker(out / RUN_MARKER, "train.py") is None:
            write_json(out / RUN_MARKER, {
                "written_by": "slm-ec train.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "run_files": list(RUN_FILES),
                "note": "this folder holds a train.py run; --overwrite deletes the run files (and their "
                        ".tmp-/.old- forms) here, and nothing else"})
        write_json(out / "config.json", config)
        for name in ("train_log.jsonl", "val_log.jsonl"):
            kept = [r for r in self.read_log(name) if r.get("step", 0) <= resumed_at] if resumed_at is not None else []
            write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in kept))   # steps after it are redone
        for stale in self.checkpoints.glob(".tmp-step-*") if self.checkpoints.is_dir() else []:
            remove_path(stale)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            events = out / "tensorboard"
            if events.is_symlink() or (events.exists() and not events.is_dir()):
                remove_path(events)   # a run file's name: a link there is removed as a link, never written through
            with writing(events, None):
                self.tensorboard = SummaryWriter(str(events), purge_step=None if resumed_at is None else resumed_at + 1)

    # ---- logs, adapters, checkpoints --------------------------------------------------------------------

    def read_log(self, name: str) -> list[dict]:
        """The records of train_log.jsonl or val_log.jsonl (a line cut by a kill is left out)."""
        return read_jsonl(self.out / name, skip_bad=True, missing_ok=True)

    def log(self, name: str, record: dict) -> None:
        """Append `record` to the log `name` (and, with --log tensorboard, its scalars to the event file)."""
        if self.rank == 0:
            line = json.dumps(record) + "\n"
            with writing(self.out / name, len(line)), open_append(self.out / name) as f:   # a link: never followed
                f.write(line)
            if self.tensorboard is not None:
                with writing(self.out / "tensorboard", None):
                    for key, tag in TENSORBOARD_TAGS[name].items():
                        if isinstance(record.get(key), (int, float)):
                            self.tensorboard.add_scalar(tag, record[key], record["step"])
                    self.tensorboard.flush()   # written now: a full disk is this record's error, not a thread's

    def save_adapter(self, name: str, model, base_name: str | None, base: dict, extra: dict | None = None) -> None:
        if self.rank == 0:
            write_adapter_dir(model, self.out / name, base_name, base, extra)

    def save_checkpoint(self, step: int, *, model, base_name: str | None, base: dict, train_state: dict,
                        config: dict, keep_last: int, suspect_from: int | None) -> Path | None:
        """checkpoints/step-NNNNNN, written under .tmp-step-NNNNNN and renamed when complete; then all but the last
        `keep_last` are pruned, except the last good one while the loss looks abnormal (from `suspect_from` on)."""
        if self.rank != 0:
            return None
        from lora import save_adapter

        root = self.checkpoints
        good = [p for p in list_checkpoints(root) if int(p.name[5:]) < suspect_from] if suspect_from else []
        root.mkdir(parents=True, exist_ok=True)
        final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
        remove_path(tmp)
        state = io.BytesIO()
        torch.save(train_state, state)   # in memory first: a full disk then fails one plain write, sized
        with writing(tmp, adapter_bytes(model) + state.getbuffer().nbytes):
            tmp.mkdir()
            save_adapter(model, tmp / "adapter", base_model_name_or_path=base_name, base=base)
            slow_save_hook(step)
            write_atomic(tmp / "state.pt", state.getvalue())
            write_json(tmp / "trainer_state.json",
                       {k: v for k, v in train_state.items() if k not in ("optimizer", "rng")})
            write_json(tmp / "config.json", config)
            fsync_tree(tmp)
        swap_in(tmp, final, final.with_name(f".old-{final.name}"))
        for old in list_checkpoints(root)[:-keep_last]:  # only once the new one is complete
            if not good or old != good[-1]:
                remove_path(old)
        return final

    def set_aside(self, from_step: int | None) -> tuple[Path | None, list[Path]]:
        """After a divergence: rename the checkpoints of steps >= from_step to diverged-step-NNNNNN (so that
        --resume auto skips them); (the newest remaining checkpoint, the renamed ones). Rank 0 only."""
        if self.rank != 0:
            return None, []
        saved = list_checkpoints(self.checkpoints)
        bad = [p for p in saved if from_step is not None and int(p.name[5:]) >= from_step]
        moved = []
        for p in bad:
            target = p.with_name(f"diverged-{p.name}")
            remove_path(target)
            os.rename(p, target)
            moved.append(target)
        good = [p for p in saved if p not in bad]
        return (good[-1] if good else None), moved

    def plot_losses(self) -> Path:
        """loss_curve.png from the logs (drawn to a temporary name: a kill while drawing leaves no torn picture)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train, val = self.read_log("train_log.jsonl"), self.read_log("val_log.jsonl")
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
        write_atomic(self.out / "loss_curve.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        plt.close(fig)
        return self.out / "loss_curve.png"
