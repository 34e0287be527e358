"""The fuzz suite's oracle rules (issue 16) and its case counter.

Every fuzzed call ends in one of three checks:

* :func:`expect_valid`: the input is valid, so the call returns the float64 reference's answer (within a
  tolerance of the dtype, or twice the error of the naive same-dtype reference, whichever is larger), with no
  NaN; a *named* backend may refuse with :class:`~attnkit.errors.UnsupportedError` only when the same input runs
  on ``fallback`` (``backend="reference"``); :class:`~attnkit.errors.MemoryBudgetError` only where the case says
  sizes are huge;
* :func:`expect_nonfinite`: NaN or inf sits where the mechanism reads it, so the call raises
  :class:`~attnkit.errors.NonFiniteError` whose argument (the text before the first ``:``) names only tensors
  that hold the non-finite values;
* :func:`expect_invalid`: the input is invalid, so the call raises an :class:`~attnkit.errors.AttnkitError` that
  is also a ``ValueError`` or ``TypeError``.

Each broken rule raises its own exception class, so hypothesis reports every distinct failure class of a test
(not only the first). With ``ATTNKIT_FUZZ_COLLECT=<file>`` failures are appended to that file as JSON lines
instead of raised: a census of every failure class the strategies reach, for triage.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter

import torch

from attnkit.errors import AttnkitError, MemoryBudgetError, NonFiniteError, UnsupportedError

#: Examples executed per test (shrinking included), printed by the conftest at the end of the session.
COUNTS: Counter = Counter()
#: Failures recorded in collect mode, per (test, class).
COLLECTED: Counter = Counter()

_COLLECT = os.environ.get("ATTNKIT_FUZZ_COLLECT")
_current = ["?"]

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


class FuzzFailure(AssertionError):
    """Base of the failure classes below."""


class WrongResult(FuzzFailure):
    """A valid call returned something other than the reference's answer."""


class NaNOutput(FuzzFailure):
    """A successful call returned NaN."""


class BadOutputForm(FuzzFailure):
    """A successful call returned the wrong shape, dtype or kind of object."""


class NonFiniteNotRaised(FuzzFailure):
    """NaN/inf where the mechanism reads it, and no NonFiniteError."""


class NonFiniteUnnamed(FuzzFailure):
    """NonFiniteError whose argument does not name the tensor(s) holding the non-finite values."""


class ErrorNotRaised(FuzzFailure):
    """Invalid input was accepted."""


class WrongErrorType(FuzzFailure):
    """An attnkit error that the rule does not allow here (e.g. UnsupportedError for invalid input)."""


class ValidRefused(FuzzFailure):
    """A valid input was refused with a named error (no backend could run it)."""


class Crash(FuzzFailure):
    """An exception that is not a named attnkit error (RuntimeError, IndexError, a raw TypeError, ...)."""


@functools.cache
def _crash_class(name: str) -> type:
    # One class per original exception type, so hypothesis keeps an IndexError and a RuntimeError apart.
    return type(f"Crash_{name}", (Crash,), {})


def counted(fn):
    """Count the examples a hypothesis test executes (put it under ``@given``)."""
    key = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        COUNTS[key] += 1
        _current[0] = key
        return fn(*args, **kwargs)

    return wrapper


def fail(cls: type, label: str, msg: str, cause: BaseException | None = None):
    if _COLLECT:
        kind = cls.__name__
        COLLECTED[(_current[0], kind)] += 1
        with open(_COLLECT, "a") as f:
            f.write(json.dumps({"test": _current[0], "kind": kind, "label": label, "msg": msg[:600]}) + "\n")
        return
    raise cls(f"{label}: {msg}") from cause


def _desc(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:400]}"


def is_named(e: BaseException) -> bool:
    """The error the rules accept for invalid input: an attnkit error that is a ValueError or TypeError."""
    return isinstance(e, AttnkitError) and isinstance(e, (ValueError, TypeError))


