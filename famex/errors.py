"""The one exception type famex raises for problems the user can fix.

The CLI prints its message (no traceback) and exits with code 2. Messages say what was wrong
and what to do, e.g. ``vocab size mismatch: teacher 49152, student 32000 — students must
share the teacher's tokenizer``.
"""


class FamexError(Exception):
    """A user-facing error: bad input, inconsistent arguments, corrupt files."""
