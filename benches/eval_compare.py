"""Eval throughput, taper vs PyTorch, on the bench-size Llama (helper of eval_compare.sh).

    python3 eval_compare.py make DIR --rows N --seq S --batch B
        writes DIR/model (config.json + model.safetensors, random weights, seed 0),
        DIR/tokens/valid/part-00000.parquet and DIR/pipeline.yaml (needs numpy, pyarrow)
    python3 eval_compare.py torch DIR --batch B --threads T
        scores the same rows with PyTorch (transformers' LlamaForCausalLM when installed,
        else the same math written in torch), prints JSON {loss, tokens, seconds}
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

H, I, LAYERS, HEADS, VOCAB = 512, 1408, 8, 8, 8192
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
    "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "max_position_embeddings": 4096, "torch_dtype": "float32",
}


def tensors():
    rng = np.random.default_rng(0)
    out = {}
    def randn(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    out["model.embed_tokens.weight"] = randn(VOCAB, H)
    out["lm_head.weight"] = randn(VOCAB, H)
    out["model.norm.weight"] = np.ones(H, np.float32)
    for l in range(LAYERS):
        p = f"model.layers.{l}"
        for name, shape in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (H, H)),
                            ("self_attn.v_proj", (H, H)), ("self_attn.o_proj", (H, H)),
                            ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)),
                            ("mlp.down_proj", (H, I))]:
            out[f"{p}.{name}.weight"] = randn(*shape)
        for norm in ["input_layernorm", "post_attention_layernorm"]:
            out[f"{p}.{norm}.weight"] = np.ones(H, np.float32)
    return out


def save_safetensors(path, ts):
    header, offset, blobs = {}, 0, []
    for name in sorted(ts):
        b = np.ascontiguousarray(ts[name]).tobytes()
        header[name] = {"dtype": "F32", "shape": list(ts[name].shape),
                        "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    base = 8 + n
    return {k: np.frombuffer(data[base + v["data_offsets"][0]:base + v["data_offsets"][1]],
                             dtype=np.float32).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


def make(a):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(f"{a.dir}/model", exist_ok=True)
    os.makedirs(f"{a.dir}/tokens/valid", exist_ok=True)
    with open(f"{a.dir}/model/config.json", "w") as f:
        json.dump(CONFIG, f)
    save_safetensors(f"{a.dir}/model/model.safetensors", tensors())
    rng = np.random.default_rng(1)
    ids = [rng.integers(3, VOCAB, a.seq).astype(np.uint32).tolist() for _ in range(a.rows)]
    table = pa.table({
        "input_ids": pa.array(ids, pa.list_(pa.field("item", pa.uint32(), False))),
        "loss_mask": pa.array([[True] * a.seq] * a.rows,
                              pa.list_(pa.field("item", pa.bool_(), False))),
    })
    pq.write_table(table, f"{a.dir}/tokens/valid/part-00000.parquet")
    with open(f"{a.dir}/pipeline.yaml", "w") as f:
        f.write(f"""version: 1
name: eval-bench
stages:
  eval:
    kind: eval
    inputs: [model, tokens/valid]
    outputs: [reports/eval.json]
    with: {{base_model: model, data: tokens/valid, batch_size: {a.batch}, device: cpu}}
""")


def torch_model(dir):
    import torch
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        m = LlamaForCausalLM.from_pretrained(f"{dir}/model", torch_dtype=torch.float32)
        m.eval()
        return "transformers", lambda ids: m(input_ids=ids).logits
    except ImportError:
        pass
    w = {k: torch.from_numpy(v.copy()) for k, v in
         load_safetensors(f"{dir}/model/model.safetensors").items()}
    hd = H // HEADS
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    def rms(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rot(x):
        return torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)

    def fwd(ids):
        b, s = ids.shape
        ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        x = w["model.embed_tokens.weight"][ids]
        for l in range(LAYERS):
            p = f"model.layers.{l}."
            h = rms(x, w[p + "input_layernorm.weight"])
            q, k, v = (torch.nn.functional.linear(h, w[p + f"self_attn.{n}_proj.weight"])
                       .view(b, s, HEADS, hd).transpose(1, 2) for n in "qkv")
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + torch.nn.functional.linear(a.transpose(1, 2).reshape(b, s, H),
                                               w[p + "self_attn.o_proj.weight"])
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            g = torch.nn.functional.silu(torch.nn.functional.linear(h, w[p + "mlp.gate_proj.weight"]))
            u = torch.nn.functional.linear(h, w[p + "mlp.up_proj.weight"])
            x = x + torch.nn.functional.linear(g * u, w[p + "mlp.down_proj.weight"])
        return torch.nn.functional.linear(rms(x, w["model.norm.weight"]), w["lm_head.weight"])
    return "torch", fwd


def run_torch(a):
    import pyarrow.parquet as pq
    import torch
    torch.set_num_threads(a.threads)
    rows = pq.read_table(f"{a.dir}/tokens/valid/part-00000.parquet").column("input_ids").to_pylist()
    impl, fwd = torch_model(a.dir)
    best = None
    with torch.inference_mode():
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            total, n = 0.0, 0
            for i in range(0, len(rows), a.batch):
                ids = torch.tensor(rows[i:i + a.batch], dtype=torch.long)
                logits = fwd(ids)[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
                total += float(nll)
                n += ids[:, 1:].numel()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
    json.dump({"impl": impl, "loss": total / n, "tokens": n, "seconds": best}, sys.stdout)
    print()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["make", "torch"])
    p.add_argument("dir")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    make(a) if a.cmd == "make" else run_torch(a)


if __name__ == "__main__":
    main()
