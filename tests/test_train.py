"""train.py on a tiny random Llama (CPU): exact resume, crash-safe checkpoints, the accumulation
normalisation, torchrun parity, and the failure messages (NaN, out of memory, refused folder, bad flags).

Runs are in-process (`train.main(argv)`) except where the test needs a real process: SIGKILL and torchrun.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train
from run_folder import list_checkpoints
from data import collate, pack, parse_tasks
from lora import apply_lora, load_adapter
from metrics.tasks import TASKS
from model import load_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["product", "title", "query", "yes", "no", "color", "red", "value", "source", "relevant", "buy", "users"]


def write_rows(path: Path, n_train: int = 24, n_val: int = 8, seed: int = 0) -> Path:
    """Short ECInstruct-shaped rows over all ten tasks; answers of 1..12 words, so micro-batches hold
    very different numbers of supervised tokens."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_train + n_val):
            f.write(json.dumps({
                "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
                "input": " ".join(rng.choices(WORDS, k=rng.randint(3, 20))),
                "options": None, "task": TASKS[i % len(TASKS)], "setting": "IND_Diverse_Instruction",
                "split": "train" if i < n_train else "val", "few_shot_example": None,
                "instruction": "Write a response that appropriately completes the request.",
            }) + "\n")
    return path


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "rows.jsonl")


