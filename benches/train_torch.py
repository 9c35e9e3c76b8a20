"""PyTorch + PEFT reference for benches/train_compare.sh and benches/train_compare_gpu.sh:
the same random-weight Llama as examples/train_bench.rs, LoRA r 8 (alpha 16) on q_proj and
v_proj, AdamW, gradient clipping at 1.0, eager mode (no torch.compile). Prints training
tokens/s (first step excluded; also the fastest step) and, on CUDA, the peak allocated
GPU memory.

  python3 benches/train_torch.py [steps] [threads] [--size bench|gpu] [--device cpu|cuda]
                                 [--dtype f32|bf16] [--attn eager|sdpa]

--size bench: hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 8192, batch 4 x 256.
--size gpu: hidden 2048, intermediate 5632, 16 layers, 32 heads (4 kv), vocab 32000,
batch 8 x 1024. --attn picks transformers' attention: eager (matmul + softmax, as taper
computes it) or sdpa (PyTorch's fused kernel, transformers' default)."""
import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("steps", type=int, nargs="?", default=10)
ap.add_argument("threads", type=int, nargs="?", default=2)
ap.add_argument("--size", choices=["bench", "gpu"], default="bench")
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
ap.add_argument("--batch", type=int, help="override the size's batch")
ap.add_argument("--seq", type=int, help="override the size's sequence length")
a = ap.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.size == "bench":
    shape = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
    batch, seq = 4, 256
else:
    shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
    batch, seq = 8, 1024
batch, seq = a.batch or batch, a.seq or seq
cfg = LlamaConfig(**shape, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  max_position_embeddings=4096, attn_implementation=a.attn)
dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
dev = torch.device(a.device)
with dev:  # initialise on the device (fast for the large size)
    model = LlamaForCausalLM(cfg).to(dtype=dtype)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
ids = torch.randint(0, shape["vocab_size"], (a.steps, batch, seq), device=dev)


def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()


rates = []
for s in range(a.steps):
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids[s], labels=ids[s])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = out.loss.item()  # taper reads its loss every step too
    sync()
    rates.append(batch * seq / (time.perf_counter() - t0))
rest = rates[1:]
line = (f"torch tokens/s {sum(rest) / len(rest):.1f} over {len(rest)} steps "
        f"(batch {batch} x {seq}, {a.device}, {a.dtype}, attn {a.attn}, adapter dtype "
        f"{params[0].dtype})")
fastest = f"; fastest step {max(rest):.1f}"
if a.device == "cuda":
    line += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
print(line + fastest)
