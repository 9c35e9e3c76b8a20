"""PyTorch counterpart of benches/lora.rs: the same shapes, timed the same way (mean of
repeated calls after a warm-up), so taper/PyTorch ratios can be taken on one machine.

    python3 benches/lora_torch.py [threads] [filter]   (default 2; set RAYON_NUM_THREADS to
                                                         the same number for `cargo bench
                                                         --bench lora`; only the cases whose
                                                         name contains `filter`, when given)

Prints one line per case: criterion's group/name, milliseconds per call (mean), and the
mean of the fastest window of calls (about 0.1 s each, as a criterion sample). `benches/lora_compare.py` runs this and the criterion suite in turns.

    python3 benches/lora_torch.py THREADS --turns

sets every case up, runs none, then reads `CASE SECONDS` lines on stdin and answers each
with `CASE MS`, the fastest window's mean per call over SECONDS (PyTorch's side of
`lora_compare.py --turns`; the `lora` bench binary answers the same lines with
TAPER_BENCH_TURNS=1)."""
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
TURNS = sys.argv[2:3] == ["--turns"]
only = sys.argv[2] if len(sys.argv) > 2 and not TURNS else ""
# --turns: name -> (call, whether autograd was on where the case was set up).
CASES = {}
torch.set_num_threads(threads)
torch.manual_seed(0)
B, S = 4, 128


def randn(*shape, grad=False):
    return (torch.randn(*shape) * 0.02).requires_grad_(grad)


def windows(f, seconds, window=0.1):
    """Calls `f` in windows of about `window` seconds for `seconds`: (calls, fastest
    window's mean per call)."""
    n, t0, best = 0, time.perf_counter(), float("inf")
    while time.perf_counter() - t0 < seconds:
        # Calls in windows of about `window` seconds; the fastest window's mean per call
        # is what criterion's fastest sample is for taper (lora_compare.py).
        w0, k = time.perf_counter(), 0
        while k == 0 or time.perf_counter() - w0 < window:
            f()
            k += 1
        best = min(best, (time.perf_counter() - w0) / k)
        n += k
    return n, best


def bench(name, f, seconds=2.0):
    if only not in name:
        return
    if TURNS:
        CASES[name] = (f, torch.is_grad_enabled())
        return
    f()  # warm-up
    t0 = time.perf_counter()
    n, best = windows(f, seconds)
    mean = (time.perf_counter() - t0) / n
    print(f"{name:48} {mean * 1e3:9.3f} ms   (fastest window {best * 1e3:.3f} ms)")


def lora(x, w, a, b, scale=2.0):
    # PEFT's LoRA Linear, dropout 0: base(x) + lora_B(lora_A(x)) * scaling
    return torch.nn.functional.linear(x, w) + torch.nn.functional.linear(
        torch.nn.functional.linear(x, a), b) * scale


with torch.no_grad():
    for d in [512, 2048]:
        x, w, a, b = randn(B, S, d), randn(d, d), randn(16, d), randn(d, 16)
        bench(f"lora_forward/r16/{d}", lambda x=x, w=w, a=a, b=b: lora(x, w, a, b))
    x, w = randn(B, S, 2048), randn(2048, 2048)
    for r in [8, 16, 32, 64]:
        a, b = randn(r, 2048), randn(2048, r)
        bench(f"lora_rank_d2048/{r}", lambda x=x, w=w, a=a, b=b: lora(x, w, a, b))
    x = randn(1024, 1024)
    bench("softmax_1024x1024", lambda x=x: torch.softmax(x, dim=-1))
    x, g = randn(B, S, 2048), randn(2048)
    bench("rms_norm_4x128x2048", lambda x=x, g=g: torch.nn.functional.rms_norm(x, (2048,), g, 1e-5))
    bb = randn(2048)
    bench("layer_norm_4x128x2048",
          lambda x=x, g=g, bb=bb: torch.nn.functional.layer_norm(x, (2048,), g, bb, 1e-5))

# Forward + backward of one LoRA layer: frozen base weight (no gradient), trainable A and
# B, an input that needs a gradient (as in any block below another adapted one).
x = randn(B, S, 2048, grad=True)
w = randn(2048, 2048)
a, b = randn(16, 2048, grad=True), randn(2048, 16, grad=True)


def fwd_bwd():
    lora(x, w, a, b).sum().backward()
    x.grad = a.grad = b.grad = None


bench("lora_fwd_bwd_d2048_r16", fwd_bwd)

try:
    names = [f"llama_h512_l8_forward/1x128 ({attn} attention)" for attn in ["eager", "sdpa"]]
    if not any(only in name for name in names):
        raise ImportError
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = (torch.arange(S) * 37 % 8192).unsqueeze(0)
    def forward(attn):
        model.config._attn_implementation = attn
        return model(ids)

    for attn, name in zip(["eager", "sdpa"], names):
        with torch.no_grad():
            bench(name, lambda attn=attn: forward(attn))
except ImportError:
    if any(only in name for name in names):
        print("llama_h512_l8_forward: skipped (transformers not installed)",
              file=sys.stderr if TURNS else sys.stdout)

if TURNS:
    for line in sys.stdin:
        name, _, seconds = line.rstrip("\n").rpartition(" ")
        if name not in CASES:  # the Llama case without transformers
            print(f"{name} -", flush=True)
            continue
        f, grad = CASES[name]
        with torch.set_grad_enabled(grad):
            if not hasattr(f, "warm"):
                f()
                f.warm = True
            _, best = windows(f, float(seconds))
        print(f"{name} {best * 1e3:.6f}", flush=True)
