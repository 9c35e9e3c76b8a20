"""Helper of merge_compare.sh.

  gen DIR       write DIR/base (a ~1 GB f32 Llama: config.json + model.safetensors) and
                DIR/adapter (a PEFT LoRA, r 16, on all seven linears of every block),
                with numpy only (safetensors written by hand, seed 0)
  peft DIR OUT  PEFT merge_and_unload + save_pretrained of DIR/adapter into DIR/base
"""
import json
import os
import struct
import sys

import numpy as np

HIDDEN, INTER, LAYERS, HEADS, KV, VOCAB, R = 1024, 2816, 18, 16, 4, 32000, 16
HEAD_DIM = HIDDEN // HEADS
LINEARS = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def write_safetensors(path, shapes, make, meta):
    """Writes tensors in name order, generating each one only when it is written."""
    names = sorted(shapes)
    header, offset = {"__metadata__": meta}, 0
    for n in names:
        size = int(np.prod(shapes[n])) * 4
        header[n] = {"dtype": "F32", "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text.encode())
        for n in names:
            f.write(make(n, shapes[n]).astype("<f4").tobytes())


def gen(root):
    rng = np.random.default_rng(0)
    base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
    os.makedirs(base, exist_ok=True)
    os.makedirs(adapter, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
              "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        for k, s in LINEARS.items():
            shapes[p + k + ".weight"] = s
    normal = lambda n, s: (rng.standard_normal(s, dtype=np.float32) * 0.02)
    write_safetensors(os.path.join(base, "model.safetensors"), shapes, normal, {"format": "pt"})
    lora = {}
    for i in range(LAYERS):
        for k, (out, inp) in LINEARS.items():
            key = f"base_model.model.model.layers.{i}.{k}"
            lora[key + ".lora_A.weight"] = (R, inp)
            lora[key + ".lora_B.weight"] = (out, R)
    write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), lora, normal, {"format": "pt"})
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": R, "lora_alpha": 32, "lora_dropout": 0.0, "bias": "none",
                   "target_modules": [k.split(".")[1] for k in LINEARS], "task_type": "CAUSAL_LM",
                   "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                   "base_model_name_or_path": None, "inference_mode": True}, f, indent=2, sort_keys=True)


def peft_merge(root, out):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(root, "base"), torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, os.path.join(root, "adapter")).merge_and_unload()
    model.save_pretrained(out)


if __name__ == "__main__":
    if sys.argv[1] == "gen":
        gen(sys.argv[2])
    else:
        peft_merge(sys.argv[2], sys.argv[3])
