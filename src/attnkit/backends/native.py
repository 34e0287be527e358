"""The native (C++) kernel of the ``tiled`` backend, forward and backward, built on first use and cached on disk.

``_native/tiled.cpp`` computes attention over a :class:`~attnkit.layout.BlockLayout` in one C++ loop per
direction: per (batch, head unit, query block) it copies the key and value rows of its tiles into a per-thread
buffer, chunk by chunk, and runs the products as BLAS calls with the online softmax between them (forward), or
recomputes ``P`` from the saved lse and runs FlashAttention-2's five products (backward, whose dK and dV rows are
owned by one range of query blocks per (batch, kv head), so no two threads add to one row). Against the torch-op
paths it removes the gathers into large tensors, the Python between ops, the padding of irregular rows and the
backward's ``index_add_`` scatter (measured in ``BENCHMARKS.md``).

It is built with torch's extension builder (a C++ compiler and ``ninja`` are needed; both come with the set-up)
into ``$ATTNKIT_CACHE/native/<tag>`` (``~/.cache/attnkit`` by default), keyed by the source, the torch version
and the CPU capability, so one build serves every later process: about a minute on 2 cores, once. Threads of one
process build once (a lock); processes that start together build once too (an ``flock`` on ``<tag>.lock``:
the others wait and load the result), and a build that was killed leaves no lock that blocks the next.

Which forward the ``tiled`` backend runs is chosen by ``ATTNKIT_TILED_KERNEL``:

* ``auto`` (default): the native forward when it builds; when it cannot be built, a warning that says why,
  once per process, and the torch-op forward (same backend, same results within float32 rounding);
* ``native``: the native forward, or :class:`~attnkit.errors.UnsupportedError` when it cannot be built;
* ``torch``: the torch-op forward.

It links against what ``libtorch_cpu`` exports: MKL's ``sgemm_`` and ``MKL_Set_Num_Threads_Local`` (each worker's
products run on that worker alone), as in the pinned ``torch==2.13.0`` CPU build. A torch built on another BLAS
fails to load it, which ``auto`` reports and survives.

It serves the softmax, with or without a token-grain selection (:class:`~attnkit.layout.TokenSelect`), and
attnkit's own score mods (:class:`~attnkit.scores.Softcap`, :class:`~attnkit.scores.ALiBi`) and non-softmax
normalisers (:class:`~attnkit.scores.Sigmoid`, :class:`~attnkit.scores.Softplus`), forward and backward, in
float32 and in bf16: bf16 operands into float32 products (MKL's ``gemm_bf16bf16f32``, also exported by
``libtorch_cpu``), the softmax, its statistics and every accumulator in float32, ``P`` and ``dS`` rounded to bf16
once for their products, as torch's CPU flash attention does. float16 is widened to float32 first. Other score
mods and normalisers (a subclass, :class:`~attnkit.scores.TensorBias`, a user's own: Python code the kernel
cannot call) and float64 run the torch-op paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

from .._cache import cache_root
from ..errors import UnsupportedError, bad

_SOURCE = Path(__file__).with_name("_native") / "tiled.cpp"
_MODES = ("auto", "native", "torch")
_state: dict = {}
_lock = threading.Lock()  # one build per process, whichever thread asks first


def mode() -> str:
    """The forward ``ATTNKIT_TILED_KERNEL`` asks for."""
    m = os.environ.get("ATTNKIT_TILED_KERNEL", "auto").strip().lower() or "auto"
    if m not in _MODES:
        raise UnsupportedError(bad("ATTNKIT_TILED_KERNEL", " or ".join(_MODES), m))
    return m


def _flags() -> tuple[str, list[str]]:
    """The CPU capability torch detected and the compiler flags for it (never ``-march=native``: a cache
    directory may be shared by machines of different CPUs, and the tag keeps their builds apart)."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-std=c++17", "-fopenmp"]  # ATen's parallel_for is inline OpenMP: without it, one thread
    if cap in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return cap, flags


def build_dir() -> Path:
    cap, flags = _flags()
    digest = hashlib.sha256(_SOURCE.read_bytes() + f"{torch.__version__}|{cap}|{flags}".encode()).hexdigest()
    return cache_root() / "native" / digest[:16]


def _build():
    from torch.utils import cpp_extension

    # ninja from the venv (the `ninja` wheel) when the venv's bin is not on PATH.
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    path = build_dir()
    path.mkdir(parents=True, exist_ok=True)
    _, flags = _flags()
    with _exclusive(path.with_name(path.name + ".lock")):
        # torch's own lock file: left behind by a build that was killed, it makes torch wait forever. Holding
        # the exclusive lock, this process is the only one building, so such a file is stale.
        (path / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name=f"attnkit_tiled_{path.name}",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            build_directory=str(path),
            verbose=False,
        )


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive lock between processes (``flock``: the kernel releases it when its holder dies)."""
    import fcntl

    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def module():
    """The built extension, or None when the torch-op forward is to run (``torch`` mode, or ``auto`` after a
    failed build, which warns once)."""
    m = mode()
    if m == "torch":
        return None
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as e:  # the compiler's message is what the user needs to see
                _state["module"], _state["error"] = None, f"{type(e).__name__}: {e}"
                if m == "auto":
                    warnings.warn(
                        "attnkit: the tiled kernel's native forward could not be built, so the torch-op forward runs "
                        f"instead (set ATTNKIT_TILED_KERNEL=torch to choose it and silence this): {_state['error']}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    if _state["module"] is None and m == "native":
        raise UnsupportedError(
            bad("ATTNKIT_TILED_KERNEL", "a native forward that builds here", _state.get("error", "no build"))
        )
    return _state["module"]


def kernel_name() -> str:
    """``native`` or ``torch``: the forward the ``tiled`` backend runs in this process (builds if needed)."""
    return "native" if module() is not None else "torch"
