"""PyTorch + PEFT reference for benches/train_compare.sh: the same random-weight Llama
(hidden 512, intermediate 1408, 8 layers, 8 heads, vocab 8192), LoRA r 8 on q_proj and
v_proj, AdamW, batch 4 x 256, on 2 threads. Prints training tokens/s (first step excluded)."""
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                        weight_decay=0.0)
batch, seq = 4, 256
ids = torch.randint(0, 8192, (steps, batch, seq))
rates = []
for s in range(steps):
    t0 = time.perf_counter()
    out = model(input_ids=ids[s], labels=ids[s])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    rates.append(batch * seq / (time.perf_counter() - t0))
rest = rates[1:]
print(f"torch tokens/s {sum(rest) / len(rest):.1f} over {len(rest)} steps (batch {batch} x {seq})")
