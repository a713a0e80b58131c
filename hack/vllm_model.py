#!/usr/bin/env python3
"""Write a tiny Llama that vLLM's CPU build loads, with the project's tokenizer (served as `tiny`).

    vllm_model.py TOKENIZER_DIR OUT_DIR      (run by hack/vllm.sh with the vLLM venv's python)

The built-in tiny model (dataplane/model/assets/tiny) has head_dim 16, which vLLM's CPU attention
does not support (it wants a head size in {32, 64, 80, 96, 112, 128, ...}). This one has 2 layers,
hidden 128, 4 attention heads and 2 KV heads (head_dim 32), the same vocabulary, bos/eos/pad ids and
chat template, float32 weights drawn from a fixed seed (so every machine writes the same model), and
a context of 2048 tokens.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 20261207
CONTEXT = 2048


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    base = json.loads((src / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=CONTEXT,
        rms_norm_eps=base.get("rms_norm_eps", 1e-6),
        rope_theta=base.get("rope_theta", 10000.0),
        tie_word_embeddings=True,
        bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"],
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: Llama, 2 layers, hidden 128, 4/2 heads (head_dim 32), {params} parameters")


if __name__ == "__main__":
    main()
