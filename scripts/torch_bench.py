#!/usr/bin/env python3
"""PyTorch yardstick for `pals bench` on the same card: the same matmul and attention
shapes in fp32 (TF32 off, so both sides do full-precision f32 math).

With `--train minilm|base --device cpu|cuda --batch B --seq S --precision fp32|amp`: a
whole BERT-PALs training step instead (scripts/torch_train_bench.py)."""
import os
import sys
import time

if "--train" in sys.argv:  # the training-step yardstick lives in its own file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_train_bench import train_main

    sys.exit(train_main())

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda"
print("torch", torch.__version__, torch.cuda.get_device_name(0))


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


M = 4096
cases = [
    ("fwd 4096x768x768 (QKV/out)", (M, 768), (768, 768), "nt"),
    ("fwd 4096x3072x768 (FFN up)", (M, 768), (3072, 768), "nt"),
    ("fwd 4096x768x3072 (FFN down)", (M, 3072), (768, 3072), "nt"),
    ("dX 4096x768x3072 (FFN up)", (M, 3072), (3072, 768), "nn"),
    ("dX 4096x3072x768 (FFN down)", (M, 768), (768, 3072), "nn"),
    ("dW 768x3072x4096 (FFN up)", (M, 3072), (M, 768), "tn"),
    ("dW 3072x768x4096 (FFN down)", (M, 768), (M, 3072), "tn"),
]
print(f"{'torch matmul fp32':<30} {'ms':>10} {'GFLOP/s':>9}")
for name, sa, sb, kind in cases:
    a = torch.randn(*sa, device=dev)
    b = torch.randn(*sb, device=dev)
    if kind == "nt":
        fn = lambda: a @ b.t()
        m, k, n = sa[0], sa[1], sb[0]
    elif kind == "nn":
        fn = lambda: a @ b
        m, k, n = sa[0], sa[1], sb[1]
    else:
        fn = lambda: a.t() @ b
        m, k, n = sa[1], sa[0], sb[1]
    t = timed(fn)
    print(f"{name:<30} {t * 1e3:>10.3f} {2 * m * n * k / t / 1e9:>9.1f}")

B, H, S, D = 32, 12, 128, 64
q, k, v = (torch.randn(B, H, S, D, device=dev, requires_grad=True) for _ in range(3))
mask = torch.zeros(B, 1, 1, S, device=dev)
mask[..., S * 9 // 10:] = -10000.0
do = torch.randn(B, H, S, D, device=dev)
fwd_flops = 4 * B * H * S * S * D


def forward():
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1)


out = forward()
t_f = timed(lambda: forward())
t_fb = timed(lambda: forward().backward(do))
print(f"{'torch attention b32 h12 s128 d64':<30} {'ms':>10} {'GFLOP/s':>9}")
print(f"{'forward':<30} {t_f * 1e3:>10.3f} {fwd_flops / t_f / 1e9:>9.1f}")
print(f"{'backward (fwd+bwd - fwd)':<30} {(t_fb - t_f) * 1e3:>10.3f} {2.5 * fwd_flops / (t_fb - t_f) / 1e9:>9.1f}")
