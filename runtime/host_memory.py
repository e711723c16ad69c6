"""Zeroing a LiteRT TensorBuffer by giving its pages back to the OS; the process's peak RSS.

A KV cache must start as zeros, but writing zeros makes every page resident: a 32k-token
cache would cost its full size at load whatever it holds. On Linux, ``madvise(MADV_DONTNEED)``
on private anonymous memory (all heap and malloc'd memory) drops the pages, and the next
touch of each maps a fresh zero page: reading an unwritten slot costs nothing, writing a
token costs its page. Only whole pages are dropped; the partial pages at either end are
cleared with memset. The buffer's address comes from LiteRT's C API
(``LiteRtGetTensorBufferHostMemory``) on the capsule the Python API exposes, and is checked
once per buffer by a round trip through the Python API; where any of that is unavailable
(another OS, another LiteRT build) the buffer is written with zeros instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

MADV_DONTNEED = 4  # Linux: the next access of a dropped private anonymous page reads zeros
_PROBE = np.array([1.25, -2.5, 3.75, -4.125], np.float32)  # 16 bytes a cleared buffer cannot hold


def _api():
    """(LiteRtGetTensorBufferHostMemory, libc.madvise, PyCapsule helpers) or None."""
    if getattr(_api, "cached", False) is not False:
        return _api.cached
    _api.cached = None
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ai_edge_litert

        lib = ctypes.CDLL(os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so"))
        host = lib.LiteRtGetTensorBufferHostMemory
        host.argtypes, host.restype = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        name = ctypes.pythonapi.PyCapsule_GetName
        name.argtypes, name.restype = [ctypes.py_object], ctypes.c_char_p
        pointer = ctypes.pythonapi.PyCapsule_GetPointer
        pointer.argtypes, pointer.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_void_p
    except (OSError, AttributeError, ImportError):
        return None
    _api.cached = (host, madvise, name, pointer)
    return _api.cached


def address(buf, nbytes: int) -> int | None:
    """The host address of TensorBuffer ``buf`` (``nbytes`` long), checked by writing a probe
    there and reading it back through the Python API; None if it cannot be had or checked."""
    api = _api()
    if api is None or nbytes < _PROBE.nbytes:
        return None
    host, _, name, pointer = api
    try:
        cap = buf.capsule
        handle = pointer(cap, name(cap))
        addr = ctypes.c_void_p()
        if not handle or host(handle, ctypes.byref(addr)) != 0 or not addr.value:
            return None
        ctypes.memmove(addr.value, _PROBE.ctypes.data, _PROBE.nbytes)
        ok = np.array_equal(buf.read(_PROBE.size, np.float32), _PROBE)
    except Exception:  # an API that changed shape: fall back to writing zeros
        return None
    return addr.value if ok else None


def zero(buf, shape) -> int | None:
    """Fill float32 TensorBuffer ``buf`` of ``shape`` with zeros, releasing its whole pages.
    Returns the buffer's address for ``release``, or None (it was written with zeros)."""
    nbytes = int(np.prod(shape)) * 4
    addr = address(buf, nbytes)
    if addr is None:
        buf.write(np.zeros(shape, np.float32))
        return None
    lo, hi = _pages(addr, addr + nbytes)
    if hi <= lo:
        ctypes.memset(addr, 0, nbytes)
        return addr
    ctypes.memset(addr, 0, lo - addr)
    ctypes.memset(hi, 0, addr + nbytes - hi)
    if _api()[1](lo, hi - lo, MADV_DONTNEED) != 0:  # e.g. locked memory: clear it by hand
        ctypes.memset(lo, 0, hi - lo)
    return addr


def _pages(start: int, end: int) -> tuple[int, int]:
    """The whole pages inside [start, end)."""
    page = mmap.PAGESIZE
    return -(-start // page) * page, end // page * page


def release(start: int, end: int) -> int:
    """Give back the whole pages inside [start, end) of a buffer ``zero`` found the address of:
    they read as zeros from now on (the partial pages at either end keep their bytes). For data
    that is dead, such as keys that left a sliding window. Returns the bytes released."""
    lo, hi = _pages(start, end)
    if hi <= lo or _api()[1](lo, hi - lo, MADV_DONTNEED) != 0:
        return 0
    return hi - lo


def drop_file_pages(*paths: str, folders: tuple = ()) -> dict[str, int]:
    """Take this process's resident pages of the files at ``paths``, and of every file under the
    ``folders``, out of its memory, where the file is mapped read-only (as LiteRT maps a model,
    and the loader maps a library's code): the pages stay in the OS's page cache, and a later
    read of one maps it again from there. For what a load reads once, such as an int4 file's
    block scales, which XNNPACK checks in every signature at each load but then reads from its
    packed copy, or the code that parsed and compiled the graph. A mapping that was ever
    writable and holds private copies of pages (a library's relocated data) is left alone:
    dropping those would lose what was written. One pass over ``/proc/self/smaps`` (4.5 ms with
    the 270M's weight cache mapped, most of it the kernel counting that mapping's pages).
    Returns the bytes each path and folder had resident in the mappings dropped (0 where /proc
    or madvise is not available)."""
    dropped = dict.fromkeys([*paths, *folders], 0)
    if not sys.platform.startswith("linux"):
        return dropped
    exact = {os.path.realpath(p): p for p in paths}
    under = [(os.path.realpath(f).rstrip(os.sep) + os.sep, f) for f in folders]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except (OSError, AttributeError):
        return dropped
    mappings, current = [], None  # (start, end, the path or folder asked for, fields of smaps)
    for line in lines:
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
            current = None
            name = head[5] if len(head) == 6 else ""
            key = exact.get(name) or next((f for prefix, f in under if name.startswith(prefix)), None)
            if name and key is not None and "w" not in head[1]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                current = (lo, hi, key, {})
                mappings.append(current)
        elif current is not None and len(head) >= 2 and head[0].endswith(":"):
            current[3][head[0][:-1]] = head[1]
    for lo, hi, key, fields in mappings:
        if fields.get("Anonymous", "0") != "0":  # private copies of pages: written once
            continue
        if madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            dropped[key] += int(fields.get("Rss", "0")) * 1024
    return dropped


def trim() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere): after
    a large, short-lived allocation, as SentencePiece's parse of a tokenizer the compact vocabulary
    replaces (about 40 MB freed in its thread's arena, which free() alone does not return)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux, whose count starts at this
    program's exec. ``ru_maxrss`` is the fallback elsewhere; on Linux it also carries the
    parent's RSS at the fork (kept across exec), so a benchmark started by a process holding a
    model would report that model's size at least."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB elsewhere
