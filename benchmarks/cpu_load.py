"""Run a command beside N CPU-bound worker processes: the test suite on a loaded machine.

    python benchmarks/cpu_load.py [-n 2] -- python -m pytest -p no:cacheprovider -q

Each worker is a pure-Python busy loop in its own process (no I/O, no memory growth), so N
workers take N cores away from the command, as a busy CI runner or a build beside it would.
Tests that assume progress within a fixed time fail here; tests that wait for events only
get slower. Prints the command's wall time and exit code on stderr and exits with that code.
The workers are killed at the end, also on Ctrl-C or SIGTERM, and end by themselves if this
script is killed outright (they watch their parent).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import signal
import subprocess
import sys
import time


def burn(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    x = 0
    while True:
        for _ in range(1_000_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        if os.getppid() != parent:  # the parent was killed without cleaning up
            return


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--workers", type=int, default=2, help="busy worker processes (default 2)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --")

    signal.signal(signal.SIGTERM, _terminated)
    workers = [mp.Process(target=burn, args=(os.getpid(),), daemon=True) for _ in range(args.workers)]
    proc, code = None, 1
    t0 = time.monotonic()
    try:
        for w in workers:
            w.start()
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the command got the same Ctrl-C: let it finish its own cleanup
            code = proc.wait()
    finally:
        for w in workers:
            if w.pid is not None:
                w.kill()
        for w in workers:
            if w.pid is not None:
                w.join()
        if proc is not None and proc.poll() is None:  # SIGTERM, or a second Ctrl-C
            proc.terminate()
            proc.wait()
        wall = time.monotonic() - t0
        load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"cpu_load: {shlex.join(cmd)} beside {args.workers} busy workers on {os.cpu_count()} cores: "
              f"exit code {proc.returncode if proc is not None else None}, wall time {wall:.1f} s "
              f"(load average {load})", file=sys.stderr)
    return 128 - code if code < 0 else code  # killed by signal N: exit 128 + N, as shells do


if __name__ == "__main__":
    sys.exit(main())
