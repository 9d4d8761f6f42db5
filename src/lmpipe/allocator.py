"""Host memory allocator settings for a training stage's process (`lmpipe.stage.run`).

PyTorch's CPU allocator is the C library's `malloc`. glibc serves blocks above its mmap
threshold (128 KiB at first, raised as such blocks are freed, up to 32 MiB) with fresh `mmap`
calls and hands them back to the kernel on `free`, so every activation, gradient and logits
tensor of a training step comes back as new pages, each faulted in and zeroed by the kernel.
`keep_freed_memory` makes glibc keep freed blocks in its heap for the next step instead, as
PyTorch's CUDA caching allocator does on a GPU: a process then holds its peak host memory until
it ends. It changes no result (the same bytes land in other addresses).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 1 << 30
"""Blocks below 1 GiB come from the heap; larger ones are still mapped and unmapped each time."""

ENV = "LMPIPE_MALLOC"
"""`LMPIPE_MALLOC=default` leaves the C library's allocator as it is."""


def keep_freed_memory(env: dict[str, str] | None = None) -> bool:
    """Keep freed host memory for reuse (glibc on Linux); True where the setting was applied.
    No-op elsewhere (other C libraries, macOS, Windows) and under `LMPIPE_MALLOC=default`."""
    env = os.environ if env is None else env
    choice = env.get(ENV, "keep").strip().lower()
    if choice not in ("keep", "default"):
        raise ValueError(f"{ENV}={choice!r}: use keep (the default) or default")
    if choice == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # a fixed threshold turns glibc's adaptive one off; freed heap memory is never trimmed
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    )
