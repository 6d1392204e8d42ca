"""LoRA math, injection, freezing, merge/unmerge, disabling, and bad input (CPU, tiny models)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora import (DEFAULT_TARGETS, NO_HEAD_TARGETS, TARGET_PRESETS, LoRALinear, apply_lora, lora_delta, lora_disabled,
                  lora_layers, merge_lora, unmerge_lora)
from lora.layer import LoRADropoutBranch, keep_mask
from model import Llama, ModelConfig, count_parameters, generate, load_model

# The paper's Table 1 (eCeLLM recipe: r=16 on the 7 projections + lm_head), and the same without lm_head.
TABLE1 = {"smollm-135m": 5_680_128, "smollm2-135m": 5_680_128,
          "smollm-360m": 9_485_312, "smollm2-360m": 9_485_312,
          "smollm-1.7b": 18_907_136, "smollm2-1.7b": 18_907_136,
          "llama3.2-1b": 13_357_056, "llama3.2-3b": 26_415_104}
NO_HEAD = {"smollm-135m": 4_884_480, "smollm2-135m": 4_884_480,
           "smollm-360m": 8_683_520, "smollm2-360m": 8_683_520,
           "smollm-1.7b": 18_087_936, "smollm2-1.7b": 18_087_936,
           "llama3.2-1b": 11_272_192, "llama3.2-3b": 24_313_856}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize_b(model: nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """B is zero at init; give it values so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


@pytest.fixture
def tiny(tiny_dir):
    model, tok = load_model(tiny_dir)
    return model, tok


def ids_batch(vocab=384, seed=0):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


# ---- 1. trainable parameters = the paper's Table 1 ------------------------------------------------

def test_target_presets():
    assert DEFAULT_TARGETS == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    assert NO_HEAD_TARGETS == DEFAULT_TARGETS[:-1]
    assert TARGET_PRESETS == {"paper": DEFAULT_TARGETS, "no-head": NO_HEAD_TARGETS}


@pytest.mark.parametrize("alias", sorted(TABLE1))
def test_trainable_parameters_match_paper_table1(alias):
    for targets, expected in ((DEFAULT_TARGETS, TABLE1[alias]), ("no-head", NO_HEAD[alias])):
        with torch.device("meta"):
            m = Llama(ModelConfig.from_name(alias))
        apply_lora(m, r=16, alpha=16, dropout=0.1, targets=targets, quantize=None)
        assert trainable(m) == expected
        assert count_parameters(m, trainable_only=True) == expected
        assert m.model.embed_tokens.weight is m.lm_head.weight  # still tied, head frozen


def test_only_lora_matrices_are_trainable(tiny):
    model, _ = tiny
    apply_lora(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in names)
    assert len(lora_layers(model)) == 7 * model.config.num_hidden_layers + 1
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.lora_config == dict(r=16, alpha=16, dropout=0.1, targets=list(DEFAULT_TARGETS), quantize=None)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, nn.Linear)
    assert layer.lora_A.weight.shape == (16, 64) and layer.lora_B.weight.shape == (64, 16)
    assert layer.scaling == 1.0 and not layer.merged and not layer.disabled


# ---- 2. the math ----------------------------------------------------------------------------------