def base_args(model_dir, rows, out, *extra) -> list[str]:
    """24 train rows, 8 per step (3 steps an epoch), micro-batches of <= 1024 padded tokens, dropout on."""
    return ["--model", str(model_dir), "--dataset", str(rows), "--quant", "none", "--batch-size", "8",
            "--cutoff", "512", "--micro-batch-tokens", "1024", "--val-size", "8", "--cache-dir", "",
            "--out", str(out), "--seed", "3", "--no-progress", *extra]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def run_error(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code, capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the loss ---------------------------------------------------------------------------------

def test_accumulation_normalisation_equals_one_big_batch(tiny_dir):
    """sum over micro-batches of (token loss sum / supervised tokens of the whole step) has the loss and
    the gradient of one big batch's mean, though the micro-batches hold 2, 9 and 30 supervised tokens."""
    model, _ = load_model(tiny_dir)
    apply_lora(model, dropout=0.0)
    torch.manual_seed(0)
    for m in model.modules():  # B = 0 at init would make the LoRA-A gradients vanish: give B values
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    g = torch.Generator().manual_seed(1)
    rows = []
    for length, supervised in ((12, 2), (20, 9), (40, 30)):
        ids = torch.randint(3, 384, (length,), generator=g).tolist()
        rows.append((ids, [-100] * (length - supervised) + ids[length - supervised:]))
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(sum(v != -100 for v in labels[1:]) for _, labels in rows)

    # micro-batches: one row each, chunked loss of 4 positions at a time
    total = 0.0
    for ids, labels in rows:
        b = collate([ids], [labels], pad_id=2)
        loss = train.token_loss_sum(model, b["input_ids"], b["labels"], chunk=4) / n
        loss.backward()
        total += loss.item()
    grads_micro = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    # one big padded batch, full logits, the textbook shifted mean
    b = collate([r[0] for r in rows], [r[1] for r in rows], pad_id=2)
    logits = model(b["input_ids"])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1),
                          ignore_index=-100)
    ref.backward()
    assert abs(total - ref.item()) < 1e-6
    for gm, p in zip(grads_micro, params):
        torch.testing.assert_close(gm, p.grad, rtol=1e-5, atol=1e-7)

    # a mean of micro-batch means (the 2024 bug) is measurably different
    means = [train.token_loss_sum(model, *(lambda c: (c["input_ids"], c["labels"]))(collate([i], [l], pad_id=2))).item()
             / sum(v != -100 for v in l[1:]) for i, l in rows]
    assert abs(sum(means) / 3 - ref.item()) > 1e-3


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_micro_batch_equals_the_padded_one(tiny_dir, checkpointing):
    """Rows laid end to end without padding (data.pack + model.Packing, what train.py runs) give each row's
    hidden states, the loss and the LoRA gradients of the right-padded batch, with grouped-query attention
    and rows of different lengths; with layer checkpointing too."""
    from model import Packing

    model, _ = load_model(tiny_dir)
    apply_lora(model, dropout=0.0)
    model.gradient_checkpointing = checkpointing
    model.train()
    torch.manual_seed(0)
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    g = torch.Generator().manual_seed(2)
    rows = []
    for length, supervised in ((37, 5), (9, 9), (23, 1), (30, 12)):
        ids = torch.randint(3, 384, (length,), generator=g).tolist()
        rows.append((ids, [-100] * (length - supervised) + ids[length - supervised:]))
    params = [p for p in model.parameters() if p.requires_grad]

    padded = collate([r[0] for r in rows], [r[1] for r in rows], pad_id=2)
    loss_padded = train.token_loss_sum(model, padded["input_ids"], padded["labels"], chunk=8)
    loss_padded.backward()
    grads_padded = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    packed = pack([r[0] for r in rows], [r[1] for r in rows])
    packing = Packing(packed["lengths"])
    loss_packed = train.token_loss_sum(model, packed["input_ids"], packed["labels"], chunk=8, packing=packing)
    loss_packed.backward()
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=1e-6)
    for gp, p in zip(grads_padded, params):   # fp32 rounding of another attention kernel: ~2e-5 relative
        torch.testing.assert_close(p.grad, gp, rtol=1e-4, atol=1e-6)
    # the filler row up to 64 tokens (train.FILL_TO: on a CPU in bf16/fp16 only) changes neither the loss nor a gradient
    assert [train.token_multiple(torch.device(d), dt) for d, dt in
            (("cpu", "bfloat16"), ("cpu", "float16"), ("cpu", "float32"), ("cuda", "bfloat16"))] == [64, 64, 1, 1]
    grads_packed = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    filled = pack([r[0] for r in rows], [r[1] for r in rows], multiple=train.FILL_TO)
    tokenized = SimpleNamespace(input_ids=[r[0] for r in rows], labels=[r[1] for r in rows])
    ids, _, filled_packing = train.packed_micro_batch(tokenized, [0, 1, 2, 3], torch.device("cpu"), train.FILL_TO)
    assert torch.equal(ids, filled["input_ids"]) and filled_packing.block == 64 and filled_packing.lengths[-1] == 29
    assert filled["filler"] == 128 - 99 and filled["input_ids"].shape == (1, 128)
    loss_filled = train.token_loss_sum(model, filled["input_ids"], filled["labels"], chunk=8,
                                       packing=Packing(filled["lengths"]))
    loss_filled.backward()
    torch.testing.assert_close(loss_filled, loss_packed, rtol=1e-6, atol=1e-6)
    for gp, p in zip(grads_packed, params):
        torch.testing.assert_close(p.grad, gp, rtol=1e-5, atol=1e-7)

    with torch.no_grad():   # every row's hidden states, packed or alone
        hidden = model(packed["input_ids"], packing=packing, return_hidden=True)[0]   # (N, H)
        start = 0
        for ids, _ in rows:
            alone = model(torch.tensor([ids]), return_hidden=True)[0]
            torch.testing.assert_close(hidden[start:start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ids)
    with pytest.raises(ValueError, match="packing holds 98 tokens, input_ids 99"):
        model(packed["input_ids"], packing=Packing([90, 8]))


def test_lr_schedule_warmup_then_cosine():
    lrs = [train.lr_at(s, lr=1e-4, warmup=5, total=100) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[4] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-4)
    assert lrs[52] == pytest.approx(5e-5, rel=0.05) and 0 < lrs[-1] < 1e-6
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


# ---- exact resume, crash-safe checkpoints --------------------------------------------------------

@pytest.mark.slow
def test_killed_while_checkpointing_then_resumed_matches_uninterrupted(tiny_dir, rows_file, tmp_path):
    """6 steps (2 epochs) straight, against: a process SIGKILLed while writing checkpoint 5, then
    --resume auto (from checkpoint 4, mid-epoch). Same per-step losses (1e-6) and adapter; dropout is on."""
    steps = ["--max-steps", "6", "--save-every", "1", "--keep-last", "2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "SLM_EC_TEST_SLOW_SAVE": "5:120", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *base_args(tiny_dir, rows_file, killed, *steps)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        straight = tmp_path / "straight"
        torch.set_num_threads(1)
        assert train.main(base_args(tiny_dir, rows_file, straight, *steps)) == 0
        half_written = killed / "checkpoints" / ".tmp-step-000005" / "adapter" / "adapter_model.safetensors"
        deadline = time.time() + 120
        while not half_written.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert half_written.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timed out"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # the checkpoint being written is incomplete and invisible; the previous one is whole and loadable
    ckpts = list_checkpoints(killed / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000003", "step-000004"]
    state = torch.load(ckpts[-1] / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 1)
    model, _ = load_model(tiny_dir)
    load_adapter(model, ckpts[-1] / "adapter")

    assert train.main(base_args(tiny_dir, rows_file, killed, *steps, "--resume", "auto")) == 0
    assert not (killed / "checkpoints" / ".tmp-step-000005").exists()
    a, b = losses(straight), losses(killed)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-6
    ta, tb = adapter_tensors(straight / "adapter"), adapter_tensors(killed / "adapter")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)
    va = [json.loads(x)["val_loss"] for x in (straight / "val_log.jsonl").read_text().splitlines()]
    vb = [json.loads(x)["val_loss"] for x in (killed / "val_log.jsonl").read_text().splitlines()]
    assert len(va) == len(vb) == 3 and max(abs(x - y) for x, y in zip(va, vb)) < 1e-6

    # what a finished run leaves behind
    for path in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "best/adapter_model.safetensors",
                 "best/best.json", "config.json", "checkpoints/step-000006/trainer_state.json"):
        assert (straight / path).is_file(), path
    assert [p.name for p in list_checkpoints(straight / "checkpoints")] == ["step-000005", "step-000006"]
    record = json.loads((straight / "train_log.jsonl").read_text().splitlines()[0])
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s",
            "peak_mem_gb", "time"} <= record.keys()
    config = json.loads((straight / "config.json").read_text())
    assert config["args"]["lora_r"] == 16 and config["total_steps"] == 6 and config["steps_per_epoch"] == 3
    if (straight / "loss_curve.png").exists():  # matplotlib is optional
        assert (straight / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_losses(tiny_dir, rows_file, tmp_path):
    """Same global batch over 2 gloo ranks: the same per-step losses and adapter as one process
    (dropout off: the masks are per rank)."""
    steps = ["--max-steps", "3", "--lora-dropout", "0", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    duo = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "train.py",
                          *base_args(tiny_dir, rows_file, tmp_path / "duo", *steps)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert duo.returncode == 0, duo.stderr[-3000:]
    assert train.main(base_args(tiny_dir, rows_file, tmp_path / "solo", *steps)) == 0
    solo, two = losses(tmp_path / "solo"), losses(tmp_path / "duo")
    assert [s for s, _ in solo] == [s for s, _ in two] == [1, 2, 3]
    for (_, x), (_, y) in zip(solo, two):
        assert abs(x - y) < 1e-5
    ta, tb = adapter_tensors(tmp_path / "solo" / "adapter"), adapter_tensors(tmp_path / "duo" / "adapter")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)
    state = torch.load(tmp_path / "duo" / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["world_size"] == 2


@pytest.mark.slow
def test_interrupt_writes_a_checkpoint_and_resume_finishes(tiny_dir, rows_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    lr_at = train.lr_at
    sent = []

    def interrupt_at_step_2(step, **kw):
        if step == 1 and not sent:  # once: a second Ctrl-C means "stop now"
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, **kw)

    monkeypatch.setattr(train, "lr_at", interrupt_at_step_2)
    code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "4", "--save-every", "100"), capsys)
    assert code == 130 and "--resume auto" in err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000002"]
    monkeypatch.setattr(train, "lr_at", lr_at)
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "4", "--resume", "auto")) == 0
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]


