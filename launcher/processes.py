"""Child processes of the launcher: spawning, log forwarding, and stopping them.

Each child's stdout and stderr are merged and forwarded line by line, prefixed with the
child's name, by one reader thread; the last lines are kept so that a child's death can be
reported with what it said last.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

_TAIL_LINES = 40


class Child:
    """One supervised process."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], *,
                 raw_logs: bool) -> None:
        self.name = name
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._raw_logs = raw_logs
        self.process = subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
            preexec_fn=_detach_from_terminal_signals)
        self._reader = threading.Thread(target=self._forward, name=f"logs-{name}", daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self._tail.append(line)
            # JSON logs already carry the process and rank; keep each line one JSON object.
            sys.stderr.write(f"{line}\n" if self._raw_logs else f"[{self.name}] {line}\n")
            sys.stderr.flush()

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def last_lines(self) -> list[str]:
        self._reader.join(timeout=2.0)  # let the reader drain what the child wrote last
        return list(self._tail)

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True if the child has exited."""
        try:
            self.process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return False
        return True


_PR_SET_PDEATHSIG = 1


def _detach_from_terminal_signals() -> None:
    """Runs in the child before exec.

    A process group of its own keeps a terminal's Ctrl-C (sent to the whole foreground
    group) away from the child, so that the launcher alone decides the order of shutdown:
    router first, shards last. The parent-death signal stops the child if the launcher
    itself is killed outright.
    """
    os.setpgrp()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def stop_children(children: Sequence[Child], timeout_s: float) -> None:
    """SIGTERM the children, wait up to timeout_s for all of them, then SIGKILL the rest."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        if not child.wait(deadline - time.monotonic()):
            child.signal(signal.SIGKILL)
            child.wait(5.0)


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
