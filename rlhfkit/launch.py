"""Process set-up: preloading tcmalloc (only a launcher can), or tuning glibc's malloc.

PyTorch's CPU training allocates and frees many large tensors per step; glibc's malloc returns
them to the kernel and faults them back in. tcmalloc keeps them, which made SFT steps 0-17%
faster and peak RSS ~14% lower here (benchmarks/RESULTS.md). An allocator has to be in place
before the interpreter starts, so the ``rlhfkit`` command re-executes itself once with
``LD_PRELOAD`` when Debian/Ubuntu's ``libtcmalloc-minimal4`` is installed (``scripts/setup.sh``
installs it where it can). ``RLHFKIT_TCMALLOC=0`` turns this off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

TCMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)


def tcmalloc_env(
    env: Mapping[str, str], candidates: Sequence[str] = TCMALLOC
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do: turned off, already
    preloaded (which also ends the re-execution), or no library found."""
    if env.get("RLHFKIT_TCMALLOC", "1") == "0" or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return None
    lib = next((p for p in candidates if os.path.exists(p)), None)
    if lib is None:
        return None
    new = dict(env)
    new["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    # tcmalloc reports every allocation above 1 GB on stderr by default; model weights are that big
    new.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return new


def reexec_with_tcmalloc(module: str = "rlhfkit") -> None:
    """Replace this process (same pid, same arguments) by ``python -m module`` with tcmalloc
    preloaded; returns only when there is nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    env = tcmalloc_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def allocator() -> str:
    """'tcmalloc' when it is loaded into this process, else 'system' (Linux; elsewhere 'system')."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "system"
    except OSError:
        return "system"


if __name__ == "__main__":  # python -m rlhfkit.launch CMD [ARGS...]: CMD with tcmalloc preloaded
    os.execvpe(sys.argv[1], sys.argv[1:], tcmalloc_env(os.environ) or dict(os.environ))


# glibc's mallopt parameters (malloc.h) and what training sets them to
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_GLIBC_TUNING = {
    # tensors up to 2 GB come from the heap, not from a fresh mmap each (glibc's dynamic
    # threshold stops at 32 MB: a 16 x 326-token SmolLM2 micro-batch has many tensors above it)
    _M_MMAP_THRESHOLD: (1 << 31) - 1,
    _M_TRIM_THRESHOLD: (1 << 31) - 1,  # freed memory stays with the process for the next step
    _M_TOP_PAD: 512 << 20,  # the heap grows in steps of 512 MB
}


def tune_glibc_malloc(env: Mapping[str, str] | None = None) -> bool:
    """Keep large tensors' memory in the process under glibc's malloc, as tcmalloc does: a tensor
    above glibc's mmap threshold is otherwise mapped fresh at each allocation and page-faulted in
    as it is written (one SmolLM2 update micro-batch of 16 x 326 tokens: 28.0 -> 23.6 s median
    of 3, benchmarks/RESULTS.md session 8). Process-wide and idempotent; a no-op under tcmalloc,
    off glibc, or with ``RLHFKIT_MALLOC_TUNE=0``. Returns whether glibc took the settings.
    The price is memory: freed memory is not returned to the system until the process ends,
    and the heap's fragments raise peak RSS (SmolLM2 GRPO: 14.6 GB against 13.2 GB)."""
    env = os.environ if env is None else env
    if env.get("RLHFKIT_MALLOC_TUNE", "1") == "0" or allocator() != "system":
        return False
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(k, v) == 1 for k, v in _GLIBC_TUNING.items())