# ---- failures, each with a clear message ------------------------------------------------------------

@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, rows_file, tmp_path, capsys):
    """A nan loss at step 3 is computed with the weights of checkpoint 2: that checkpoint is set aside, the
    run names checkpoint 1, and --resume auto continues from it."""
    out = tmp_path / "run"
    code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "5", "--save-every", "1",
                                    "--debug-nan-at-step", "3"), capsys)
    assert code == 1
    assert "diverged at step 3: the loss is nan" in err and "--lr" in err and "step-000001" in err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001"]
    assert (out / "checkpoints" / "diverged-step-000002" / "state.pt").is_file()
    assert [s for s, _ in losses(out)] == [1, 2] and not (out / "adapter").exists()
    state = torch.load(out / "checkpoints" / "step-000001" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v["exp_avg"]).all() for v in state["optimizer"]["state"].values())
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "5", "--save-every", "1",
                                "--resume", "auto")) == 0
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]


def test_out_of_memory_names_the_flag_to_lower(tiny_dir, rows_file, tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "token_loss_sum", oom)
    code, err = run_error(base_args(tiny_dir, rows_file, tmp_path / "run", "--max-steps", "2", "--val-size", "0"),
                          capsys)
    assert code == 1 and "out of memory" in err and "--micro-batch-tokens" in err


