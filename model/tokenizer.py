"""Tokenizer: the checkpoint's byte-level BPE (the `tokenizers` library) plus its special-token policy.

BOS is added in exactly one place, `encode(text, bos=True)`, and only when the checkpoint's policy
says every sequence starts with BOS (`add_bos`). The library's own post-processor (which for
Llama 3 inserts `<|begin_of_text|>`) is never run: `encode` always passes `add_special_tokens=False`.
EOS, pad, BOS and the chat template are read from the checkpoint's files (tokenizer_config.json,
config.json, generation_config.json) or from a GGUF file's `tokenizer.ggml.*` metadata: the GGUF
readers (`open_gguf`, `gguf_field`) and llama.cpp's tokenizer names are here, and gguf.py imports them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .config import read_json_object

# llama.cpp's pre-tokenizer names -> how the text is split before byte-level BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {
    # SmolLM / SmolLM2 (as in their tokenizer.json): each digit alone, then GPT-2's byte-level split.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
GGUF_PRE_TOKENIZERS["llama3"] = GGUF_PRE_TOKENIZERS["llama-v3"] = GGUF_PRE_TOKENIZERS["llama-bpe"]
GGUF_PRE_TOKENIZERS["gpt-2"] = GGUF_PRE_TOKENIZERS["gpt2"]  # llama.cpp's spelling of GPT-2's split
# llama.cpp token types; control and user-defined ones are special tokens
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED = 1, 3, 4, 5


def open_gguf(path):
    """A gguf.GGUFReader over `path`; a file that is not GGUF, or is cut short, is a ValueError naming it."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file ({size} bytes that do not start with the bytes 'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:   # the reader fails with IndexError, ValueError ("cannot reshape"), struct errors ...
        raise ValueError(f"{path}: truncated or damaged GGUF file ({size} bytes; reading it stopped at "
                         f"{type(e).__name__}: {e}); download it again") from None


def gguf_field(reader, path, key: str, kind=None, default=...):
    """The value of metadata `key`; missing (with no default) or of the wrong kind is a ValueError naming it."""
    if key not in reader.fields:
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata {key} is missing")
        return default
    try:
        value = reader.fields[key].contents()
        return value if kind is None else kind(value)
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: GGUF metadata {key} is not {getattr(kind, '__name__', 'readable')} ({e})") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _read_json_object(path: Path) -> dict:
    """A JSON object file of a model folder ({} when it is absent); a broken one is named."""
    return read_json_object(path) if path.is_file() else {}


class Tokenizer:
    def __init__(self, tok: HFTokenizer, *, bos_id: int | None, eos_id: int, pad_id: int | None = None,
                 add_bos: bool = False, stop_ids=(), chat_template: str | None = None, source: str = "the tokenizer"):
        self.tok = tok
        self.source = source                                   # where the chat template came from (for errors)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id   # padding is masked by position, so any id works
        self.add_bos = add_bos and bos_id is not None
        self.stop_ids = {eos_id, *stop_ids}                   # generation stops at any of these
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 over the vocabulary, merges, specials and BOS policy: a cache key."""
        h = hashlib.sha256(self.tok.to_str().encode())
        h.update(json.dumps([self.bos_id, self.eos_id, self.pad_id, self.add_bos]).encode())
        return h.hexdigest()

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Token ids of `text`; with bos=True, BOS first when the checkpoint's policy adds one."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos else ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render `messages` with the checkpoint's Jinja chat template (jinja2 sandbox, as transformers does)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template; use the alpaca template instead")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        specials = {name: (self.tok.id_to_token(i) if i is not None else "")
                    for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id))}
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials)
        except TemplateError as e:   # a syntax error, or something the sandbox refuses to run
            raise ValueError(f"{self.source}: chat_template cannot be rendered ({type(e).__name__}: {e}); "
                             "use --template alpaca") from None
        except RecursionError:
            raise ValueError(f"{self.source}: chat_template cannot be rendered (it recurses without end); "
                             "use --template alpaca") from None
        if not isinstance(text, str):
            raise ValueError(f"{self.source}: chat_template did not render to text")
        return text

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """A hub-layout folder: tokenizer.json, and tokenizer_config.json / config.json / generation_config.json if present."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (only the fast-tokenizer file format is read)")
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:   # the library raises a bare Exception for a file it cannot read
            raise ValueError(f"{path / 'tokenizer.json'}: not a tokenizer file the tokenizers library can read "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        tok_cfg, model_cfg, gen_cfg = (_read_json_object(path / name) for name in
                                       ("tokenizer_config.json", "config.json", "generation_config.json"))

        def special(name: str, fallback_key: str):
            text = _token_text(tok_cfg.get(name))
            token_id = tok.token_to_id(text) if text else None
            return token_id if token_id is not None else model_cfg.get(fallback_key)

        bos_id, pad_id = special("bos_token", "bos_token_id"), special("pad_token", "pad_token_id")
        eos_id = special("eos_token", "eos_token_id")
        stops = []
        for cfg in (model_cfg, gen_cfg):
            value = cfg.get("eos_token_id")
            stops += value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is None:
            raise ValueError(f"{path}: no EOS token in tokenizer_config.json or config.json")
        if "add_bos_token" in tok_cfg:
            add_bos = bool(tok_cfg["add_bos_token"])
        else:  # the library's post-processor tells us whether the checkpoint starts sequences with BOS
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template must be a string, got "
                             f"{type(template).__name__}")
        for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), *(("eos", v) for v in stops)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{path}: the {name} token id {value!r} (from tokenizer_config.json, config.json or "
                                 "generation_config.json) is not a token id")
        return cls(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                   stop_ids=stops, chat_template=template, source=str(path / "tokenizer_config.json"))

    @classmethod
    def from_gguf(cls, reader, source=None) -> "Tokenizer":
        """Rebuild the byte-level BPE of a GGUF file (a path or a `gguf.GGUFReader`) from its metadata."""
        import gguf

        if not isinstance(reader, gguf.GGUFReader):
            source = reader if source is None else source
            reader = open_gguf(reader)
        source = source or "GGUF file"
        field = lambda key, default=...: gguf_field(reader, source, key, None, default)
        kind = field("tokenizer.ggml.model", None)
        if kind != "gpt2":
            raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE, 'gpt2', is)")
        tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or \
                not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
            raise ValueError(f"{source}: GGUF metadata tokenizer.ggml.tokens / tokenizer.ggml.merges are not lists "
                             "of strings ('a b' merges)")
        types = field("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                     ignore_merges=False))
        pre = field("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                             f"({', '.join(GGUF_PRE_TOKENIZERS)})")
        tok.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)])
        bos_id, eos_id = field("tokenizer.ggml.bos_token_id", None), field("tokenizer.ggml.eos_token_id")
        # end-of-turn and end-of-message tokens (Llama 3's <|eot_id|>, <|eom_id|>) stop generation too
        stops = [field(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in reader.fields]
        template = field("tokenizer.chat_template", None)
        return cls(tok, bos_id=bos_id, eos_id=eos_id, pad_id=field("tokenizer.ggml.padding_token_id", None),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)), stop_ids=stops,
                   chat_template=template if isinstance(template, str) else None,
                   source=f"{source} (tokenizer.chat_template)")

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json in hub layout (readable by transformers too)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        name = lambda i: self.tok.id_to_token(i) if i is not None else None
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(self.bos_id),
               "eos_token": name(self.eos_id), "pad_token": name(self.pad_id), "add_bos_token": self.add_bos,
               "clean_up_tokenization_spaces": False}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