def test_hand_written_example():
    """W (2x3), A (r=2 x 3), B (2 x r), alpha=4 -> scaling 2; merged matrix and output written out by hand."""
    W = torch.tensor([[1., 0., 2.], [0., 1., -1.]])
    A = torch.tensor([[1., 2., 0.], [0., 1., 1.]])
    B = torch.tensor([[1., 0.], [2., -1.]])
    # B @ A = [[1, 2, 0], [2, 3, -1]];  * 2 = [[2, 4, 0], [4, 6, -2]];  W + that:
    merged = torch.tensor([[3., 4., 2.], [4., 7., -3.]])
    base = nn.Linear(3, 2, bias=False)
    layer = LoRALinear(base, r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        base.weight.copy_(W), layer.lora_A.weight.copy_(A), layer.lora_B.weight.copy_(B)
    x = torch.tensor([[1., 1., 1.]])
    # W x = [3, 0];  A x = [3, 2];  B (A x) = [3, 4];  * 2 = [6, 8];  sum = [9, 8]
    assert torch.equal(layer(x), torch.tensor([[9., 8.]]))
    assert torch.equal(layer.merged_weight(), merged)
    assert torch.equal(lora_delta(A, B, alpha=4, r=2), merged - W)
    layer.merge()
    assert torch.equal(base.weight, merged) and torch.equal(layer(x), torch.tensor([[9., 8.]]))
    layer.unmerge()
    assert torch.equal(base.weight, W)


def test_init_kaiming_a_zero_b():
    layer = LoRALinear(nn.Linear(256, 64), r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    A = layer.lora_A.weight
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound and A.std() > 0.5 * bound / math.sqrt(3)
    assert layer.scaling == 2.0
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


def test_output_equals_base_at_init(tiny, tiny_dir):
    model, _ = tiny
    ids = ids_batch()
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, dropout=0.0)
        after = model(ids)
    assert torch.equal(before, after)


def test_training_changes_only_a_and_b(tiny):
    model, _ = tiny
    apply_lora(model, dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    embedding = model.model.embed_tokens.weight
    emb_before = embedding.detach().clone()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    ids = ids_batch()
    for _ in range(3):  # step 1 moves B only (A's gradient is B^T(...) = 0); later steps move A too
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, lora_before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert torch.equal(embedding, emb_before)
    assert model.model.embed_tokens.weight is model.lm_head.base.weight  # still tied


def test_tied_head_stays_tied_and_tie_weights_works(tiny):
    model, _ = tiny
    apply_lora(model)
    head = model.lm_head
    assert isinstance(head, LoRALinear) and head.tied
    assert model.model.embed_tokens.weight is head.base.weight is head.weight
    assert not any(l.tied for n, l in lora_layers(model).items() if n != "lm_head")
    model.tie_weights()  # assigns lm_head.weight: goes to the wrapped base layer
    assert isinstance(model.lm_head, LoRALinear) and model.lm_head.base.weight is model.model.embed_tokens.weight
    assert "weight" not in model.lm_head._parameters
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.tie_weights()


def test_merge_equals_unmerged_fp32(tiny):
    model, _ = tiny
    apply_lora(model)
    randomize_b(model)
    model.eval()
    ids = ids_batch()
    emb = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(ids)
        with lora_disabled(model):
            base_out = model(ids)
        assert (unmerged - base_out).abs().max() > 1e-2  # the adapter matters
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        merge_lora(model)
        merged = model(ids)
        assert all(l.merged for l in lora_layers(model).values())
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-6)
        once = {n: p.detach().clone() for n, p in model.named_parameters()}
        merge_lora(model)  # idempotent
        assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())
        # the tied head got its own merged weight; the embedding was never written
        assert torch.equal(model.model.embed_tokens.weight, emb)
        assert model.lm_head.base.weight is not model.model.embed_tokens.weight
        unmerge_lora(model)
        unmerge_lora(model)  # idempotent
        assert model.lm_head.base.weight is model.model.embed_tokens.weight
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=1e-6)
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_eval_and_train_never_merge(tiny):
    model, _ = tiny
    apply_lora(model)
    model.eval(), model.train(), model.eval()
    assert not any(l.merged for l in lora_layers(model).values())


def test_lora_disabled_gives_base_outputs(tiny, tiny_dir):
    model, _ = tiny
    base, _ = load_model(tiny_dir)
    apply_lora(model)
    randomize_b(model)
    model.eval()
    ids = ids_batch()
    with torch.no_grad():
        with lora_disabled(model):
            assert torch.equal(model(ids), base(ids))
        assert not torch.equal(model(ids), base(ids))  # switched back on
        merge_lora(model)
        with pytest.raises(RuntimeError, match="unmerge"):
            with lora_disabled(model):
                pass


