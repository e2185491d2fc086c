"""Symlink-safe file operations for every file the worker reads or writes.

The worker's directories may be writable by its own user while the worker
(or the daemon before it drops privileges) runs as root, and anything that
runs as that user can plant a symbolic link, a FIFO or a directory at a path
the worker uses.  So:

* a file is written as a new temp file in the same directory, opened with
  O_CREAT | O_EXCL | O_NOFOLLOW, and renamed into place (rename replaces a
  name, it never follows a link there);
* a file appended to (logs) is opened with O_NOFOLLOW | O_NONBLOCK and
  checked with fstat before the first byte is written; ownership is changed
  on the open descriptor (fchown), never by path;
* anything but a regular file at a worker path (a link, FIFO, socket,
  directory, device, or a file with other hard links) is refused with an
  OddFile naming the path; nothing is ever opened in a way that can wait
  (a FIFO without a writer would block a plain open() for ever).
"""
import errno
import os
import stat
import uuid

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


class OddFile(OSError):
    """Something other than a regular file where the worker keeps a file of its own."""

    def __init__(self, path, what):
        super().__init__(errno.EINVAL, f"{path} is {what}, not a regular file: refused")
        self.filename = path
        self.what = what

    def __str__(self):
        return self.strerror


def kind(mode):
    """'a FIFO', 'a directory', ... for a non-regular st_mode; None for a regular file."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "something else"


def _refuse_unless_regular(path, info):
    what = kind(info.st_mode)
    if what is not None:
        raise OddFile(path, what)
    if info.st_nlink > 1:
        raise OddFile(path, f"a file with {info.st_nlink} hard links")


def check(path):
    """lstat-only check (nothing opened): True if a regular file is there, False if nothing is.

    OddFile for anything else.  Used at start and by --check, where nothing
    may be opened or changed.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    _refuse_unless_regular(path, info)
    return True


def _open(path, flags, mode=0o600):
    """os.open that never follows a final link and never waits; fstat-checked."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as error:
        # ELOOP: a link (O_NOFOLLOW); ENXIO: a FIFO nobody reads, or a socket; EISDIR.
        if error.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EOPNOTSUPP):
            what = "a symbolic link" if error.errno == errno.ELOOP else "something else"
            try:
                what = kind(os.lstat(path).st_mode) or what
            except OSError:
                pass  # gone again: a link toggled there
            raise OddFile(path, what) from None
        raise
    try:
        _refuse_unless_regular(path, os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path, limit=None):
    """The file's bytes, or None when there is none; OddFile for anything odd."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as stream:
        return stream.read() if limit is None else stream.read(limit)


def open_append(path, mode=0o640, owner=None):
    """A descriptor for appending to `path` (created if missing); owner=(uid, gid) is set on it."""
    fd = _open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        if owner is not None:
            info = os.fstat(fd)
            if (info.st_uid, info.st_gid) != tuple(owner):
                os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomic(path, data, mode=0o644, owner=None, make_dir=None, durable=True):
    """Replace `path` with `data` (bytes): temp file + rename, never a partial file.

    `make_dir`: create the directory with this mode when missing.  A link,
    FIFO, directory... already at `path` is refused (OddFile), not replaced.
    """
    directory = os.path.dirname(path) or "."
    if make_dir is not None:
        os.makedirs(directory, mode=make_dir, exist_ok=True)
    check(path)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as stream:
            os.fchmod(fd, mode)  # whatever the umask
            if owner is not None:
                os.fchown(fd, *owner)
            stream.write(data)
            stream.flush()
            if durable:
                os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    os.close(fd)
    try:
        check(path)  # planted while the temp file was written
        os.rename(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise
    if durable:
        sync_directory(directory)
    return path


def copy_atomic(source, target, mode=0o644, durable=True, make_dir=None):
    """`target` becomes a copy of `source` (both checked); False when there is no source."""
    data = read_bytes(source)
    if data is None:
        return False
    write_atomic(target, data, mode, durable=durable, make_dir=make_dir)
    return True


def rename(source, target):
    """rename(2) of a regular file of ours onto a name that holds nothing odd."""
    if not check(source):
        raise FileNotFoundError(errno.ENOENT, f"{source} does not exist", source)
    check(target)
    os.rename(source, target)


def unlink(path):
    """Remove a name (a planted link goes, its target stays); a directory is refused."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise OddFile(path, "a directory") from None
    except PermissionError:
        if os.path.isdir(path) and not os.path.islink(path):
            raise OddFile(path, "a directory") from None
        raise


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def sync_directory(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
