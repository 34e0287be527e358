"""attnkit in ten lines: a sparse pattern, GQA, decode with a KV cache, training on CPU, and `explain`."""

import torch

import attnkit as ak

q = torch.randn(2, 8, 4096, 64, requires_grad=True)  # (batch, query heads, seq, dim)
k, v = torch.randn(2, 2, 4096, 64), torch.randn(2, 2, 4096, 64)  # 2 key/value heads: grouped-query attention
window = ak.patterns.SlidingWindow(left=255, right=0)  # causal window of 256 keys
out = ak.attention(q, k, v, pattern=window)  # CPU + grad: the tiled kernel, forward and backward
out.sum().backward()
step = ak.attention(q[:, :, -1:].detach(), k, v, pattern=window, q_offset=4095)  # one decode step
assert torch.allclose(step, out[:, :, -1:], atol=1e-5)
print(ak.explain(q, k, v, pattern=window))
