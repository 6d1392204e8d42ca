"""Hand-written LoRA and QLoRA (LoRA over NF4 base layers) for the Llama models of `model/`.

    model, tok = load_model("smollm2-360m", dtype=torch.bfloat16, device="cuda")
    apply_lora(model, r=16, alpha=16, dropout=0.1, quantize="nf4")   # paper targets: 7 projections + lm_head
    ... train the parameters with requires_grad (the A and B matrices only) ...
    save_adapter(model, "runs/x/adapter")                              # PEFT format
    export_merged(model, tok, "runs/x/merged")                         # hub layout, bf16
    export_gguf(model, tok, "runs/x/model.gguf", quant="q8_0")         # llama.cpp

Files: `layer.py` (LoRALinear, the math), `nf4.py` (bitsandbytes NF4 quantize/dequantize),
`apply.py` (injection, freezing, merge/unmerge, disabling), `io.py` (PEFT adapter files, merged exports),
`base.py` (load_base: the one way a base model is loaded, with an adapter's base.json filling what is not given).
`model/` never imports `lora/`.
"""

from .apply import (DEFAULT_TARGETS, NO_HEAD_TARGETS, TARGET_PRESETS, apply_lora, linear_layer_names, lora_disabled,
                    lora_layers, merge_lora, unmerge_lora)
from .base import BaseChoice, choose_base, load_base
from .io import (NonFiniteError, base_fingerprint, base_record, check_export_path, dtype_name, export_gguf,
                 export_merged, load_adapter, lora_state_dict, merged_export_state, merged_state_dict, read_adapter_config,
                 read_base_record, save_adapter, write_base_record)
from .layer import LoRALinear, lora_delta
from .nf4 import dequantize_nf4, is_nf4, quantize_nf4

__all__ = ["DEFAULT_TARGETS", "NO_HEAD_TARGETS", "TARGET_PRESETS", "LoRALinear", "apply_lora", "lora_layers",
           "linear_layer_names", "merge_lora", "unmerge_lora", "lora_disabled", "lora_state_dict", "save_adapter",
           "load_adapter", "read_adapter_config", "merged_state_dict", "export_merged", "lora_delta",
           "merged_export_state", "export_gguf", "check_export_path", "NonFiniteError",
           "quantize_nf4", "dequantize_nf4", "is_nf4", "base_record", "base_fingerprint", "read_base_record",
           "write_base_record", "BaseChoice", "choose_base", "load_base", "dtype_name"]
