"""Resident memory of a job's processes, for per-job memory limits.

Limits are enforced by sampling, not by rlimits: macOS accepts RLIMIT_AS and
RLIMIT_RSS and enforces neither, and RLIMIT_AS counts address space that a
numpy import reserves but never touches. The supervisor samples the worker
and all its descendants (the job's child processes and their children), so
memory a job moves into a subprocess counts too.
"""

from __future__ import annotations

import psutil

MIB = 1024 * 1024


def tree_rss(pid: int) -> int | None:
    """Return the resident bytes of process ``pid`` and its descendants, or None if it is gone.

    Processes that exit while being read are left out. Shared pages count
    once per process, so a tree that shares much memory (children forked
    from the worker) reads larger than it is. The limit thus errs towards
    stopping a job early rather than letting the machine swap.
    """
    try:
        root = psutil.Process(pid)
        total = root.memory_info().rss
        children = root.children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total