def test_dropout_only_on_lora_input_and_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(8, 32)
    expected = layer.base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scaling
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert torch.equal(layer(x), layer(x))
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b) and not torch.allclose(a, expected)
    # the base path never sees dropout: with the adapter off, training-mode outputs are the base's
    layer.disabled = True
    assert torch.equal(layer(x), layer.base(x))
    layer.disabled = False
    # the dropped branch is B A (mask * x / (1 - p)): reproduce it from the same RNG state
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    mask = keep_mask(x.shape, 0.5, x.device) / 0.5
    torch.testing.assert_close(got, layer.base(x) + (mask * x) @ layer.lora_A.weight.T @ layer.lora_B.weight.T
                               * layer.scaling, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_branch_equals_plain_form_bitwise(dtype):
    """Same mask: LoRADropoutBranch's output and its gradients for x, A and B are bitwise those of the plain
    form lora_B(lora_A(x.to(fp32) * keep / (1 - p))) * scaling under autograd, for a bf16 or fp32 base."""
    torch.manual_seed(0)
    x = torch.randn(3, 50, 64, dtype=dtype, requires_grad=True)
    a, b = torch.randn(8, 64, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    keep, s = keep_mask(x.shape, 0.1, x.device), 1 / 0.9
    ours = LoRADropoutBranch.apply(x, a, b, keep, s, 2.0)
    plain = F.linear(F.linear(x.to(torch.float32) * keep * s, a), b) * 2.0
    g = torch.randn_like(plain)
    assert torch.equal(ours, plain)
    for got, want in zip(torch.autograd.grad(ours, (x, a, b), g), torch.autograd.grad(plain, (x, a, b), g)):
        assert torch.equal(got, want)
    assert x.grad is None and torch.equal(ours, LoRADropoutBranch.apply(x, a, b, keep, s, 2.0))  # x untouched


def test_keep_mask_distribution():
    """Bernoulli(1 - p) per element: the keep rate within 4 standard errors of 1 - p for several p,
    no correlation between neighbours (the four lanes of one random word included), and reproducible
    from torch's seed like nn.Dropout."""
    n = 1 << 20
    for p in (0.05, 0.1, 0.5, 0.9):
        keep = keep_mask((n,), p, "cpu").double()
        se = (p * (1 - p) / n) ** 0.5
        assert abs(keep.mean().item() - (1 - p)) < 4 * se, p
        for lag in (1, 2, 3, 4):  # P(keep_i and keep_i+lag) = (1 - p)^2 when independent
            both = (keep[:-lag] * keep[lag:]).mean().item()
            assert abs(both - (1 - p) ** 2) < 4 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5, (p, lag)
    torch.manual_seed(3)
    first = keep_mask((7, 9), 0.1, "cpu")
    torch.manual_seed(3)
    assert first.dtype == torch.bool and torch.equal(first, keep_mask((7, 9), 0.1, "cpu"))
    assert not torch.equal(keep_mask((64, 64), 0.5, "cpu"), keep_mask((64, 64), 0.5, "cpu"))


def test_dropout_layer_trains_like_plain_dropout():
    """A LoRALinear with dropout, same seed: its output and gradients equal the plain form with the mask
    keep_mask draws (so the fused branch changes what is stored, not what is computed)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 64)
    torch.manual_seed(9)
    layer(x).square().sum().backward()
    got = layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()
    layer.zero_grad()
    torch.manual_seed(9)
    keep = keep_mask(x.shape, 0.1, x.device)
    plain = layer.base(x) + layer.lora_B(layer.lora_A(x * keep * (1 / 0.9))) * layer.scaling
    plain.square().sum().backward()
    torch.testing.assert_close(got, (layer.lora_A.weight.grad, layer.lora_B.weight.grad), rtol=1e-6, atol=1e-6)


def test_dtype_policy_bf16_base():
    """fp32 A/B over a bf16 base: the branch runs in fp32 on x cast up, the sum is in the base's dtype."""
    base = nn.Linear(32, 16, bias=False, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    branch = (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T).to(torch.bfloat16)
    assert torch.equal(y, base(x) + branch)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 8), st.sampled_from([1, 2, 8, 16, 32]),
       st.booleans(), st.integers(0, 2**16))
def test_merge_matches_forward_property(fan_in, fan_out, r, alpha, bias, seed):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(fan_in, fan_out, bias=bias), r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, fan_in)
    y = layer(x)
    w = layer.base.weight.detach().clone()
    torch.testing.assert_close(layer.merged_weight(), w + layer.lora_B.weight @ layer.lora_A.weight * (alpha / r))
    layer.merge()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w, rtol=0, atol=1e-5)


def test_generate_runs_with_wrapped_head(tiny):
    model, tok = tiny
    apply_lora(model)
    out = generate(model, [tok.encode("yes or no")], max_new_tokens=3, stop_ids=[])
    assert len(out[0]) == 3


def test_untied_head_and_no_head_targets(tmp_path):
    from tiny import write_tiny_model

    model, _ = load_model(write_tiny_model(tmp_path / "untied", tie_word_embeddings=False))
    apply_lora(model, targets="no-head")
    assert not isinstance(model.lm_head, LoRALinear) and not model.lm_head.weight.requires_grad
    assert set(n.rsplit(".", 1)[-1] for n in lora_layers(model)) == set(NO_HEAD_TARGETS)
    model2, _ = load_model(write_tiny_model(tmp_path / "untied2", tie_word_embeddings=False))
    apply_lora(model2, targets=["q_proj", "v_proj", "lm_head"])
    assert not model2.lm_head.tied and set(lora_layers(model2)) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head"}


# ---- 6. bad input ---------------------------------------------------------------------------------

def test_unknown_target_lists_linear_layers(tiny):
    model, _ = tiny
    with pytest.raises(ValueError) as e:
        apply_lora(model, targets=["q_proj", "qkv_proj"])
    msg = str(e.value)
    assert "qkv_proj" in msg
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in msg
    with pytest.raises(ValueError, match="q_proj, k_proj"):
        apply_lora(model, targets="embed_tokens")  # an embedding is not a linear layer
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing was changed


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank(tiny, r):
    model, _ = tiny
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        apply_lora(model, r=r)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoRALinear(nn.Linear(4, 4), r=r, alpha=1)


@pytest.mark.parametrize("kwargs, match", [(dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"),
                                           (dict(quantize="int8"), "quantize"), (dict(targets=[]), "targets")])
def test_other_bad_arguments(tiny, kwargs, match):
    model, _ = tiny
    with pytest.raises(ValueError, match=match):
        apply_lora(model, **kwargs)


def test_apply_twice_is_an_error(tiny):
    model, _ = tiny
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


def test_nf4_on_meta_is_a_clear_error():
    with torch.device("meta"):
        m = Llama(ModelConfig.from_name("smollm2-135m"))
    with pytest.raises(ValueError, match="meta device"):
        apply_lora(m, quantize="nf4")
