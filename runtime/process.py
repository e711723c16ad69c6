"""Processes: SIGTERM ends work the way Ctrl-C does, and child processes die with their parent.

A conversion interrupted by SIGTERM (a service manager, ``timeout``, ``kill``) must leave
what Ctrl-C leaves: nothing. ``terminate_as_interrupt`` makes SIGTERM raise ``Terminated``
(a KeyboardInterrupt, so every cleanup that handles Ctrl-C handles it too) for the rest of
a command-line tool's run. ``child_dies_with_parent`` is a ``preexec_fn`` that asks Linux to
SIGKILL a child (the TensorFlow graph converter) when its parent dies, even by SIGKILL.
"""

from __future__ import annotations

import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled as an interrupt. Command-line tools exit with 143 (128 + 15)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def terminate_as_interrupt() -> None:
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        pass


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return 143 if isinstance(interrupt, Terminated) else 130


def child_dies_with_parent() -> None:
    """preexec_fn: PR_SET_PDEATHSIG(SIGKILL) on Linux; nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
