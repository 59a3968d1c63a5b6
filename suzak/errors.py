"""User-facing errors: anything a user can fix raises SuzakError with a message naming the fix.

The CLI (`suzak ...`) prints these as one clear line instead of a traceback.
"""


class SuzakError(Exception):
    """An error caused by input or setup the user can fix; the message says how."""
