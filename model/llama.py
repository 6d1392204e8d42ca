"""The Llama network (SmolLM, SmolLM2 and Llama 3.x are all Llamas), written to be read in one sitting.

    logits = lm_head(norm(layers(embed_tokens(ids))))
    layer:   h = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
             y = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))

Module names are the hub checkpoints' (`model.layers.{i}.self_attn.q_proj`, ...), so a hub
state dict loads as it is. Conventions, each matching transformers' `LlamaForCausalLM`:
- RMSNorm is computed in float32 and cast back before the weight multiplies it;
- RoPE is the non-interleaved "rotate-half" layout of hub checkpoints, angles and cos/sin computed
  in float32 (with Llama 3.x `rope_scaling`), applied in the activations' dtype;
- grouped-query attention goes through `scaled_dot_product_attention` with `enable_gqa`;
- a tied head shares one Parameter with the embedding (`lm_head.weight is embed_tokens.weight`).

Padding is handled by position, never by token id: `attention_mask` (batch, time) marks the real
tokens, and `position_ids` count only those. Generation uses `KVCache`, a preallocated cache that
all rows of a batch fill in step (or generate.py's `SlotCache`, through the same `Llama.forward`).
Training runs padding-free (`Packing`): the rows of a micro-batch are laid end to end as one sequence,
so every linear layer multiplies real tokens only, and attention runs row by row, each row causal over
its own tokens (sum of L_b^2 work, not rows * longest^2). The RoPE cos/sin of positions 0..n-1 are
computed once per device and dtype (`Llama.rope_table`); a forward picks its positions' rows.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the normalisation in float32.

    x^2 overflows float32 once |x| passes ~1e19 (a diverging run gets there): mean(x^2) is then inf
    and the row would come out as all zeros. A row whose largest |x| exceeds 2^50 is therefore first
    divided by a power of two s near that maximum, and y = (x/s) / sqrt(mean((x/s)^2) + eps/s^2),
    the same value. Dividing by a power of two is exact and every other row has s = 1, so on normal
    activations the result is transformers' bit for bit.
    """

    OVERFLOW_GUARD = 2.0 ** 50   # rows of up to 2^28 elements of this size still sum their squares finitely

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        peak = x32.detach().abs().amax(-1, keepdim=True)                        # (..., 1)
        scale = torch.where(peak > self.OVERFLOW_GUARD, torch.exp2(torch.floor(torch.log2(peak))), 1.0)
        x32 = x32 / scale
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps / scale.square())
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), float32, with `rope_scaling` applied.

    llama3 scaling (Llama 3.1/3.2): with wavelength w = 2*pi/f, low_wl = orig/low_freq_factor and
    high_wl = orig/high_freq_factor, keep f if w < high_wl, use f/factor if w > low_wl, and in between
    blend (1-s)*f/factor + s*f with s = (orig/w - low_freq_factor)/(high_freq_factor - low_freq_factor).
    linear scaling divides every f by `factor`.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    scaling = config.rope_scaling
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        orig = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= orig / high) & (wavelen <= orig / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for positions (B, T); angles in float32."""
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)                         # (B, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x*cos + cat(-x2, x1)*sin, for x (B, heads, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class Packing:
    """Rows of lengths L_0..L_{B-1} laid end to end as one sequence of N = sum(L_b) tokens, no padding.

    Token j of the packed sequence is position j - start_b of the row b it belongs to (`position`, (N,)),
    so RoPE sees each row from 0. Attention takes each row's span [start_b, start_b + L_b) alone, causal
    over it: the same attention as running the row by itself, and nothing computed for padding. The rest
    of the network (embedding, norms, projections, MLP, head) is per token and sees the N tokens as they are.

    past (generation's prefill): row b continues a sequence whose first past_b tokens are already in a
    cache. Its tokens are then positions past_b.., and the keys and values attention receives are the
    rows' whole sequences end to end (sum of past_b + L_b: the cache's prefix, then the new tokens);
    query i of row b sees keys 0..past_b + i.

    block > 1 (train.py's 64 on a CPU in bf16/fp16): attention sees each row padded to a multiple of it
    (pad_to_block says why); the outputs are the unpadded rows' up to rounding.
    """

    def __init__(self, lengths: list[int], device=None, past: list[int] | None = None, block: int = 1):
        if not lengths or min(lengths) < 1:
            raise ValueError(f"Packing needs at least one row and rows of at least one token, got {lengths}")
        self.past = list(past) if past is not None else [0] * len(lengths)
        self.rows, self.tokens = len(lengths), sum(lengths)
        self.lengths = list(lengths)                                                   # queries: N in all
        self.key_lengths = [p + n for p, n in zip(self.past, lengths)]                 # keys: sum(past + L)
        ends = list(itertools.accumulate(lengths))
        self.spans = [(end - n, end) for end, n in zip(ends, lengths)]                 # each row's queries in N
        self.position = torch.cat([torch.arange(p, p + n, device=device) for p, n in zip(self.past, lengths)])  # (N,)
        self.block = block                                                             # see pad_to_block

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """q (1, n_head, N, hd), k and v (1, n_kv, K, hd) -> (1, n_head, N, hd), each row causal on its own.
        With block > 1 each row's queries and keys are padded at their end to a multiple of it (pad_to_block) and
        the padded queries' outputs cut off: no real output or gradient changes but for rounding."""
        # split, not slices: its backward is one cat, where each slice's would write a whole zero gradient
        out = []
        for qb, kb, vb, past in zip(q.split(self.lengths, 2), k.split(self.key_lengths, 2),
                                    v.split(self.key_lengths, 2), self.past):
            n, s = qb.shape[2], kb.shape[2]
            mask = None                                                        # (n, past + n): i sees 0..past + i
            if past:
                mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(past)
            if n % self.block or s % self.block:
                qb, kb, vb, mask = pad_to_block(qb, kb, vb, mask, self.block)
            y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
            out.append(y[:, :, :n])
        return torch.cat(out, dim=2)


def pad_to_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, block: int):
    """One row's q (1, h, n, hd), k and v (1, h_kv, s, hd) padded with zeros at the end to multiples of `block`, and
    its mask (n, s) or None (causal, s == n) to match. A causal row stays causal: its real queries see none of the
    padded keys after them. A mask is widened with False for the padded keys, and each padded query sees key 0 only
    (a row with no key at all would be NaN).

    Why (train.py pads on a CPU in bf16/fp16, block 64): PyTorch's CPU flash attention in bfloat16/float16 builds
    matrix kernels for each query and key length it meets and keeps them for the life of the process, so rows of
    ever-new lengths made a training run's memory climb step after step (bench/attention_memory.py: 300 rows of
    random lengths 100-400, forward and backward: malloc's memory in use 0.10 -> 1.08 GB as they are, 0.09 -> 0.11 GB
    rounded up to 64, which also ran 1.7-1.9x faster: fewer kernels to build)."""
    n, s = q.shape[2], k.shape[2]
    n_pad, s_pad = -n % block, -s % block
    if mask is None and n_pad != s_pad:
        raise ValueError(f"a causal row has as many keys as queries, got {n} and {s}")
    q, k, v = F.pad(q, (0, 0, 0, n_pad)), F.pad(k, (0, 0, 0, s_pad)), F.pad(v, (0, 0, 0, s_pad))
    if mask is not None:
        mask = F.pad(mask, (0, s_pad, 0, n_pad))                                     # (n + n_pad, s + s_pad)
        mask[n:, 0] = True
    return q, k, v, mask


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: (layers, B, n_kv, max_len, hd) each.

    `length` is how many positions are filled; every row of the batch advances together
    (left-padded prompts keep their padding masked through `attention_mask`). `Llama.forward` advances it.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype, device):
        super().__init__()
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len, self.length = max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) at the current length; return all filled keys and values."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = layer, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, packing: Packing | None = None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)               # (B, T, heads * hd)
        B, T, _ = q.shape                                                      # packing: (1, N)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)                 # (B, n_head, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)                   # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)                   # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                              # (B, n_kv, S, hd)
        if packing is not None:
            y = packing.attention(q, k, v, gqa=self.n_kv != self.n_head)
        else:   # no mask: causal over T > 1 new tokens (the keys are those same tokens); one new token sees every key
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)             # (B, T, n_head * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, packing=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, packing)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The hub's `model.*` submodule: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """LlamaForCausalLM. `forward(input_ids)` returns logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each layer in backward (non-reentrant)
        self.rope_tables: dict = {}          # (device, dtype) -> cos, sin (positions, head_dim): see rope_table
        self.rope_settings = None            # the config's RoPE settings those tables were made for
        self.tie_weights()

    def tie_weights(self):
        """Share the embedding Parameter with the head (call again after loading with assign=True)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_table(self, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions 0..n-1, n >= length, (n, head_dim) each: rope_cos_sin's values bit for bit.

        Computed once per device and dtype, again for a longer length, and afresh once the config's RoPE
        settings (head_dim, rope_theta, rope_scaling) are edited. A plain dict holds them, not buffers:
        state_dict (and so every export) never sees them, and `.to()` leaves them be (a model moved to
        another device or dtype makes its own there).
        """
        settings = (self.config.head_dim, self.config.rope_theta, repr(self.config.rope_scaling))
        if settings != self.rope_settings:
            self.rope_tables, self.rope_settings = {}, settings
        table = self.rope_tables.get((device, dtype))
        if table is None or table[0].shape[0] < length:
            with torch.inference_mode(False), torch.no_grad():   # made while generating, still usable in training
                positions = torch.arange(length, device=device)[None]                 # (1, length)
                cos, sin = rope_cos_sin(rope_inv_freq(self.config, device), positions, dtype)
            table = self.rope_tables[(device, dtype)] = (cos[0], sin[0])          # (length, hd) each
        return table

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, packing: Packing | None = None,
                return_hidden: bool = False, last_only: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab); return_hidden: the final normed hidden states (B, T, hidden)
        instead; last_only: the logits of each row's last token, (B, vocab), the head run on those alone.

        position_ids (B, T): each token's position in its sequence, so below the cache's max_len (below T
        without a cache); defaults to the positions after what a KVCache holds.
        attention_mask: (B, S) True/1 for real tokens over every position seen so far (the cache's and
        these T), needed only when a batch holds padding that later tokens must not see; or a boolean
        (B, 1, T, S), the keys each query sees, used as it is.
        cache: a KVCache (these tokens follow its `length`, which the forward advances by T), or a cache
        whose rows the caller places itself (generate.py's SlotCache, with position_ids and a (B, 1, T, S)
        mask, or with packing). Each layer stores its keys and values with cache.update(layer, k, v), which
        returns those to attend to.
        packing: input_ids (1, N) holds packing.rows rows end to end (no KVCache, attention_mask or
        position_ids), each row's positions counted from its packing.past; the output is (1, N, .), and
        (packing.rows, vocab) with last_only.
        """
        if return_hidden and last_only:
            raise ValueError("return_hidden and last_only exclude each other")
        B, T = input_ids.shape
        past = cache.length if isinstance(cache, KVCache) else 0
        if packing is not None:
            if isinstance(cache, KVCache) or attention_mask is not None or position_ids is not None or B != 1:
                raise ValueError("packing takes input_ids (1, N) alone: no KVCache, attention_mask or position_ids")
            if T != packing.tokens:
                raise ValueError(f"packing holds {packing.tokens} tokens, input_ids {T}")
            position_ids = packing.position.to(input_ids.device)[None]          # (1, N): each row from its past
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        # every position is below its sequence's length: the cache's max_len, else the rows' own lengths
        # (and past + T: a KVCache asked for more than it holds then fails in its update, saying so)
        limit = cache.max_len if cache is not None else max(packing.key_lengths) if packing is not None else T
        cos_table, sin_table = self.rope_table(max(limit, past + T), x.device, x.dtype)
        cos, sin = cos_table[position_ids], sin_table[position_ids]              # (B, T, hd) each
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        if mask is None and (attention_mask is not None or past > 0):
            # (B, 1, T, S) boolean: causal, and only real keys; each query also sees itself so that
            # rows of pure padding stay finite (their outputs are never used).
            S = past + T
            q_pos = torch.arange(past, S, device=x.device)[:, None]
            k_pos = torch.arange(S, device=x.device)[None, :]
            mask = (k_pos <= q_pos)[None, None]
            if attention_mask is not None:
                mask = (mask & attention_mask[:, None, None, :S].bool()) | (k_pos == q_pos)[None, None]
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, packing, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, packing)
        if isinstance(cache, KVCache):
            cache.length += T
        x = self.model.norm(x)
        if return_hidden:
            return x
        if last_only and packing is not None:
            x = x[0, torch.tensor([end - 1 for _, end in packing.spans], device=x.device)]   # (rows, hidden)
        elif last_only:
            x = x[:, -1]                                                         # (B, hidden)
        return self.lm_head(x)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once each (a tied head is not counted twice)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
