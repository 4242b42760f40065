"""One error type for everything a user can fix, and how a stop request ends a command.

Entry scripts catch `UserError` and print its message as a single line (no traceback)
with a non-zero exit; anything else is a bug and keeps its traceback.

SIGTERM (what `ray job stop`, Kubernetes and `kill` send) ends a command the way Ctrl-C does: `Terminated`
is a KeyboardInterrupt, so every cleanup that runs on Ctrl-C (the lease released, Ray shut down, a stage's
temporaries left for the next run to sweep) runs on it too, and the command ends in one line, exit 143
(128 + 15, the shell's code for SIGTERM; Ctrl-C: 130).
"""

from __future__ import annotations

import signal
import threading


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""


def last_line(err: BaseException | str) -> str:
    """The useful line of an error (Ray wraps causes in long tracebacks)."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("File ", "^", "~", "During handling", "Traceback", "The above exception")):
            return ln[:400]
    return type(err).__name__ if not isinstance(err, str) else text[:400]


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM: stop as on Ctrl-C."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


_received = threading.Event()


def _on_sigterm(signum, frame) -> None:
    _received.set()  # Ray's ray.get turns any exception a handler raises into a plain KeyboardInterrupt
    raise Terminated()


def sigterm_received() -> bool:
    """Whether this process got SIGTERM (to tell a KeyboardInterrupt it caused from one Ctrl-C caused)."""
    return _received.is_set()


def stop_on_sigterm() -> None:
    """Make SIGTERM raise Terminated in the main thread. Called at a command's start and again after ray.init,
    which installs its own handler (sys.exit from wherever the main thread is: a stack dump, exit -6 or 15)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def stopping_on_sigterm() -> bool:
    return signal.getsignal(signal.SIGTERM) is _on_sigterm
