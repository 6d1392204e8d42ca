"""model/hub.py's fetch, the one way hub files come in: a model, the BERT encoder, a tokenizer and the
dataset file each fail in one sentence (gated, not found, not cached offline, no connection), with the
exception type their callers catch.

Offline: huggingface_hub's download functions are replaced by ones that raise what the hub raises.
"""

from __future__ import annotations

import argparse

import pytest

import evaluate
import model.hub
from data import DataError, load_rows
from data.ecinstruct import SAMPLE
from model import load_model, load_tokenizer
from model.bert import checkpoint_dir
from model.hub import HubError

huggingface_hub = pytest.importorskip("huggingface_hub")
errors = pytest.importorskip("huggingface_hub.errors")

# caller: (call, hub id it asks for, the exception type its callers catch, its advice when offline)
CALLERS = {
    "model": (lambda: load_model("meta-llama/Llama-3.2-1B"), "meta-llama/Llama-3.2-1B", RuntimeError,
              "pass a local folder or .gguf file"),
    "bert": (lambda: checkpoint_dir("FacebookAI/roberta-large"), "FacebookAI/roberta-large", OSError,
             "pass a local directory holding config.json, model.safetensors and tokenizer.json"),
    "tokenizer": (lambda: load_tokenizer("meta-llama/Llama-3.2-1B"), "meta-llama/Llama-3.2-1B", OSError,
                  "pass a local folder or .gguf file"),
    "dataset": (lambda: load_rows("NingLab/ECInstruct"), "NingLab/ECInstruct", DataError, SAMPLE),
}
FAILURES = {   # what huggingface_hub raises -> the sentence it becomes
    "GatedRepoError": r"is gated: accept its licence on https://huggingface.co/\S+, then log in with "
                      r"`(hf auth|huggingface-cli) login`",
    "RepositoryNotFoundError": r"was not found on the hub \(check the spelling",
    "LocalEntryNotFoundError": r"is not in the local cache and HF_HUB_OFFLINE is set: download it on a connected "
                               r"machine \(`(hf|huggingface-cli) download ",
    "ConnectionError": r"could not download \S+ from the hub \(ConnectionError: boom\)",
}


def failing_hub(monkeypatch, error: str) -> list[dict]:
    """Make both hub download functions raise `error` (offline for LocalEntryNotFoundError, else online);
    returns the list their keyword arguments are recorded in."""
    cls = getattr(errors, error, None) or ConnectionError
    asked = []

    def fail(*args, **kwargs):
        asked.append(kwargs)
        exc = cls.__new__(cls)   # skip the HTTP response the hub's errors want
        Exception.__init__(exc, "boom\nsecond line of the library's message")
        raise exc

    if error == "LocalEntryNotFoundError":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(model.hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    return asked


@pytest.mark.parametrize("error", FAILURES)
@pytest.mark.parametrize("caller", CALLERS)
def test_every_hub_failure_is_one_sentence_of_the_callers_type(monkeypatch, caller, error):
    call, repo_id, error_type, advice = CALLERS[caller]
    asked = failing_hub(monkeypatch, error)
    with pytest.raises(error_type, match=FAILURES[error]) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and repo_id in message
    if error in ("LocalEntryNotFoundError", "ConnectionError"):
        assert advice in message
    assert [kwargs["local_files_only"] for kwargs in asked] == [error == "LocalEntryNotFoundError"]


def test_the_dataset_gated_page_is_the_dataset_page(monkeypatch):
    failing_hub(monkeypatch, "GatedRepoError")
    with pytest.raises(DataError, match="https://huggingface.co/datasets/NingLab/ECInstruct, then log in"):
        load_rows("NingLab/ECInstruct")


def test_each_caller_asks_for_its_own_files(monkeypatch):
    asked = failing_hub(monkeypatch, "RepositoryNotFoundError")
    for call, *_ in CALLERS.values():
        with pytest.raises(Exception):
            call()
    model_files, bert_files, tokenizer_files, dataset = asked
    assert "model.safetensors" in model_files["allow_patterns"] and "tokenizer.json" in model_files["allow_patterns"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(bert_files["allow_patterns"])
    assert "tokenizer.json" in tokenizer_files["allow_patterns"]
    assert not [p for p in tokenizer_files["allow_patterns"] if "safetensors" in p]   # no weights for a tokenizer
    assert dataset["repo_type"] == "dataset"


def test_hub_error_is_both_types_its_callers_catch():
    e = HubError("x is gated: ...", "x is gated")
    assert isinstance(e, OSError) and isinstance(e, RuntimeError) and str(e) == "x is gated: ..."


def test_the_bertscore_encoder_offline_points_at_the_minilm_flag(monkeypatch):
    """evaluate.py's F_BERT encoder not cached and the hub offline: one line naming --bertscore-model minilm."""
    failing_hub(monkeypatch, "LocalEntryNotFoundError")
    args = argparse.Namespace(bertscore_model="roberta-large", bertscore_layer=None)
    with pytest.raises(ValueError, match=r"F_BERT, but roberta-large is not in the local cache and HF_HUB_OFFLINE "
                                         r"is set; pass --bertscore-model minilm") as e:
        evaluate.make_bertscorer(args)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_tokenizer_from_a_folder_or_gguf_file_needs_no_hub(monkeypatch, tiny_dir, smollm2_gguf):
    failing_hub(monkeypatch, "ConnectionError")
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.encode("hello world") == load_model(tiny_dir)[1].encode("hello world")
    assert load_tokenizer(smollm2_gguf).decode(load_tokenizer(smollm2_gguf).encode("Hello, shop!")) == "Hello, shop!"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tiny_dir / "absent.gguf")
    with pytest.raises(ValueError, match="not a local folder"):
        load_tokenizer("no-such-alias")
