#!/usr/bin/env python3
"""Golden values for tests/golden_minilm.rs, computed by PyTorch + transformers.

    pip install torch transformers
    python3 tests/golden/minilm_golden.py models/all-MiniLM-L6-v2 tests/golden/minilm.json

For a dozen fixed sentences and sentence pairs (eval mode, no dropout) it records the token
ids, the last hidden state (every 8th feature of every real token), the pooled output
(every 8th feature), the gradient of a fixed scalar loss for a few parameters (slices), and
the cosine similarities of mean-pooled sentence embeddings. The loss is
    L = sum(last_hidden * R1 * mask) + sum(pooled * R2)
with R1[b, s, h] = sin(0.37 * (b * 1000 + s * 50 + h) + 0.1) and R2[b, h] = cos(0.11 * (b * 100 + h)).
"""
import json
import math
import sys

import torch
from transformers import AutoTokenizer, BertModel

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
    "Prices on Wall Street dropped.",
    "A woman is slicing an onion.",
    "hello world",
]
PAIRS = [
    ("The cat sat on the mat.", "A cat is sitting on a mat."),
    ("He said the deal was off.", "The agreement had been cancelled, he reported."),
    ("Is this the right way to the station?", "The weather is lovely today."),
    ("Unbelievable!!! It's fantastic", "naïve café déjà vu"),
    ("Two dogs run through a field of tall grass near a river in the morning.", "Dogs."),
    ("1,234 people attended.", "About twelve hundred people came."),
]
STRIDE = 8
GRAD_PARAMS = {
    # name: (row slice, column slice) of the gradient to record
    "embeddings.word_embeddings.weight": None,  # rows of the ids the batch uses: see below
    "embeddings.LayerNorm.weight": (slice(0, 384, 4),),
    "encoder.layer.0.attention.self.query.weight": (slice(0, 3), slice(0, 384, 16)),
    "encoder.layer.2.intermediate.dense.bias": (slice(0, 1536, 16),),
    "encoder.layer.5.output.dense.weight": (slice(0, 2), slice(0, 1536, 32)),
    "encoder.layer.5.output.LayerNorm.bias": (slice(0, 384, 4),),
    "pooler.dense.weight": (slice(0, 2), slice(0, 384, 8)),
}


def main(model_dir, output):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=True).eval()
    texts = [(s, None) for s in SENTENCES] + PAIRS
    encoded = [tok(a, b, truncation=True, max_length=128) for a, b in texts]
    ids = [e["input_ids"] for e in encoded]
    types = [e["token_type_ids"] for e in encoded]
    seq = max(len(i) for i in ids)
    batch = len(ids)
    input_ids = torch.zeros(batch, seq, dtype=torch.long)
    type_ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        n = len(ids[b])
        input_ids[b, :n] = torch.tensor(ids[b])
        type_ids[b, :n] = torch.tensor(types[b])
        mask[b, :n] = 1
    out = model(input_ids=input_ids, token_type_ids=type_ids, attention_mask=mask)
    hidden, pooled = out.last_hidden_state, out.pooler_output
    H = hidden.shape[-1]
    r1 = torch.tensor([[[math.sin(0.37 * (b * 1000 + s * 50 + h) + 0.1) for h in range(H)]
                        for s in range(seq)] for b in range(batch)])
    r2 = torch.tensor([[math.cos(0.11 * (b * 100 + h)) for h in range(H)] for b in range(batch)])
    loss = (hidden * r1 * mask.unsqueeze(-1)).sum() + (pooled * r2).sum()
    loss.backward()
    params = dict(model.named_parameters())
    used = sorted({i for row in ids for i in row})[:6]
    grads = {}
    for name, index in GRAD_PARAMS.items():
        g = params[name].grad
        if index is None:
            grads[name] = {"rows": used, "values": g[used][:, ::STRIDE].tolist()}
        else:
            grads[name] = {"index": [[s.start, s.stop, s.step] for s in index], "values": g[index].tolist()}

    def mean_pool(b):
        n = len(ids[b])
        return hidden[b, :n].mean(0)

    cos = torch.nn.functional.cosine_similarity
    cosines = []
    for i in range(0, len(SENTENCES), 2):
        cosines.append([i, i + 1, cos(mean_pool(i), mean_pool(i + 1), dim=0).item()])
    cosines.append([0, 2, cos(mean_pool(0), mean_pool(2), dim=0).item()])
    golden = {
        "texts": [[a, b] for a, b in texts],
        "ids": ids,
        "type_ids": types,
        "seq": seq,
        "stride": STRIDE,
        "hidden": [hidden[b, : len(ids[b]), ::STRIDE].tolist() for b in range(batch)],
        "pooled": pooled[:, ::STRIDE].tolist(),
        "loss": loss.item(),
        "grads": grads,
        "cosines": cosines,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    with open(output, "w") as f:
        json.dump(golden, f, separators=(",", ":"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
