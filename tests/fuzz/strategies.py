"""Hypothesis strategies of the fuzz suite: tiny shapes, every dtype, odd memory layouts, extreme integers,
NaN/inf placements, key-padding patterns and static patterns with parameters from 0 to 2**63 - 1.

Tensors are small (N <= 70, D <= 16) so a case takes milliseconds; their values come from a seeded torch
generator (drawing every float through hypothesis would be slow and shrink badly), their *structure* (sizes,
dtype, strides, where a NaN goes, which keys are padding) from hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

import attnkit as ak

P = ak.patterns
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_N = 70

#: Integers at the edges that matter: 0, 1, around 2**31 and 2**32, around 2**63, negative.
EDGE_INTS = (
    0,
    1,
    2,
    3,
    7,
    16,
    63,
    64,
    65,
    2**31 - 1,
    2**31,
    2**31 + 1,
    2**32,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    -1,
    -(2**31),
    -(2**63),
)
#: Values that are not ints at all.
NOT_INTS = (None, 1.0, 2.5, float("nan"), float("inf"), True, False, "3", [3], (3,), torch.tensor(3))


def edge_int(lo: int = 1, hi: int = 2 * MAX_N):
    """A small int in ``[lo, hi]`` or an edge value (any sign, up to 2**64)."""
    return st.one_of(st.integers(lo, hi), st.sampled_from(EDGE_INTS))


def anything_int(lo: int = 1, hi: int = 2 * MAX_N):
    """:func:`edge_int` or a value of the wrong type."""
    return st.one_of(edge_int(lo, hi), edge_int(lo, hi), st.sampled_from(NOT_INTS))


@dataclass
class Case:
    """One softmax call's tensors and sizes (q, k, v in ``dtype``; a key padding mask or None)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kpm: torch.Tensor | None
    q_offset: int
    dtype: torch.dtype

    @property
    def dims(self):
        B, Hq, Nq, D = self.q.shape
        return B, Hq, self.k.shape[1], Nq, self.k.shape[2], D, self.v.shape[3]

    def label(self) -> str:
        B, Hq, Hkv, Nq, Nk, D, Dv = self.dims
        pad = None if self.kpm is None else self.kpm.int().tolist()
        return (
            f"B={B} Hq={Hq} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {self.dtype} q_offset={self.q_offset} "
            f"strides q{self.q.stride()} k{self.k.stride()} kpm={pad}"
        )

    def f64(self):
        return tuple(t.detach().double() for t in (self.q, self.k, self.v))

    def with_tensors(self, **kw) -> Case:
        return replace(self, **kw)


def _layout(draw, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same values as ``t`` under a drawn memory layout (contiguous, transposed, strided, expanded)."""
    how = draw(st.sampled_from(["contiguous", "contiguous", "bnhd", "strided", "channels", "expanded"]))
    if how == "bnhd":  # (B, N, H, D) storage viewed as (B, H, N, D): what a projection + view gives
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "strided":  # every other element of a larger buffer along the last dim
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == "channels":  # dim-major storage
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "expanded" and t.shape[0] > 1:  # stride 0 over the batch (one row broadcast)
        return t[:1].expand_as(t)
    return t


def _values(shape, gen: torch.Generator, kind: str) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if kind == "small":
        return x * 1e-3
    if kind == "large":
        return x * 6.0
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "ties":  # equal logits: a uniform softmax
        return torch.ones(shape, dtype=torch.float64) * 0.5
    if kind == "ints":
        return torch.randint(-3, 4, shape, generator=gen).double()
    return x


@st.composite
def kpm_for(draw, B: int, Nk: int):
    """None, or a bool (B, Nk) mask: random, all True, all-False rows, one key only, a prefix, a suffix."""
    kind = draw(st.sampled_from(["none", "none", "random", "all", "row_false", "first", "last", "prefix", "suffix"]))
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if kind == "random":
        m = torch.rand(B, Nk, generator=gen) < draw(st.sampled_from([0.2, 0.5, 0.9]))
    elif kind == "all":
        m = torch.ones(B, Nk, dtype=torch.bool)
    elif kind == "row_false":
        m = torch.rand(B, Nk, generator=gen) < 0.7
        m[draw(st.integers(0, B - 1))] = False
    elif kind == "first":
        m = torch.zeros(B, Nk, dtype=torch.bool)
        m[:, 0] = True
    elif kind == "last":
        m = torch.zeros(B, Nk, dtype=torch.bool)
        m[:, -1] = True
    else:
        cut = draw(st.integers(0, Nk))
        m = torch.zeros(B, Nk, dtype=torch.bool)
        if kind == "prefix":
            m[:, :cut] = True
        else:
            m[:, cut:] = True
    return m


@st.composite
def cases(
    draw,
    *,
    dtypes=FLOATS,
    max_n: int = MAX_N,
    cross: bool = True,
    gqa: bool = True,
    padding: bool = True,
    heads=None,
    n=None,
    dv: bool = True,
):
    """A valid softmax call's tensors: GQA, D != Dv, Nq < Nk with a q_offset, odd and size-1 dims, every
    float dtype, odd strides, padding."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.sampled_from([1, 2])) if gqa else 1
    Hq = Hkv * (draw(st.sampled_from([1, 2, 3])) if gqa else 1)
    if heads is not None:
        Hq, Hkv = heads
    Nk = n if n is not None else draw(st.one_of(st.integers(1, max_n), st.sampled_from([1, 16, 17, 31, 32, 64])))
    Nq = draw(st.integers(1, Nk)) if cross else Nk
    mode = draw(st.sampled_from(["last", "zero", "any"])) if Nq < Nk else "zero"
    q_offset = {"last": Nk - Nq, "zero": 0, "any": draw(st.integers(0, Nk - Nq))}[mode]
    D = draw(st.sampled_from([1, 2, 3, 8, 16]))
    Dv = draw(st.sampled_from([1, D, 5, 16])) if dv else D
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["normal", "normal", "normal", "small", "large", "zeros", "ties", "ints"]))
    q = _values((B, Hq, Nq, D), gen, kind).to(dtype)
    k = _values((B, Hkv, Nk, D), gen, kind).to(dtype)
    v = _values((B, Hkv, Nk, Dv), gen, "normal").to(dtype)
    q, k, v = (_layout(draw, t, gen) for t in (q, k, v))
    kpm = draw(kpm_for(B, Nk)) if padding else None
    return Case(q, k, v, kpm, q_offset, dtype)


