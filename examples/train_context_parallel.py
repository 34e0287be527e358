"""Train a small decoder with data parallelism (DDP) and context parallelism on 2 CPU processes (gloo).

Each process holds half of every sequence (zigzag shards: chunks 0 and 3 on rank 0, 1 and 2 on rank 1, so a
causal model's work balances). Every attention layer runs ``attnkit.distributed.context_parallel_attention``
over a 32-key causal window; it sends the other rank only the key rows the window reaches. DDP averages the two
ranks' gradients (each rank's loss is its share of the global mean loss, times the world size), which gives the
gradient of the whole sequence. Step 0 checks this against one process on the whole sequence.

The task: random tokens that repeat after a marker (an induction task, as in train_transformer.py).

Run: .venv/bin/python examples/train_context_parallel.py  (about 30 s on 2 cores)
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from attnkit.distributed import local_positions, record_traffic, shard
from attnkit.layers import Transformer
from attnkit.patterns import SlidingWindow

WORLD, HALF, STEPS = 2, 24, 80


def batch(gen, n=32, vocab=32):
    first = torch.randint(2, vocab, (n, HALF), generator=gen)
    return torch.cat([first, torch.ones(n, 1, dtype=torch.long), first], 1)  # token 1 is the marker


def model(group=None):
    torch.manual_seed(0)  # the same initial weights on every rank (and in the one-process check)
    kw = {} if group is None else {"process_group": group, "cp_balance": "zigzag"}
    return Transformer(vocab=32, dim=64, depth=2, heads=4, kv_heads=2, mechanism=SlidingWindow(left=31, right=0), **kw)


def loss_on(logits, targets, positions):
    """This rank's share of the mean cross-entropy over the repeated half (positions >= HALF predict it)."""
    keep = positions >= HALF
    ce = F.cross_entropy(logits[:, keep].flatten(0, 1), targets[:, keep].flatten(), reduction="sum")
    return ce / (targets.shape[0] * HALF)  # HALF predicted tokens per sequence, over all ranks


def main(rank, init):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    cp = dist.new_group(list(range(WORLD)))  # context parallelism in its own group, DDP in the world's
    net = DDP(model(cp))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)  # the same batches on both ranks: they split sequences, not batches
    n_local = len(shard(torch.arange(2 * HALF), dim=0, balance="zigzag", rank=rank, world=WORLD))
    pos = local_positions(n_local, balance="zigzag", group=cp)
    for step in range(STEPS):
        tokens = batch(gen)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with record_traffic() as traffic:
            logits = net(shard(inputs, dim=1, balance="zigzag", group=cp), positions=pos)
            loss = loss_on(logits, shard(targets, dim=1, balance="zigzag", group=cp), pos)
            opt.zero_grad()
            (loss * WORLD).backward()  # DDP averages over the ranks: times WORLD makes it the sum
        total = loss.detach().clone()
        dist.all_reduce(total)
        if step == 0:
            check_against_one_process(rank, net, tokens, total)
            if rank == 0:
                print(f"rank 0 sent {traffic.sent} bytes of key/value rows and their gradients in step 0")
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == STEPS - 1):
            print(f"step {step:3d}: loss on the repeated half {total.item():.3f}")
    # Accuracy on new sequences, teacher-forced, each rank on its positions.
    with torch.no_grad():
        tokens = batch(torch.Generator().manual_seed(7), n=16)
        logits = net(shard(tokens[:, :-1], dim=1, balance="zigzag", group=cp), positions=pos)
        keep = pos >= HALF
        right = (logits.argmax(-1) == shard(tokens[:, 1:], dim=1, balance="zigzag", group=cp))[:, keep]
        counts = torch.tensor([right.sum().item(), right.numel()], dtype=torch.float64)
        dist.all_reduce(counts)
    if rank == 0:
        acc = (counts[0] / counts[1]).item()
        print(f"two processes, one model: {acc:.0%} of the repeated tokens right")
        assert acc > 0.9, acc
    dist.destroy_process_group()


def check_against_one_process(rank, net, tokens, total):
    """Step 0: the two-process loss and gradients equal one process's on the whole sequence."""
    one = model()
    logits = one(tokens[:, :-1])
    ref = loss_on(logits, tokens[:, 1:], torch.arange(tokens.shape[1] - 1))
    ref.backward()
    pairs = zip(net.module.parameters(), one.parameters(), strict=True)
    worst = max((p.grad - q.grad).abs().max().item() for p, q in pairs)
    assert abs(ref.item() - total.item()) < 1e-5 and worst < 1e-5, (ref.item(), total.item(), worst)
    if rank == 0:
        print(f"step 0 equals one process: loss {ref.item():.4f}, largest gradient difference {worst:.1e}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(main, args=(f"file://{os.path.join(tmp, 'store')}",), nprocs=WORLD, join=True)