@pytest.mark.slow
def test_a_folder_holding_a_run_is_refused(tiny_dir, rows_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--val-size", "0")) == 0
    code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "1"), capsys)
    assert code == 2 and "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--lora-r", "8", "--resume", "auto"),
                          capsys)
    assert code == 2 and "different run" in err and "--lora-r 16 there, 8 now" in err
    # a finished run resumes as "already complete"; --overwrite starts again
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--val-size", "0", "--resume", "auto")) == 0
    assert "already complete" in capsys.readouterr().out
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--lora-r", "8", "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["args"]["lora_r"] == 8


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "0"], "--lora-r must be at least 1"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--micro-batch-tokens", "64"], "--micro-batch-tokens (64) must be at least --cutoff (512)"),
    (["--tasks", "AVE,XYZ"], "--tasks"),
    (["--quant", "fp8"], "invalid choice: 'fp8'"),
    (["--dataset", "no/such/file.jsonl"], "--dataset no/such/file.jsonl: no such file"),
    (["--model", "missing.gguf"], "--model missing.gguf: no such file"),
    (["--model", "not-an-alias"], "is not a known alias"),
    (["--resume", "no-such-folder"], "--resume no-such-folder: no such folder"),
    (["--resume", "auto", "--overwrite"], "contradict"),
    (["--lora-targets", "q_proj,nope"], "unknown LoRA target(s) nope"),
])
def test_bad_flags_exit_2_with_a_message(tiny_dir, rows_file, tmp_path, capsys, flags, message):
    code, err = run_error(base_args(tiny_dir, rows_file, tmp_path / "run", "--max-steps", "1", *flags), capsys)
    assert code == 2 and message in err, err


# ---- the cheap modes --------------------------------------------------------------------------------

