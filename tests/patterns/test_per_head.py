"""``PerHead``: a head axis of its own evaluates each head's pattern on its slice only, and agrees with the
per-element rule everywhere (the scalar head FlexAttention passes, heads mixed into the query axis)."""

import torch

from attnkit.patterns import PerHead, SlidingWindow
from attnkit.patterns.global_tokens import AShape

PAT = PerHead([AShape(4, 10 + 3 * h) if h % 2 else SlidingWindow(5 + h, 0) for h in range(6)])
ZERO = torch.zeros((), dtype=torch.long)


def _rule(h, i, j):
    return bool(PAT.patterns[h].mask_mod(ZERO, torch.tensor(h), torch.tensor(i), torch.tensor(j)))


def test_a_head_axis_of_its_own_matches_the_rule():
    h = torch.arange(1, 5)[None, :, None, None]
    q, k = torch.arange(40, 60)[None, None, :, None], torch.arange(64)[None, None, None, :]
    got = PAT.mask_mod(ZERO, h, q, k)
    assert got.shape == (1, 4, 20, 64)
    for a in range(4):
        for i in range(0, 20, 3):
            for j in range(0, 64, 5):
                assert bool(got[0, a, i, j]) == _rule(a + 1, 40 + i, j)


def test_scalar_and_mixed_heads_take_the_general_path_and_agree():
    q, k = torch.arange(30)[:, None], torch.arange(30)[None, :]
    for h in range(6):
        assert torch.equal(PAT.mask_mod(ZERO, torch.tensor(h), q, k), PAT.patterns[h].mask_mod(ZERO, h, q, k))
    h = torch.arange(6)[:, None].expand(6, 30)  # a head per query row: no axis of its own
    got = PAT.mask_mod(ZERO, h, torch.arange(6)[:, None] + 20, torch.arange(30)[None, :])
    for r in range(6):
        want = PAT.patterns[r].mask_mod(ZERO, r, torch.tensor(20 + r), torch.arange(30))
        assert torch.equal(got[r], want)
