"""Tiny random Llama checkpoints written to disk in hub layout, for tests that must run offline.

`write_tiny_model(folder, **overrides)` writes config.json, model.safetensors, tokenizer.json and
tokenizer_config.json; the tokenizer is a byte-level BPE trained on a few sentences, with
`<|endoftext|>` (0), `<|im_start|>` (1) and `<|im_end|>` (2) as in SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import Llama, ModelConfig

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=384, rope_theta=10000.0, max_position_embeddings=4096,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.", "### Instruction:", "### Input:",
    "### Options:", "### Response:", "product title", "product description", "query", "yes", "no",
    "A: B: C: D: E: The product is relevant to the query, and satisfies all the query specifications.",
    "Users who buy product 1 may also buy product 2.", '{"attribute": "color", "value": "red", "source": "product title"}',
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?'\"()[]{}<>-_/\\|@#$%^&*+=~` \n\t",
]
_CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def write_tiny_model(folder: str | Path, seed: int = 0, **overrides) -> Path:
    """A random Llama in hub layout; `overrides` change config.json keys (e.g. rope_scaling, tie_word_embeddings)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = Llama(config)
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(config.vocab_size))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "add_bos_token": True, "chat_template": _CHAT_TEMPLATE}))
    return folder
