"""One check shared by every reader that opens a user's file: it must be a regular file.

Opening a FIFO blocks until someone writes to it (forever, in practice) and a character device such as
``/dev/zero`` never ends, so a path is checked with ``os.stat`` -- which never blocks -- before anything opens
it. The lowest layer holds it so that model cards (core), training data (models) and plugins (through
``restoreflow.plugin_api``) refuse such paths with the same one line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from restoreflow.core.errors import InputError, RestoreflowError

__all__ = ["require_regular_file"]


def require_regular_file(path: str | os.PathLike, what: str,
                         error: type[RestoreflowError] = InputError) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed) when it is a regular file; otherwise ``error`` with one line
    naming ``what`` and ``path``: missing, a folder, or a FIFO, socket or device (never opened)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist") from None
    except OSError as e:  # a symlink loop, a name too long, no permission to look
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {p} is not a regular file (a FIFO, socket or device); it was not opened")
    return st
