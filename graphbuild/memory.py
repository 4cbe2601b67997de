"""Giving freed memory back to the OS, so peak RSS tracks what is live."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """glibc's malloc_trim: hand the free parts of every malloc arena back to the OS.

    glibc keeps freed mid-sized blocks in its heaps (one heap per thread that allocated),
    so a big structure freed in pieces (a faiss index's lists, a chunk's activations in
    the encoder's threads) stays in RSS and the next allocation lands on top of it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