def test_dry_run_loads_no_weights(tiny_dir, rows_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_frozen_base", lambda *a, **k: pytest.fail("--dry-run loaded the weights"))
    assert train.main(base_args(tiny_dir, rows_file, tmp_path / "run", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "Attribute_Value_Extraction" in out and "p90" in out and "steps: 3 per epoch, 9 in all" in out
    assert "### Response:" in out and "[[" in out and "]]" in out   # the supervised part marked
    assert not (tmp_path / "run").exists()


def test_print_config(capsys):
    assert train.main(["--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    a = config["args"]
    assert (a["model"], a["quant"], a["lora_r"], a["lora_alpha"], a["lora_dropout"]) == ("smollm2-360m", "nf4", 16, 16, 0.1)
    assert (a["lr"], a["epochs"], a["batch_size"], a["cutoff"], a["warmup_ratio"]) == (1e-4, 3, 128, 2048, 0.05)
    assert (a["dataset"], a["tasks"], a["setting"]) == ("NingLab/ECInstruct", "all", "IND_Diverse_Instruction")
    assert config["model_id"] == "HuggingFaceTB/SmolLM2-360M" and config["out"].endswith("smollm2-360m")


def test_nf4_base_trains_on_cpu(tiny_dir, rows_file, tmp_path):
    out = tmp_path / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--quant", "nf4", "--max-steps", "2", "--val-size", "0")) == 0
    assert all(abs(x) < 100 for _, x in losses(out))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16


def start_ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`world` train.py processes joined by env:// rendezvous, as a launcher other than torchrun starts them
    (no agent that kills the survivors when one dies)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "plain"])
def test_a_failed_rank_stops_the_others_within_seconds(tiny_dir, rows_file, tmp_path, launcher):
    """Rank 1 fails at step 2; rank 0, waiting in that step's all_reduce, stops too within seconds (not at the
    30-minute collective timeout), with a line naming the failed rank."""
    args = base_args(tiny_dir, rows_file, tmp_path / "run", "--max-steps", "6", "--debug-fail-at-step", "2")
    if launcher == "torchrun":
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                   f"--master_port={free_port()}", "train.py", *args], cwd=ROOT, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    else:
        procs = start_ranks(args)
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and (tmp_path / "run" / "train_log.jsonl").is_file() and \
                    (tmp_path / "run" / "train_log.jsonl").read_text().strip():
                failed_at = time.monotonic()   # step 1 is logged: step 2 (the failing one) is under way
            if failed_at is not None and time.monotonic() - failed_at > 60:
                raise AssertionError("a rank is still running 60 s after its peer failed")
            time.sleep(0.2)
    finally:
        for p in procs:
            p.kill()
    outputs = [p.communicate() for p in procs]
    assert all(p.returncode not in (0, None) for p in procs)
    stderr = "".join(err for _, err in outputs)
    assert "rank 1 fails at step 2" in stderr
    if launcher == "plain":
        assert "train.py: error: rank 0 stops because rank 1 failed (exit code 1)" in outputs[0][1]
        assert "Traceback" not in outputs[0][1]


# ---- the run's recipe in a file ---------------------------------------------------------------------

def test_config_file_round_trip(tmp_path, tiny_dir, capsys):
    """--print-config > c.json; --config c.json gives the same run as the flags (the same config.json but for --out,
    the same losses step by step); a flag on the command line overrides the file; tasks have one spelling."""
    rows = write_rows(tmp_path / "rows.jsonl")
    flags = base_args(tiny_dir, rows, tmp_path / "flags", "--tasks", "PRP,PM", "--lr", "2e-3", "--max-steps", "2")
    assert train.main(flags + ["--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.json").write_text(printed)
    assert json.loads(printed)["args"]["tasks"] == ",".join(parse_tasks("PM,PRP"))
    assert train.main(flags) == 0
    assert train.main(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "file")]) == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("flags", "file"))
    assert {k: v for k, v in a["args"].items() if k != "out"} == {k: v for k, v in b["args"].items() if k != "out"}
    assert losses(tmp_path / "flags") == losses(tmp_path / "file") and len(losses(tmp_path / "file")) == 2
    # PM,PRP written the other way round is the same run: --resume auto continues it
    again = base_args(tiny_dir, rows, tmp_path / "flags", "--tasks", "pm,Product_Relation_Prediction", "--lr", "2e-3",
                      "--max-steps", "3", "--resume", "auto")
    assert train.main(again) == 0 and len(losses(tmp_path / "flags")) == 3


