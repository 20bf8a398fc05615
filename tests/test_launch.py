"""The launcher's tcmalloc preload (rlhfkit/launch.py) and the `rlhfkit env` report."""

import os
import subprocess
import sys

import pytest

from rlhfkit.launch import TCMALLOC, tcmalloc_env


def test_tcmalloc_env_prepends_the_first_library_found(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    env = tcmalloc_env({"LD_PRELOAD": "/x/libother.so", "A": "1"}, [str(tmp_path / "no"), str(lib)])
    assert env["LD_PRELOAD"] == f"{lib} /x/libother.so"
    assert env["A"] == "1" and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert tcmalloc_env({}, [str(lib)])["LD_PRELOAD"] == str(lib)


def test_tcmalloc_env_does_nothing_when_off_preloaded_or_missing(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    assert tcmalloc_env({"RLHFKIT_TCMALLOC": "0"}, [str(lib)]) is None
    assert tcmalloc_env({"LD_PRELOAD": str(lib)}, [str(lib)]) is None  # ends the re-execution
    assert tcmalloc_env({}, [str(tmp_path / "missing.so")]) is None


def _allocator(**extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RLHFKIT_TCMALLOC")}
    out = subprocess.run(
        [sys.executable, "-m", "rlhfkit", "env"],
        env={**env, **extra},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split(": ", 1) for line in out.splitlines())["allocator"]


@pytest.mark.slow  # starts the `rlhfkit` command in a subprocess (~6 s)
def test_rlhfkit_command_preloads_tcmalloc_when_installed():
    installed = any(os.path.exists(p) for p in TCMALLOC)  # scripts/setup.sh installs it as root
    assert _allocator() == ("tcmalloc" if installed else "system")
    assert _allocator(RLHFKIT_TCMALLOC="0") == "system"


_MAPPED = """
import ctypes, torch
from rlhfkit.launch import tune_glibc_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                               "fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
tuned = tune_glibc_malloc()
x = torch.ones(25_000_000)  # 100 MB, alive
print(tuned, libc.mallinfo2().hblkhd)  # bytes glibc holds in mmap'd blocks
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_glibc_serves_large_tensors_from_the_heap_not_fresh_mmaps():
    """After ``tune_glibc_malloc`` a 100 MB tensor comes from glibc's heap (memory that stays
    with the process when freed); without it, from an mmap of its own that is unmapped at free
    and faulted in again by the next one. glibc's own count of mmap'd bytes (``mallinfo2``) tells
    which. Fresh processes without tcmalloc preloaded."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    runs = {}
    for tune in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", _MAPPED], env={**env, "RLHFKIT_MALLOC_TUNE": tune},
                             capture_output=True, text=True, check=True)  # fmt: skip
        tuned, mapped = out.stdout.split()
        runs[tune] = (tuned == "True", int(mapped))
    assert runs["1"][0] and runs["1"][1] < 50_000_000, runs
    assert not runs["0"][0] and runs["0"][1] >= 100_000_000, runs
