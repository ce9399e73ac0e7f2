"""Where outputs go, checked before the work that produces them starts, and files written
atomically there.

A training run, a folder of predictions or an export that fails at its first write (the
folder is read-only, ``--out`` names an existing file, ...) would otherwise lose all the
work done before it. Both checks raise ``ValueError`` naming ``arg`` (an argument, or the
CLI's flag) and the path; the CLI turns that into a one-line message and exit code 2.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from typing import Iterator, Optional


def _path(path, arg: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{arg}: expected a path, got {path!r}")
    return os.fspath(path)


def _dir_problem(path: str, create: bool = True) -> Optional[str]:
    """Why ``path`` cannot be a folder to write into (created, with its parents, if missing
    and ``create``), or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path!r} is an existing file, not a folder"
    if not create and not os.path.exists(path):
        return f"the folder {path!r} does not exist"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder {path!r} ({exc.strerror or exc})"
    # Writing is the only reliable test: permission bits say nothing for root, nor for a
    # read-only filesystem or mount.
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"cannot write into the folder {path!r} ({exc.strerror or exc})"
    return None


def output_dir(path, arg: str) -> str:
    """Makes sure ``path`` is a folder this process can write into: created (with its
    parents) if missing; an existing file or an unwritable folder is an error. Returns it."""
    path = _path(path, arg)
    problem = _dir_problem(path)
    if problem:
        raise ValueError(f"{arg}: {problem}")
    return path


def output_file(path, arg: str) -> str:
    """Makes sure ``path`` can be written as a file: not a folder, its folder writable (and
    created if missing), an existing file writable. Returns it (nothing is written there)."""
    path = _path(path, arg)
    if os.path.isdir(path):
        raise ValueError(f"{arg}: {path!r} is an existing folder, not a file")
    problem = _dir_problem(os.path.dirname(os.path.abspath(path)))
    if problem is None and os.path.exists(path) and not os.access(path, os.W_OK):
        problem = "permission denied"
    if problem:
        raise ValueError(f"{arg}: cannot write {path!r}: {problem}")
    return path


@contextlib.contextmanager
def atomic_write(path: str, arg: str = "path") -> Iterator[str]:
    """Yields a temporary path beside ``path`` to write; when the block ends normally the
    file replaces ``path`` (``os.replace``: atomic on one filesystem), on any exception,
    KeyboardInterrupt included, it is removed. A reader (or a crash) never sees a torn file.

    The file gets the mode of any other output: 0o666 narrowed by the process's umask
    (``tempfile.mkstemp`` and safetensors' ``save_file`` make it 0o600). The temporary file
    has a name of its own, so that concurrent writers of one path do not write into each
    other's file. A path that cannot be written (a folder, a missing or unwritable folder:
    creating the temporary file is the write test) raises ValueError naming ``arg`` before
    anything is written. An existing read-only file is replaced, as ``os.replace`` allows."""
    path = _path(path, arg)
    if os.path.isdir(path):
        raise ValueError(f"{arg}: {path!r} is an existing folder, not a file")
    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{arg}: cannot write {path!r}: {_dir_problem(directory, create=False)}")
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise ValueError(f"{arg}: cannot write {path!r} ({exc.strerror})") from None
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0o666 & ~umask, without os.umask's process-wide swap
        yield tmp
        os.chmod(tmp, mode)  # the writer may have replaced the file with one of its own mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
