"""QLoRA: LoRA over bitsandbytes NF4 layers (runs on the CPU with bitsandbytes >= 0.49; CUDA where present)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")

from lora import (LoRALinear, apply_lora, dequantize_nf4, is_nf4, lora_layers, merge_lora,  # noqa: E402
                  quantize_nf4, unmerge_lora)
from model import load_model  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def nf4_layer(fan_in=128, fan_out=96, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(fan_in, fan_out, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(fan_out, fan_in, generator=g) * 0.02)
    dense = dense.to(device=device, dtype=dtype)
    return dense, quantize_nf4(dense)


def with_random_b(layer: LoRALinear, seed=1) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g).to(layer.lora_B.weight.device))
    return layer


def test_quantized_layers_use_qlora_settings(tiny_dir):
    model, _ = load_model(tiny_dir)
    apply_lora(model, quantize="nf4")
    for name, layer in lora_layers(model).items():
        if name == "lm_head":
            assert isinstance(layer.base, nn.Linear) and not is_nf4(layer.base)
            assert layer.base.weight is model.model.embed_tokens.weight  # never quantized, still tied
            continue
        q = layer.base
        assert is_nf4(q), name
        state = q.weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64
        assert state.nested and state.state2 is not None  # double quantization
        assert q.compute_dtype == torch.bfloat16 and not q.weight.requires_grad
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert all(not is_nf4(m) for m in model.modules() if isinstance(m, nn.Embedding))
    assert model.lora_config["quantize"] == "nf4"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        l.lora_A.weight.numel() + l.lora_B.weight.numel() for l in lora_layers(model).values())


@pytest.mark.parametrize("device", DEVICES)
def test_lora_over_nf4_equals_lora_over_dequantized_weight(device):
    """Linear4bit computes bf16(x) @ bf16(dequant(W))^T; LoRA over it = LoRA over a dense layer holding dequant(W)."""
    _, q = nf4_layer(device=device)
    lora_q = with_random_b(LoRALinear(q, r=8, alpha=16, dropout=0.0))
    W = dequantize_nf4(q)                                                  # (96, 128), float32
    assert W.shape == (96, 128) and W.dtype == torch.float32
    dense = nn.Linear(128, 96, bias=False, device=device)
    with torch.no_grad():
        dense.weight.copy_(W)
    lora_d = LoRALinear(dense, r=8, alpha=16, dropout=0.0)
    lora_d.load_state_dict({k: v for k, v in lora_q.state_dict().items() if "lora_" in k}, strict=False)

    x = torch.randn(4, 7, 128, device=device, requires_grad=True)         # training path (autograd through 4-bit)
    branch = (x @ lora_q.lora_A.weight.T @ lora_q.lora_B.weight.T) * lora_q.scaling
    # Exactly the NF4 layer's definition: bf16 compute on the dequantized weight, cast back, plus the fp32 branch.
    expected = F.linear(x.to(torch.bfloat16), W.to(torch.bfloat16)).float() + branch
    y = lora_q(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    # Against the fp32 dense layer the only difference is the bf16 compute of the base (8-bit mantissa).
    torch.testing.assert_close(y, lora_d(x), rtol=2 ** -7, atol=2 ** -7 * y.abs().max().item())
    y.sum().backward()
    grad_q = x.grad.clone()
    x.grad = None
    lora_d(x).sum().backward()
    torch.testing.assert_close(grad_q, x.grad, rtol=2 ** -6, atol=2 ** -6 * x.grad.abs().max().item())
    with torch.no_grad():                                                  # inference path (may use other kernels)
        lora_q.eval()
        torch.testing.assert_close(lora_q(x), expected, rtol=2 ** -7, atol=2 ** -7 * y.abs().max().item())


def test_nf4_weight_error_and_model_closeness(tiny_dir):
    """A model quantized to NF4 stays close to its bf16 self on a fixed batch.

    Why these tolerances: NF4 keeps 16 levels per block of 64 weights, scaled by the block's absmax; for
    Gaussian weights its RMS error is about 9% of the weights' RMS (checked per layer below, bound 12%).
    The tiny model sends its residual stream through two NF4 layers per block (attention and MLP
    outputs) over 2 blocks, with the head in bf16; errors of ~9% per quantized layer give a logit error
    of the same order, measured 10%: we allow 15% relative (Frobenius) error and 90% top-1 agreement.
    The NF4 model also equals, up to bf16 rounding, the bf16 model whose weights are the dequantized
    ones (merging zero adapters dequantizes): all of the difference is the weights' quantization error.
    """
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    dense_weights = {n: m.weight.detach().float().clone() for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and n != "lm_head"}
    with torch.no_grad():
        ref = model(ids).float()
        apply_lora(model, quantize="nf4")                # B = 0: the adapters change nothing
        quant = model(ids).float()
        for name, layer in lora_layers(model).items():
            if name != "lm_head":
                W = dense_weights[name]
                err = (dequantize_nf4(layer.base).float() - W).norm() / W.norm()
                assert 0.05 < err < 0.12, (name, err)
        rel = ((quant - ref).norm() / ref.norm()).item()
        top1 = (quant.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert rel < 0.15 and top1 >= 0.9, (rel, top1)
        merge_lora(model)                                # dequantized dense bf16 weights
        assert not any(is_nf4(m) for m in model.modules())
        torch.testing.assert_close(model(ids).float(), quant, rtol=0.02, atol=0.02 * quant.abs().max().item())


def test_nf4_training_changes_only_adapters(tiny_dir):
    model, _ = load_model(tiny_dir)
    apply_lora(model, quantize="nf4", dropout=0.1)
    packed = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
              for n, m in model.named_modules() if is_nf4(m)}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and not is_nf4_param(p)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    for n, m in model.named_modules():
        if is_nf4(m):
            assert torch.equal(m.weight.data, packed[n][0]) and torch.equal(m.weight.quant_state.absmax, packed[n][1])
    for n, p in model.named_parameters():
        if n in dense:
            assert torch.equal(p, dense[n]), n


def is_nf4_param(p) -> bool:
    return isinstance(p, bnb.nn.Params4bit)


def test_nf4_merge_dequantizes_and_unmerge_restores():
    _, q = nf4_layer()
    layer = with_random_b(LoRALinear(q, r=4, alpha=8))
    layer.eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = layer(x)
        expected = dequantize_nf4(q).float() + layer.delta_weight()
        layer.merge()
        assert layer.merged and isinstance(layer.base, nn.Linear) and not is_nf4(layer.base)
        assert torch.equal(layer.base.weight, expected) and not layer.base.weight.requires_grad
        # merged: fp32 compute on dequant(W) + delta; unmerged: bf16 compute of the base
        torch.testing.assert_close(layer(x), y, rtol=2 ** -7, atol=2 ** -7 * y.abs().max().item())
        layer.merge()
        assert torch.equal(layer.base.weight, expected)
        layer.unmerge()
        assert layer.base is q and not layer.merged  # the NF4 layer itself is back, bits untouched
        assert torch.equal(layer(x), y)
    assert all(not k.startswith("_nf4_base") for k in layer.state_dict())  # the parked NF4 layer is no submodule


def test_eval_mode_keeps_the_standard_layout_and_the_training_numerics():
    """bitsandbytes may repack NF4 weights in place for AVX512-BF16 inference; we keep one layout and one result."""
    _, q = nf4_layer(fan_in=128, fan_out=96)
    layer = with_random_b(LoRALinear(q, r=4, alpha=8, dropout=0.0))
    x = torch.randn(3, 128)
    codes = q.weight.data.clone()
    layer.train()
    with torch.no_grad():
        y_train = layer(x)
        layer.eval()
        y_eval = layer(x)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(q.weight.data, codes) and torch.equal(y_eval, y_train)


def test_cpu_nf4_refuses_rows_that_do_not_fill_whole_blocks():
    with pytest.raises(ValueError, match="in_features=96 .* divisible by 64"):
        quantize_nf4(nn.Linear(96, 64))


def test_quantize_keeps_bias_and_dtype():
    dense = nn.Linear(64, 32, bias=True, dtype=torch.bfloat16)
    q = quantize_nf4(dense)
    assert q.bias is not None and torch.equal(q.bias, dense.bias) and not q.bias.requires_grad
    assert dequantize_nf4(q).dtype == torch.bfloat16
    err = (dequantize_nf4(q).float() - dense.weight.float()).norm() / dense.weight.float().norm()
    assert err < 0.12


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_while_loading_equals_quantized_after(tiny_dir, tmp_path, tied):
    """load_model(quantize_linear=quantize_nf4), one tensor at a time, then apply_lora: the same NF4 codes,
    the same LoRA init and the same logits as loading dense and quantizing in apply_lora."""
    from functools import partial

    from tiny import write_tiny_model

    folder = tiny_dir if tied else write_tiny_model(tmp_path / "untied", tie_word_embeddings=False)
    torch.manual_seed(0)
    after, _ = load_model(folder)
    apply_lora(after, quantize="nf4", compute_dtype=torch.float32)
    streamed, _ = load_model(folder, quantize_linear=partial(quantize_nf4, compute_dtype=torch.float32))
    assert all(is_nf4(m) for n, m in streamed.named_modules() if n.endswith("_proj"))
    torch.manual_seed(0)
    apply_lora(streamed, quantize="nf4", compute_dtype=torch.float32)
    a, b = after.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for layer in (*lora_layers(after).values(), *lora_layers(streamed).values()):
        with torch.no_grad():
            layer.lora_B.weight.fill_(0.01)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(after(ids), streamed(ids))
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tied


def test_apply_lora_releases_each_dense_weight(tiny_dir, monkeypatch):
    """While apply_lora quantizes layer k, the dense weights of layers 1..k-1 are already gone: peak memory
    is the NF4 model plus one dense layer, not the dense model plus the NF4 one."""
    import weakref

    import lora.apply

    model, _ = load_model(tiny_dir)
    dense = {n: weakref.ref(m.weight) for n, m in model.named_modules() if n.endswith("_proj")}
    done, alive_at_each_call = [], []

    def watched(linear, compute_dtype):
        alive_at_each_call.append([n for n in done if dense[n]() is not None])
        done.append(next(n for n, ref in dense.items() if ref() is linear.weight))
        return quantize_nf4(linear, compute_dtype)

    monkeypatch.setattr(lora.apply, "quantize_nf4", watched)
    apply_lora(model, quantize="nf4")
    assert len(done) == len(dense) and all(alive == [] for alive in alive_at_each_call)
    assert all(ref() is None for ref in dense.values())
