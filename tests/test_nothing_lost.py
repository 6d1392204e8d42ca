"""Nothing lost, round two: every script replaces or deletes only what its own marker (read by content) says it
wrote, never follows a link out of its folder, acts on no name from a file that points outside the folder; a full
disk, damaged run files and planted files give one line, never a traceback or a deleted file.

One test per case of the report (1-10), a fault-injection trial that fills the disk at random points of a training
run and resumes it bit-exactly, and the import of bitsandbytes that must never fetch code from the hub.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import export
import outdir
import run_folder
import train
from data import DEFAULT_SAMPLE
from outdir import DiskFull, FolderBusy, FolderLock, finish_pending, replace_together, staging_folder
from run_folder import list_checkpoints
from test_robustness import one_line, rows_file  # noqa: F401  (rows_file: a module-scoped fixture)
from test_train import adapter_tensors, base_args, losses, run_error, write_rows

ROOT = Path(__file__).resolve().parents[1]
IND = "IND_Diverse_Instruction"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir, rows_file) -> Path:
    """A finished 2-step run (the thing cases 1, 7 and 8 must not lose)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "2", "--save-every", "1")) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1: export.py --overwrite never replaces a training run -------------------------------------------------

def test_1_export_overwrite_refuses_a_run_folder_and_a_folder_with_other_files(tiny_dir, run_dir, tmp_path):
    before = snapshot(run_dir)
    with pytest.raises(FileExistsError, match=r"holds no slm_ec_export.json of export.py"):
        export.main(["--model", str(tiny_dir), "--adapter", str(run_dir / "adapter"), "--format", "hf",
                     "--out", str(run_dir), "--overwrite"])
    assert snapshot(run_dir) == before
    out = tmp_path / "merged"
    args = ["--model", str(tiny_dir), "--adapter", str(run_dir / "adapter"), "--format", "hf", "--out", str(out)]
    assert export.main(args) == 0
    marker = json.loads((out / "slm_ec_export.json").read_text())
    assert marker["written_by"] == "slm-ec export.py" and "model.safetensors" in marker["files"]
    assert export.main(args + ["--overwrite"]) == 0            # its own export: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"also holds notes.txt, which export.py did not write"):
        export.main(args + ["--overwrite"])
    assert (out / "notes.txt").read_text() == "mine"
    gguf = tmp_path / "not-a-model.gguf"
    gguf.write_text("my notes")
    with pytest.raises(FileExistsError, match="is not a GGUF file"):
        export.main(["--model", str(tiny_dir), "--format", "gguf", "--out", str(gguf), "--overwrite"])
    assert gguf.read_text() == "my notes"


# ---- 2: a copied train_run.json does not make a model folder a run -----------------------------------------

def test_2_a_copied_marker_does_not_open_a_model_folder(tiny_dir, run_dir, rows_file, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    shutil.copy(run_dir / "train_run.json", folder / "train_run.json")
    before = snapshot(folder)
    for extra in (["--overwrite"], ["--resume", "auto"]):
        code, err = run_error(base_args(tiny_dir, rows_file, folder, "--max-steps", "1", *extra), capsys)
        assert code == 2 and "is not a train.py run configuration (a model's config.json?)" in one_line(err)
    assert snapshot(folder) == before


# ---- 3: a lock file that is a link is never written through --------------------------------------------------

def test_3_a_linked_lock_file_is_refused(tiny_dir, rows_file, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".train.lock").symlink_to(victim)
    code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "1"), capsys)
    assert code == 2 and "is a link, not a lock file" in one_line(err)
    assert victim.read_text() == "precious"
    with pytest.raises(FolderBusy, match="is a link"):
        FolderLock(out, "test", ".train.lock").acquire()


# ---- 4 and 9: evaluate.py's journal names only its own outputs, in its folder ------------------------------------

@pytest.mark.parametrize("journal, message", [
    ({"move": [], "remove": ["../victim.txt"]}, "'../victim.txt' is not a plain file name"),
    ({"move": ["../victim.txt"], "remove": []}, "'../victim.txt' is not a plain file name"),
    ({"move": [], "remove": ["notes.txt"]}, "'notes.txt', which is not one of the files"),
    ({"move": 5}, "not a replacement journal (expected"),
    ("not json", "not a replacement journal (not JSON"),
])
def test_4_9_a_planted_or_damaged_journal_is_refused(tmp_path, journal, message):
    out = tmp_path / "eval"
    out.mkdir()
    victim, notes = tmp_path / "victim.txt", out / "notes.txt"
    victim.write_text("precious")
    notes.write_text("mine")
    (out / ".staging").mkdir()
    (out / ".staging" / "victim.txt").write_text("moved?")
    (out / ".replace-journal.json").write_text(journal if isinstance(journal, str) else json.dumps(journal))
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"task": "PM", "setting": IND, "index": 0, "prediction": "yes"}) + "\n")
    with pytest.raises(ValueError) as e:
        evaluate.main(["--predictions", str(preds), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "PM",
                       "--settings", IND, "--out", str(out)])
    assert message in str(e.value) and ".replace-journal.json" in str(e.value)
    assert victim.read_text() == "precious" and notes.read_text() == "mine"
    assert not (tmp_path / "victim.txt").is_dir()


