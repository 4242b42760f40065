"""One error type for everything a user can fix.

Entry scripts catch `UserError` and print its message as a single line (no traceback)
with a non-zero exit; anything else is a bug and keeps its traceback.
"""


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
