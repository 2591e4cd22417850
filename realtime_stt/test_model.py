"""The model's memory: what it frees is kept for its next call, not page-faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from realtime_stt.model import MALLOC_ENVIRONMENT

# In a fresh process: import the model module (which tells glibc to keep freed memory, unless the
# environment sets a MALLOC_ tunable), then from another thread, as CTranslate2's workers do,
# allocate, fill and free a 64 MiB buffer twenty times (as the logits of a call), counting page faults.
FAULTS = """
import ctypes, json, resource, threading
import realtime_stt.model as model

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def calls():
    for _ in range(20):
        buffer = libc.malloc(64 << 20)
        libc.memset(buffer, 1, 64 << 20)
        libc.free(buffer)

thread = threading.Thread(target=calls)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread.start(); thread.join()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": model.FREED_MEMORY_KEPT, "faults": faults}))
"""
PAGES = (64 << 20) // 4096  # one buffer's pages


def faults(**environ: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(MALLOC_ENVIRONMENT)} | environ
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_buffer_freed_by_one_call_serves_the_next_without_page_faults():
    kept = faults()
    assert kept["kept"] is True
    assert kept["faults"] < 3 * PAGES, kept  # the first buffer's pages, then the same pages again
    left = faults(MALLOC_ARENA_MAX="0")  # an operator's own malloc settings are left alone
    assert left["kept"] is False
    assert left["faults"] > 10 * PAGES, left  # each call mapped and faulted in a new buffer