def test_a_good_journal_still_completes_a_replacement(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text("old")
    staged = staging_folder(folder)
    (staged / "metrics.json").write_text("new")
    replace_together(folder, ["metrics.json"], remove=("results.png",))
    assert (folder / "metrics.json").read_text() == "new" and not finish_pending(folder, evaluate.OUTPUTS)


# ---- 5: a full disk during training: one line, exit 1, and an exact resume ---------------------------------------

class DiskFiller:
    """Makes the k-th write-durability call (fsync) or log append of a run fail with ENOSPC, as a full disk does."""

    def __init__(self, monkeypatch, fail_at: int):
        self.calls, self.fail_at = 0, fail_at
        for module, name in ((outdir, "fsync_path"), (run_folder, "fsync_tree"),
                             (run_folder, "open_append")):
            monkeypatch.setattr(module, name, self.wrap(getattr(module, name)))

    def wrap(self, real):
        def call(*a, **k):
            self.calls += 1
            if self.calls == self.fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)
        return call


@pytest.mark.slow
def test_5_a_full_disk_during_training_is_one_line_and_resumes_exactly(tiny_dir, rows_file, tmp_path, monkeypatch,
                                                                       capsys):
    flags = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3"]
    reference = tmp_path / "reference"
    counter = DiskFiller(monkeypatch, fail_at=10 ** 9)
    assert train.main(base_args(tiny_dir, rows_file, reference, *flags)) == 0
    n_calls = counter.calls
    monkeypatch.undo()
    rng = random.Random(5)
    for trial, fail_at in enumerate(sorted(rng.sample(range(2, n_calls), 4))):
        out = tmp_path / f"full-{trial}"
        DiskFiller(monkeypatch, fail_at)
        code, err = run_error(base_args(tiny_dir, rows_file, out, *flags), capsys)
        monkeypatch.undo()
        line = one_line(err)
        assert code == 1 and "no space left on the device to write" in line and " free there" in line, line
        assert "--resume auto" in line or "start again" in line
        extra = ["--resume", "auto"] if list_checkpoints(out / "checkpoints") or (out / "config.json").exists() else []
        assert train.main(base_args(tiny_dir, rows_file, out, *flags, *extra)) == 0, fail_at
        assert losses(out) == losses(reference), fail_at
        a, b = adapter_tensors(out / "adapter"), adapter_tensors(reference / "adapter")
        assert all(torch.equal(a[k], b[k]) for k in b), fail_at


def test_write_atomic_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")

    def fills_the_disk(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 2_000_000)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFull, match=rf"to write {path} \(it needs 2.0 MB, [0-9.]+ MB free there\)"):
        outdir.write_atomic(path, fills_the_disk)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


# ---- 6: a full disk during export -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_6_a_full_disk_during_export_names_the_file_and_keeps_the_old_export(tiny_dir, run_dir, tmp_path,
                                                                             monkeypatch, fmt):
    out = tmp_path / ("merged" if fmt == "hf" else "model.gguf")
    args = ["--model", str(tiny_dir), "--adapter", str(run_dir / "adapter"), "--format", fmt, "--out", str(out)]
    assert export.main(args) == 0
    before = snapshot(out) if fmt == "hf" else out.read_bytes()
    if fmt == "hf":
        import safetensors.torch

        def full(*a, **k):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                               "\"No space left on device\" })")
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        import model.gguf

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(model.gguf, "write_gguf", full)
    with pytest.raises(DiskFull, match=rf"to write {out} \(it needs [0-9.]+ [kM]B"):
        export.main(args + ["--overwrite"])
    assert (snapshot(out) if fmt == "hf" else out.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]   # no temporary sibling left


# ---- 7: damaged run files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("junk", ["[1,", '"x"', "{}"])
def test_7_a_damaged_run_config_is_one_line(tiny_dir, rows_file, run_dir, tmp_path, capsys, junk):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "config.json").write_text(junk)
    code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "2", "--save-every", "1",
                                    "--resume", "auto"), capsys)
    assert code == 2 and f"{out / 'config.json'} is" in one_line(err)
    step = list_checkpoints(out / "checkpoints")[-1]
    (step / "config.json").write_text(junk)
    code, err = run_error(base_args(tiny_dir, rows_file, tmp_path / "other", "--max-steps", "2",
                                    "--resume", str(step)), capsys)
    assert code == 2 and f"{step / 'config.json'} is" in one_line(err)
    # a damaged config.json of a run folder train.py marked: --overwrite starts again; an object that is not a run's
    # configuration may be someone else's file: kept
    if junk == "{}":
        code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--overwrite"), capsys)
        assert code == 2 and (out / "config.json").read_text() == "{}"
    else:
        assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--overwrite")) == 0


# ---- 8: an adapter folder that is a link --------------------------------------------------------------------------

