"""Named kill points, for the tests that prove a killed run resumes to the same bytes.

`GRAPHBUILD_KILL_AT=name` (or `name@n`) makes the process SIGKILL itself the first (n-th)
time it reaches `kill_point(name)`: no cleanup, no finally blocks, as with the OOM killer or
a preempted node. Unset, as it always is outside the tests, a kill point is one comparison.

`GRAPHBUILD_KILL_AT=zarr.mid_write@n` kills halfway through writing the bytes of the n-th
Zarr file the process writes (a chunk or the store's metadata).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("GRAPHBUILD_KILL_AT", "")
_NAME, _, _NTH = _SPEC.partition("@")
_count = 0


def kill_point(name: str) -> None:
    global _count
    if name != _NAME:
        return
    _count += 1
    if _count == int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _patch_zarr_writes() -> None:
    """Kill halfway through a Zarr file write, inside zarr's own temp-and-rename."""
    import zarr.storage._local as local

    class HalfThenDie:
        def __init__(self, f):
            self.f = f

        def write(self, view) -> int:
            view = memoryview(view).cast("B")
            self.f.write(view[: len(view) // 2])
            self.f.flush()
            kill_point("zarr.mid_write")
            return self.f.write(view[len(view) // 2:]) + len(view) // 2

    atomic_write = local._atomic_write

    def wrapped(path, mode, exclusive=False):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            with atomic_write(path, mode, exclusive) as f:
                yield HalfThenDie(f)
        return ctx()

    local._atomic_write = wrapped


if _NAME == "zarr.mid_write":
    _patch_zarr_writes()
