"""The linear family in a few lines: one engine in three forms, decode with a carried state, a re-normalised
softmax kernel, and a Hedgehog map fitted to mimic a softmax layer."""

import torch

import attnkit as ak
from attnkit import linear as L

torch.manual_seed(0)
q = torch.randn(1, 8, 4096, 64)  # (batch, query heads, seq, dim)
k, v = torch.randn(1, 2, 4096, 64), torch.randn(1, 2, 4096, 64)  # grouped-query attention: 2 kv heads

# Chunked causal linear attention (elu + 1), RetNet-style per-head decay, and the same thing in pieces.
out = L.linear_attention(q, k, v, feature_map="elu+1")
ret = L.linear_attention(q, k, v, feature_map="identity", normalize=False, decay=L.retnet_decay(8), scale=64**-0.5)
first, state = L.linear_attention(q[:, :, :1000], k[:, :, :1000], v[:, :, :1000], return_state=True)
rest = L.linear_attention(q[:, :, 1000:], k[:, :, 1000:], v[:, :, 1000:], initial_state=state)
assert torch.allclose(torch.cat([first, rest], 2), out, atol=1e-5)

# Decode one token with the state (the KV-cache equivalent): O(1) in the context length.
step, state = L.linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], initial_state=state, return_state=True)

# Sigmoid attention on the tiled softmax kernel, through the one attention call.
sig = ak.attention(q, k, v, pattern=ak.patterns.Causal(), normalizer=ak.scores.Sigmoid(bias=-8.3))

# Fit a Hedgehog map to a softmax layer's queries and keys, then run it in linear time.
fmap = L.fit_hedgehog(q[:, :2, :256], k[:, :1, :256].expand(-1, 2, -1, -1), steps=20)
print("hedgehog distillation loss:", float(L.hedgehog_loss(q[:, :2, :256], k[:, :1, :256].expand(-1, 2, -1, -1), fmap)))
print("outputs:", tuple(out.shape), tuple(ret.shape), tuple(step.shape), tuple(sig.shape), "state at", state.position)