# -- static patterns ------------------------------------------------------------------------------------------


def _seq_pattern(draw, value, Hq):
    """A 1-D sequence pattern whose int parameters come from ``value`` (small or extreme)."""
    kind = draw(
        st.sampled_from(
            ["causal", "window", "window2", "ashape", "dilated", "power", "sinks", "global", "shards", "full"]
        )
    )
    if kind == "causal":
        return P.Causal()
    if kind == "full":
        return P.Full()
    if kind == "window":
        return P.SlidingWindow(draw(value(0)), 0)
    if kind == "window2":
        return P.SlidingWindow(draw(value(0)), draw(value(0)))
    if kind == "ashape":
        return P.AShape(sinks=draw(value(1)), window=draw(value(1)))
    if kind == "dilated":
        return P.Dilated(draw(value(1)), draw(value(1)), is_causal=draw(st.booleans()))
    if kind == "power":
        return P.Power(draw(value(1)))
    if kind == "sinks":
        return P.Sinks(draw(value(1))) | P.SlidingWindow(draw(value(0)), 0)
    if kind == "global":
        return P.GlobalTokens(draw(value(1)))
    return P.StridedShards(heads=Hq, shards=draw(value(1)), local=draw(value(1)))


def small_or_edge(lo):
    """Pattern parameters: mostly small, sometimes huge (valid: >= lo and <= 2**62, the largest that int64
    positions can use; larger is a PatternError, which test_patterns draws)."""
    return st.one_of(st.integers(lo, 2 * MAX_N), st.sampled_from([2**31 - 1, 2**31, 2**32, 2**62 - 1, 2**62]))


@st.composite
def seq_patterns(draw, Hq: int):
    """A valid 1-D pattern, maybe composed (``&``, ``|``, PerHead)."""
    first = _seq_pattern(draw, small_or_edge, Hq)
    how = draw(st.sampled_from(["one", "one", "one", "and", "or", "perhead"]))
    if how == "and":
        return first & _seq_pattern(draw, small_or_edge, Hq)
    if how == "or":
        return first | _seq_pattern(draw, small_or_edge, Hq)
    if how == "perhead" and first.num_heads is None:
        rest = [_seq_pattern(draw, small_or_edge, Hq) for _ in range(Hq - 1)]
        rest = [p for p in rest if p.num_heads is None]
        if len(rest) == Hq - 1:
            return P.PerHead((first, *rest))
    return first


def poison_one(data, c: Case, where: str, value: float):
    """Copies of ``c``'s q, k, v with one non-finite ``value``: in q, or in k/v at a real key, or (``where``
    ending in ``_padded``) at a padded key. Returns ``(tensors, where, name, real)``, ``where`` adjusted when the
    padding makes the asked placement impossible."""
    B, Hq, Hkv, Nq, Nk, D, Dv = c.dims
    Nq = c.q.shape[2]
    t = {"q": c.q.clone(), "k": c.k.clone(), "v": c.v.clone()}
    real = torch.ones(B, Nk, dtype=torch.bool) if c.kpm is None else c.kpm
    if "padded" in where and bool(real.all()):
        where = where[0]
    if where in ("k", "v") and not bool(real.any()):
        where = "q"
    name = where[0]
    if name == "q":
        t["q"][
            data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, Hq - 1)), data.draw(st.integers(0, Nq - 1))
        ] = value
    else:
        b, j = data.draw(st.sampled_from((real if "padded" not in where else ~real).nonzero().tolist()))
        t[name][b, data.draw(st.integers(0, Hkv - 1)), j] = value
    return t, where, name, real