def attempt(fn):
    """``(result, None)`` or ``(None, exception)``."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - classifying every exception is the point
        return None, e


def _crash(label, e):
    fail(_crash_class(type(e).__name__), label, _desc(e), e)


def expect_invalid(label: str, fn, *, memory_ok: bool = False) -> None:
    out, e = attempt(fn)
    if e is None:
        fail(ErrorNotRaised, label, f"accepted, returned {type(out).__name__}")
    elif is_named(e) or (memory_ok and isinstance(e, MemoryBudgetError)):
        return
    elif isinstance(e, AttnkitError):
        fail(WrongErrorType, label, "invalid input must raise a ValueError/TypeError attnkit error, got " + _desc(e))
    else:
        _crash(label, e)


def expect_nonfinite(label: str, fn, names, *, finite_fn=None) -> None:
    """``fn`` must raise NonFiniteError naming a subset of ``names`` (the tensors holding NaN/inf).
    ``finite_fn`` (the same call on finite copies) excuses an UnsupportedError the backend also gives then."""
    out, e = attempt(fn)
    if e is None:
        fail(NonFiniteNotRaised, label, f"non-finite values in {sorted(names)}, no NonFiniteError")
    elif isinstance(e, NonFiniteError):
        arg = str(e).split(":", 1)[0]
        named = {p.strip() for p in arg.split(",") if p.strip()}
        if not named or not named <= set(names):
            fail(NonFiniteUnnamed, label, f"non-finite values in {sorted(names)}; the error names {arg!r}")
    elif isinstance(e, UnsupportedError) and finite_fn is not None:
        _, e2 = attempt(finite_fn)
        if not isinstance(e2, UnsupportedError):
            fail(WrongErrorType, label, "UnsupportedError only with non-finite values: " + _desc(e))
    elif isinstance(e, AttnkitError):
        fail(WrongErrorType, label, f"non-finite values in {sorted(names)}: expected NonFiniteError, got " + _desc(e))
    else:
        _crash(label, e)


def expect_valid(
    label: str,
    fn,
    ref,
    *,
    dtype: torch.dtype,
    fallback=None,
    memory_ok: bool = False,
    naive=None,
    lse_ref=None,
    shape=None,
    compare: bool = True,
):
    """``fn()`` returns ``out`` or ``(out, lse)``; ``ref`` / ``lse_ref`` are float64 (or callables giving them).

    ``compare=False`` checks the form and the absence of NaN only (an ill-conditioned case whose exact answer
    is beyond the dtype). Returns the output, or None when the call was (legitimately) refused."""
    res, e = attempt(fn)
    if e is not None:
        if isinstance(e, UnsupportedError) and fallback is not None:
            _, e2 = attempt(fallback)
            if e2 is None:
                return None
            fail(ValidRefused, label, f"refused ({_desc(e)}) and the fallback failed too ({_desc(e2)})", e2)
        elif memory_ok and isinstance(e, MemoryBudgetError):
            return None
        elif isinstance(e, AttnkitError):
            fail(ValidRefused, label, "valid input refused: " + _desc(e), e)
        else:
            _crash(label, e)
        return None
    out, lse = (res if isinstance(res, tuple) else (res, None)) if lse_ref is not None else (res, None)
    if lse_ref is not None and not isinstance(res, tuple):
        fail(BadOutputForm, label, f"return_lse=True returned {type(res).__name__}, not (out, lse)")
        return None
    if not isinstance(out, torch.Tensor):
        fail(BadOutputForm, label, f"returned {type(out).__name__}")
        return None
    if shape is not None and tuple(out.shape) != tuple(shape):
        fail(BadOutputForm, label, f"out shape {tuple(out.shape)}, expected {tuple(shape)}")
        return None
    if out.dtype != dtype:
        fail(BadOutputForm, label, f"out dtype {out.dtype}, expected {dtype}")
    if out.device.type == "meta":
        return out
    if bool(torch.isnan(out).any()):
        fail(NaNOutput, label, f"{int(torch.isnan(out).sum())} NaN in the output")
        return out
    if not compare:
        return out
    ref = ref() if callable(ref) else ref
    close(label, out, ref, dtype, naive=naive)
    if lse_ref is not None:
        lse_ref = lse_ref() if callable(lse_ref) else lse_ref
        if not isinstance(lse, torch.Tensor):
            fail(BadOutputForm, label, f"return_lse=True gave lse={type(lse).__name__}")
        elif tuple(lse.shape) != tuple(lse_ref.shape):
            fail(BadOutputForm, label, f"lse shape {tuple(lse.shape)}, expected {tuple(lse_ref.shape)}")
        elif bool(torch.isnan(lse).any()):
            fail(NaNOutput, label, "NaN in lse")
        else:
            empty = torch.isneginf(lse_ref)
            # A row whose weights sum below the compute dtype's smallest normal (e.g. sigmoid weights of logits
            # near -100 in float32) may underflow to lse = -inf: the dtype's limit, not a visibility error.
            cd = torch.float64 if dtype == torch.float64 else torch.float32
            tiny = lse_ref.double() < math.log(torch.finfo(cd).tiny)
            got = torch.isneginf(lse)
            if bool((got != empty)[~tiny].any()) or bool((got & ~empty & ~tiny).any()):
                fail(WrongResult, label, "lse is -inf exactly where no key is visible: mismatch")
            else:
                skip = empty | (tiny & got)
                close(label + " (lse)", lse.masked_fill(skip, 0), lse_ref.masked_fill(skip, 0), dtype)
    return out


def close(label, out, ref, dtype, *, naive=None) -> None:
    o, r = out.detach().double(), ref.detach().double()
    if o.shape != r.shape:
        fail(BadOutputForm, label, f"shape {tuple(o.shape)}, reference {tuple(r.shape)}")
        return
    if not bool(torch.isfinite(r).all()):
        if not torch.equal(torch.isfinite(o), torch.isfinite(r)) or not torch.equal(
            o[~torch.isfinite(r)], r[~torch.isfinite(r)]
        ):
            fail(WrongResult, label, "non-finite entries differ from the reference")
        fin = torch.isfinite(r)
        o, r = o[fin], r[fin]
    if r.numel() == 0:
        return
    err = (o - r).abs().max().item()
    scale = max(1.0, r.abs().max().item())
    tol = RTOL.get(dtype, 1e-4) * scale
    if not err <= tol and naive is not None:
        # Ill-conditioned cases (sharp softmax over rounded inputs): twice the naive same-dtype error is allowed.
        nv = naive() if callable(naive) else naive
        ne = (nv.detach().double() - ref.detach().double()).abs()
        ne = ne[torch.isfinite(ne)]
        if ne.numel():
            tol = max(tol, 2 * ne.max().item() + 32 * torch.finfo(dtype).eps * scale)
    if not err <= tol or math.isnan(err):
        fail(WrongResult, label, f"max error {err:.3e} > tolerance {tol:.1e} (reference max {scale:.3g})")
