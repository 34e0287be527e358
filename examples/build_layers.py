"""Build with attnkit's layers as they exist today: a vision block on 2-D Agent Attention, Gaussian Adaptive
Attention in a small model trained for a few steps, and a SeerAttention gate trained by self-distillation
(``fit_gate``) and then used as a sparse selector.

Run: .venv/bin/python examples/build_layers.py  (a few seconds on 2 cores)
"""

import torch

from attnkit.bench.dynamic import dense_reference, quality
from attnkit.linear import AgentAttention, GaussianAdaptiveAttention
import attnkit as ak
from attnkit.sparse import SeerAttention, SeerGate, fit_gate

torch.manual_seed(0)


# 1. A pre-norm residual block on 2-D Agent Attention: an 8 x 8 grid of 32-channel tokens, 4 x 4 agents pooled
#    from the queries, learned agent biases per row and column, a depthwise convolution on V.
class AgentBlock(torch.nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = AgentAttention(dim, heads, (4, 4), spatial=grid)

    def forward(self, x):
        return x + self.attn(self.norm(x))


block = AgentBlock(32, heads=4, grid=(8, 8))
image_tokens = torch.randn(2, 64, 32)  # (batch, 8 * 8 tokens, channels)
y = block(image_tokens)
y.square().mean().backward()
assert y.shape == image_tokens.shape and block.attn.agent_row.grad.abs().sum() > 0
print("AgentAttention block:", tuple(y.shape), "- agent biases and projections get gradients")

# 2. Gaussian Adaptive Attention (GAAM) in a small sequence regressor, trained for a few Adam steps: the
#    per-head Gaussians (mean offset, variance scale) are learned with the projections around them.
model = torch.nn.Sequential(
    torch.nn.Linear(8, 32), GaussianAdaptiveAttention(32, heads=4), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 1)
)
x = torch.randn(256, 16, 8)  # (batch, tokens, features)
target = x[:, :, 0].max(1, keepdim=True).values  # the largest first feature over the sequence
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
losses = []
for _ in range(60):
    loss = torch.nn.functional.mse_loss(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
assert losses[-1] < losses[0]
print(f"GAAM regressor: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 60 steps")


# 3. A SeerAttention gate trained by self-distillation from the dense attention's block masses, then judged
#    on a fresh draw. The toy q, k have block structure: each 16-query block reads from one earlier 16-key tile
#    (its queries copy keys of that tile), which the gate has to find from pooled q and k.
def qkv(n=512, heads=4, dim=32, block=16):
    k = torch.randn(1, heads, n, dim)
    start = torch.arange(0, n, block)  # the first position of each query block
    tile = (torch.rand(heads, n // block) * (start // 16 + 1)).long() * 16  # an earlier (or its own) key tile
    src = torch.minimum(tile.repeat_interleave(block, 1) + torch.randint(0, 16, (heads, n)), torch.arange(n))
    q = 3 * torch.gather(k[0], 1, src[..., None].expand(-1, -1, dim))[None] + torch.randn(1, heads, n, dim)
    return q, k, torch.randn(1, heads, n, dim)


gate = SeerGate(heads=4, head_dim=32, query_pool=16)
train = [qkv()[:2] for _ in range(4)]  # four draws of (q, k); the base "model" is untouched
losses = fit_gate(gate, train, block_size=(16, 16), steps=40, lr=3e-3, target="mass")
print(f"fit_gate: distillation loss {losses[0]:.3f} -> {losses[-1]:.3f}")

q, k, v = qkv()
dense = dense_reference(q, k, v)
for name, selector in (
    ("training-free gate", SeerAttention(None, query_pool=16, block_size=(16, 16), budget=0.25, allocate="layer")),
    ("fitted gate", SeerAttention(gate, block_size=(16, 16), budget=0.25, allocate="layer")),
):
    with torch.no_grad():
        sel = selector.select(q, k, v, causal=True)  # which tiles each query block computes
    out, lse = ak.attention(q, k, v, pattern=sel, causal=True, return_lse=True)
    qual = quality(out, lse, *dense)
    print(
        f"SeerAttention, {name}: {sel.density(True):.2f} of the causal pairs, relative error "
        f"{qual['rel_error']:.3f}, attention mass kept {qual['recall']:.3f}"
    )
    assert out.isfinite().all()