@pytest.mark.slow
def test_8_a_linked_adapter_folder_is_replaced_as_a_link(tiny_dir, rows_file, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1")) == 0
    shutil.rmtree(out / "adapter")
    (out / "adapter").symlink_to(elsewhere, target_is_directory=True)
    (out / ".old-adapter").symlink_to(elsewhere, target_is_directory=True)
    for _ in range(2):   # and a later run on the folder too
        assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--overwrite")) == 0
        assert (out / "adapter").is_dir() and not (out / "adapter").is_symlink()
        assert not (out / ".old-adapter").exists() and not (out / ".old-adapter").is_symlink()
    assert (elsewhere / "keep.txt").read_text() == "mine"


# ---- 10: papercuts ---------------------------------------------------------------------------------------------------

def test_10_overwrite_into_an_adapter_folder_is_refused(tiny_dir, run_dir, rows_file, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    before = snapshot(adapter)
    code, err = run_error(base_args(tiny_dir, rows_file, adapter, "--max-steps", "1", "--overwrite"), capsys)
    assert code == 2 and "adapter_config.json" in one_line(err) and "train.py did not write it" in err
    assert snapshot(adapter) == before


def test_10_a_killed_export_leaves_no_hidden_copy_behind(tiny_dir, run_dir, tmp_path):
    out = tmp_path / "merged"
    args = ["--model", str(tiny_dir), "--adapter", str(run_dir / "adapter"), "--format", "hf", "--out", str(out)]
    assert export.main(args) == 0
    # what a SIGKILL between "move the old export aside" and "remove it" leaves: a hidden full copy, a temporary
    shutil.copytree(out, tmp_path / ".merged.abc123.old")
    (tmp_path / ".merged.def456.tmp").mkdir()
    (tmp_path / ".merged.foreign.old").mkdir()
    (tmp_path / ".merged.foreign.old" / "mine.txt").write_text("not an export")
    assert export.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.foreign.old", "merged"]


def test_10_a_nan_prediction_is_written_as_json(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"task": "PM", "setting": "IND_Diverse_Instruction", "index": 0, "prediction": NaN}\n')
    out = tmp_path / "eval"
    assert evaluate.main(["--predictions", str(preds), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "PM",
                          "--settings", IND, "--out", str(out)]) == 0
    for name in ("predictions.jsonl", "metrics.json"):
        text = (out / name).read_text()
        assert "NaN" not in text
        json.loads(text) if name == "metrics.json" else [json.loads(line) for line in text.splitlines()]
    assert json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["output"] is None


def test_10_resuming_past_max_steps_says_so(tiny_dir, rows_file, run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    capsys.readouterr()
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--save-every", "1",
                                "--resume", "auto")) == 0
    said = capsys.readouterr().out
    assert "already at step 2, past the 1 steps these flags ask for" in said


def test_a_linked_log_is_never_appended_through(tiny_dir, rows_file, tmp_path, capsys):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1")) == 0
    (out / "train_log.jsonl").unlink()
    (out / "train_log.jsonl").symlink_to(victim)
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "2", "--resume", "auto")) == 0
    assert victim.read_text() == "precious\n" and not (out / "train_log.jsonl").is_symlink()


# ---- no remote code: bitsandbytes' hub kernel lookup --------------------------------------------------------------

@pytest.mark.slow
def test_bitsandbytes_is_imported_without_the_hub_kernel_lookup():
    """With `kernels` installed (a dependency of transformers, in the dev environment), bitsandbytes' CPU backend
    would call kernels.get_kernel("kernels-community/...") at import: code from the hub. It must never be called,
    and the warning bitsandbytes logs about it must not reach the user."""
    code = ("import sys, types\n"
            "calls = []\n"
            "fake = types.ModuleType('kernels')\n"
            "fake.get_kernel = lambda *a, **k: calls.append(a)\n"
            "sys.modules['kernels'] = fake\n"
            "from lora.nf4 import import_bitsandbytes, quantize_nf4\n"
            "import torch\n"
            "q = quantize_nf4(torch.nn.Linear(64, 8), compute_dtype=torch.float32)\n"
            "q(torch.randn(2, 64))\n"
            "assert sys.modules['kernels'] is fake, 'kernels restored'\n"
            "print('calls', len(calls))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "calls 0"
    assert "gemm_4bit_forward" not in proc.stderr and "kernels" not in proc.stderr


def test_resume_path_checks_the_data_too(tiny_dir, tmp_path, capsys):
    """--resume PATH used to skip the data fingerprint check that --resume auto makes: the same file name over
    other rows is another run."""
    rows = write_rows(tmp_path / "rows.jsonl")
    assert train.main(base_args(tiny_dir, rows, tmp_path / "a", "--max-steps", "2", "--save-every", "1")) == 0
    write_rows(rows, seed=9)
    step = list_checkpoints(tmp_path / "a" / "checkpoints")[0]
    code, err = run_error(base_args(tiny_dir, rows, tmp_path / "b", "--max-steps", "2", "--save-every", "1",
                                    "--resume", str(step)), capsys)
    assert code == 2 and "data (the tokenized training rows differ)" in one_line(err)
