"""One error type for everything a user can fix.

Entry scripts catch `UserError` and print its message as a single line (no traceback)
with a non-zero exit; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""
