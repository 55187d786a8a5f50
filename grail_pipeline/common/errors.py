"""The one exception type for mistakes a user can fix (bad flags, missing files, broken wallets).

The command line turns it into one clear line on stderr and exit code 2, never a traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""