@pytest.mark.parametrize("content, message", [
    ('{"lora_rank": 8}', "'lora_rank' is not a train.py flag"),
    ('{"lora_r": "8"}', "lora_r must be an integer"),
    ('{"lr": true}', "lr must be a number"),
    ('{"quant": "int8"}', "quant 'int8' is not one of nf4, none"),
    ('{"resume": "auto"}', "'resume' is not a train.py flag of the run's recipe"),
    ('[1, 2]', "expected a JSON object of flags"),
    ('{"lr": ', "not a readable JSON file"),
])
def test_a_bad_config_file_is_named(tmp_path, content, message, capsys):
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--config {tmp_path / 'c.json'}" in err and message in err, err


def test_run_config_fields_are_the_flags_and_it_is_frozen(tiny_dir, rows_file, tmp_path, capsys):
    """Each RunConfig field is one flag of the parser built from it (shown in --help but the test-only ones, parsed to
    the field's type), check_args gives it canonical, and nothing changes it after."""
    import dataclasses

    from train_config import RunConfig, build_parser, check_args

    parser = build_parser()
    dests = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert list(dests) == [f.name for f in dataclasses.fields(RunConfig)]
    text = parser.format_help()
    for f in dataclasses.fields(RunConfig):
        shown = f"--{f.name.replace('_', '-')}" in text
        assert shown == (not f.name.startswith("debug_")), f.name
    args = parser.parse_args(base_args(tiny_dir, rows_file, tmp_path / "r", "--tasks", "pm,AVE", "--lora-alpha", "8",
                                       "--dtype", "float32", "--settings", "IND_Diverse_Instruction"))
    config = check_args(args, parser)
    assert config.tasks == "Attribute_Value_Extraction,Product_Matching"
    assert (config.lora_alpha, config.dtype, config.max_train_rows, config.skip_invalid) == (8.0, "fp32", None, False)
    assert isinstance(config.lora_alpha, float) and isinstance(config.lr, float) and isinstance(config.lora_r, int)
    assert config.setting == "IND_Diverse_Instruction" and train.RunConfig is RunConfig
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dtype = "fp32"


# ---- --log tensorboard --------------------------------------------------------------------------------

@pytest.mark.slow
def test_tensorboard_mirrors_the_logs_and_a_resume_purges_the_redone_steps(tiny_dir, rows_file, tmp_path):
    """--log tensorboard: OUT/tensorboard holds train/loss, val/loss, ... at the steps of train_log.jsonl and
    val_log.jsonl, the same values; a run resumed from step 2 of a 3-step session shows each step once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = base_args(tiny_dir, rows_file, out, "--log", "tensorboard", "--save-every", "2", "--eval-every", "1")
    assert train.main(args + ["--max-steps", "3"]) == 0
    shutil.rmtree(out / "checkpoints" / "step-000003")   # as if killed after step 3, before its checkpoint
    assert train.main(args + ["--max-steps", "4", "--resume", "auto"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    train_log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    val_log = [json.loads(line) for line in (out / "val_log.jsonl").read_text().splitlines()]
    shown = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("train/loss", "val/loss", "train/lr")}
    assert [s for s, _ in shown["train/loss"]] == [1, 2, 3, 4] == [r["step"] for r in train_log]
    assert [v for _, v in shown["train/loss"]] == pytest.approx([r["loss"] for r in train_log], rel=1e-6)
    assert [v for _, v in shown["train/lr"]] == pytest.approx([r["lr"] for r in train_log], rel=1e-6)
    assert [s for s, _ in shown["val/loss"]] == [r["step"] for r in val_log] == [0, 1, 2, 3, 4]
    assert [v for _, v in shown["val/loss"]] == pytest.approx([r["val_loss"] for r in val_log], rel=1e-6)


def test_log_tensorboard_without_the_package_is_one_line(tiny_dir, rows_file, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        train.main(base_args(tiny_dir, rows_file, tmp_path / "r", "--log", "tensorboard"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--log tensorboard needs the tensorboard package" in err and "pip install" in err
    assert not (tmp_path / "r").exists()
