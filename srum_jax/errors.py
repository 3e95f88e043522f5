"""User errors: a mistake in a config, a flag or an input file that the user fixes, not a bug.

The CLI prints a `UserError` as one line on stderr and exits with code 2 (no traceback). The subclasses keep
the built-in exception a caller may already catch (a missing file is still a `FileNotFoundError`).
An `OSError` the user fixes too (a folder where a file belongs or the reverse, a full disk, a
read-only folder) is stated the same way: `os_error_line` words it, naming the path.
"""
from __future__ import annotations

import errno
from typing import Optional


class UserError(Exception):
  """A user's mistake, stated in one line that names the config key or file to fix."""


class UserValueError(UserError, ValueError):
  """A config value or file content that cannot work."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A file or directory the config names does not exist."""


def one_line(e: BaseException) -> str:
  """The first line of an error's message with its whitespace flattened (the type's name when
  empty): a message whose later lines list details (every key of a damaged checkpoint) is stated by
  its first."""
  text = str(e).strip().split("\n", 1)[0].rstrip(":")
  return " ".join(text.split()) or type(e).__name__


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def os_error_line(e: OSError) -> Optional[str]:
  """One line for an `OSError` the user fixes (naming the path), or None for any other."""
  where = e.filename if e.filename is not None else "a file"
  if e.errno == errno.EISDIR:
    return f"{where} is a folder where a file is expected: move it away, or use another workdir"
  if e.errno in (errno.ENOTDIR, errno.EEXIST):
    return (f"{where}: a file is in the way where a folder is expected (or a folder path runs "
            f"through a file): move it away, or use another workdir")
  if e.errno in _FULL:
    return (f"{e.strerror} while writing {where}: free space (or raise the file size limit), then "
            f"run the same command again: it resumes")
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f"{e.strerror}: {where}: give this user write access, or use another workdir"
  return None
