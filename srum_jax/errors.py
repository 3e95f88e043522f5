"""User errors: a mistake in a config, a flag or an input file that the user fixes, not a bug.

The CLI prints a `UserError` as one line on stderr and exits with code 2 (no traceback). The subclasses keep
the built-in exception a caller may already catch (a missing file is still a `FileNotFoundError`).
"""


class UserError(Exception):
  """A user's mistake, stated in one line that names the config key or file to fix."""


class UserValueError(UserError, ValueError):
  """A config value or file content that cannot work."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A file or directory the config names does not exist."""
