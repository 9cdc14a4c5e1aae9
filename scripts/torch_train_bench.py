#!/usr/bin/env python3
"""PyTorch yardstick for `pals bench --train`: the same BERT-PALs training step in eager
PyTorch, timed over warm steps. Run through `scripts/torch_bench.py --train ...`.

Same work as pals's step (src/bench, src/model/tasks.rs): a BERT encoder (exact-erf GELU,
LayerNorm eps 1e-12, additive -10000 mask, dropout 0.1 on hidden states and attention
probabilities), PALs in every layer (out = LN2(a + Dropout(FFN(a)) + TS(h)), TS(h) =
GELU(V^D MHA_l(V^E h + b_E) + b_D), V^E and V^D shared by the layers, per layer Q, K, V
with biases, 6 heads, probability dropout, no output projection), the pooler, head dropout,
a 2-class head and cross-entropy; then global gradient clipping at norm 1 and AdamW
(betas 0.9/0.999, eps 1e-6, bias-corrected, weight decay 0.01 except biases and LayerNorm),
linear warmup. Random weights: the timings do not depend on them. A hand-written layer, so
no `transformers` is needed.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

CONFIGS = {
    "base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2),
    "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2),
}
PAL_DIM_BASE, PAL_HEADS = 204, 6
DROPOUT, EPS = 0.1, 1e-12


def model_config(name):
    """A named size or a model directory's config.json (as `pals bench --train` takes)."""
    if name in CONFIGS:
        return dict(CONFIGS[name])
    with open(os.path.join(name, "config.json")) as f:
        config = json.load(f)
    return {key: config[key] for key in CONFIGS["base"]}


def pal_dim(hidden):
    """round(hidden * 204 / 768) to a multiple of the 6 heads, as src/model/tasks.rs scales it."""
    units = hidden * PAL_DIM_BASE / (768 * PAL_HEADS)
    return max(1, round(units)) * PAL_HEADS


def attention(q, k, v, heads, mask, training):
    """Multi-head attention over [B, S, W] projections; mask [B, 1, 1, S] additive."""
    b, s, width = q.shape
    split = lambda t: t.view(b, s, heads, width // heads).transpose(1, 2)
    p = DROPOUT if training else 0.0
    ctx = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, dropout_p=p)
    return ctx.transpose(1, 2).reshape(b, s, width)


class Layer(nn.Module):
    def __init__(self, c, pal):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.heads = c["num_attention_heads"]
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out, self.ln1 = nn.Linear(h, h), nn.LayerNorm(h, eps=EPS)
        self.ffn_in, self.ffn_out, self.ln2 = nn.Linear(h, i), nn.Linear(i, h), nn.LayerNorm(h, eps=EPS)
        self.pal_q, self.pal_k, self.pal_v = nn.Linear(pal, pal), nn.Linear(pal, pal), nn.Linear(pal, pal)

    def forward(self, h, mask, pal_enc, pal_dec):
        ctx = attention(self.query(h), self.key(h), self.value(h), self.heads, mask, self.training)
        a = self.ln1(h + F.dropout(self.attn_out(ctx), DROPOUT, self.training))
        p = pal_enc(h)
        ts = F.gelu(pal_dec(attention(self.pal_q(p), self.pal_k(p), self.pal_v(p), PAL_HEADS, mask, self.training)))
        ffn = self.ffn_out(F.gelu(self.ffn_in(a)))
        return self.ln2(a + F.dropout(ffn, DROPOUT, self.training) + ts)


class BertPals(nn.Module):
    def __init__(self, c, classes=2):
        super().__init__()
        h, pal = c["hidden_size"], pal_dim(c["hidden_size"])
        self.word = nn.Embedding(c["vocab_size"], h)
        self.position = nn.Embedding(c["max_position_embeddings"], h)
        self.token_type = nn.Embedding(c["type_vocab_size"], h)
        self.emb_ln = nn.LayerNorm(h, eps=EPS)
        self.layers = nn.ModuleList(Layer(c, pal) for _ in range(c["num_hidden_layers"]))
        self.pal_enc, self.pal_dec = nn.Linear(h, pal), nn.Linear(pal, h)
        self.pooler, self.head = nn.Linear(h, h), nn.Linear(h, classes)
        for name, param in self.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                nn.init.normal_(param, std=0.02)

    def forward(self, ids, type_ids, attention_mask):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions)[None] + self.token_type(type_ids)
        x = F.dropout(self.emb_ln(x), DROPOUT, self.training)
        mask = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0)
        for layer in self.layers:
            x = layer(x, mask, self.pal_enc, self.pal_dec)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.head(F.dropout(pooled, DROPOUT, self.training))


def optimizer(model, lr, total_steps, warmup=0.1):
    """AdamW with no decay on biases and LayerNorm; linear warmup then linear decay."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or id(param) in norms else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    adam = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    warm = max(1, int(warmup * total_steps))
    schedule = lambda step: step / warm if step < warm else max(0.0, (total_steps - step) / (total_steps - warm))
    return adam, torch.optim.lr_scheduler.LambdaLR(adam, schedule)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_seconds(args):
    """Mean wall seconds of `args.steps` warm training steps (after `args.warmup`)."""
    torch.manual_seed(42)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    c = model_config(args.train)
    model = BertPals(c).to(device).train()
    adam, schedule = optimizer(model, 2e-5, 1 << 20)
    amp = args.precision == "amp"
    # fp16 with loss scaling on CUDA, as PyTorch's AMP recipe; bf16 on the CPU (no fp16 autocast there).
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    b, s = args.batch, args.seq
    ids = torch.randint(0, c["vocab_size"], (b, s), device=device)
    ids[:, 0] = 101
    type_ids = (torch.arange(s, device=device) >= s // 2).long().expand(b, s)
    attention_mask = torch.ones(b, s, device=device)
    labels = torch.arange(b, device=device) % 2

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = F.cross_entropy(model(ids, type_ids, attention_mask), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(adam)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(adam)
        scaler.update()
        schedule.step()
        adam.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / args.steps
    if not math.isfinite(loss.item()):
        raise SystemExit(f"the loss is {loss.item()}: the yardstick diverged")
    return seconds, sum(p.numel() for p in model.parameters())


def train_main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="minilm, base, or a model directory with config.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "amp"], default="fp32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch, --seq and --steps must be positive, --warmup not negative")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}")
    seconds, params = train_step_seconds(args)
    print(f"torch train {args.train} pals {args.precision} batch {args.batch} x seq {args.seq}: "
          f"{params} parameters, {args.warmup} warm-up steps, {args.steps} timed")
    print(f"torch step time: {seconds * 1e3:.1f} ms, {args.batch / seconds:.2f} sequences/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main())
