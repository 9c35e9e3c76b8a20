"""PyTorch's side of `examples/lora_parts.rs`: the parts of one LoRA layer's training step
at d 2048, r 16, input [4, 128, 2048] (frozen base, trainable A and B, an input that needs
its gradient), fastest of N calls each, in turns.

    python3 benches/lora_parts_torch.py [THREADS] [N]   (default 2 20)
"""
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
calls = int(sys.argv[2]) if len(sys.argv) > 2 else 20
torch.set_num_threads(threads)
torch.manual_seed(0)


def randn(*shape, grad=False):
    return (torch.randn(*shape) * 0.02).requires_grad_(grad)


x = randn(4, 128, 2048, grad=True)
w = randn(2048, 2048)
a, b = randn(16, 2048, grad=True), randn(2048, 16, grad=True)
x2, g = x.detach().reshape(512, 2048), torch.randn(512, 2048)
a2, b2 = a.detach(), b.detach()
t, u = x2 @ a2.t(), g @ b2


def lora(x, w, a, b, scale=2.0):
    # PEFT's LoRA Linear, dropout 0: base(x) + lora_B(lora_A(x)) * scaling
    f = torch.nn.functional.linear
    return f(x, w) + f(f(x, a), b) * scale


def fwd_bwd():
    lora(x, w, a, b).sum().backward()
    x.grad = a.grad = b.grad = None


def forward():
    lora(x, w, a, b)


def forward_no_grad():
    with torch.no_grad():
        lora(x, w, a, b)


def grads_with_u():
    # taper's `adapter_grads` row: u = g B and both gradients.
    uu = g @ b2
    return uu.t() @ x2, g.t() @ t


parts = [
    ("layer forward + backward (autograd)", fwd_bwd),
    ("layer forward (recording)", forward),
    ("layer forward (no_grad)", forward_no_grad),
    ("base product x W^T", lambda: x2 @ w.t()),
    ("base product g W (backward)", lambda: g @ w),
    ("rank product t = x A^T", lambda: x2 @ a2.t()),
    ("rank product u = g B", lambda: g @ b2),
    ("gradients dA = u^T x, dB = g^T t", lambda: (u.t() @ x2, g.t() @ t)),
    ("u = g B, dA = u^T x, dB = g^T t", grads_with_u),
]
best = [float("inf")] * len(parts)
for f in (f for _, f in parts):
    f()  # warm-up
for _ in range(calls):
    for i, (_, f) in enumerate(parts):
        t0 = time.perf_counter()
        f()
        best[i] = min(best[i], time.perf_counter() - t0)
print(f"PyTorch {torch.__version__}; {threads} threads; fastest of {calls}")
for (name, _), t in zip(parts, best):
    print(f"{name:42} {t * 1e3:8.2f} ms")
