#!/usr/bin/env python3
"""A FUSE stand-in for an NFS mount whose server stops answering.

    hang_fs.py BACKING MOUNTPOINT CONTROL

Mirrors BACKING at MOUNTPOINT (a loopback filesystem). While the file
CONTROL exists, every operation blocks (as on a dead NFS server, a hard
mount) until CONTROL is removed. Runs in the foreground until unmounted or
killed. Needs mfusepy (libfuse 3) or fusepy (libfuse 2).
"""

import errno
import os
import sys
import time

try:
    import mfusepy as fuse
except ImportError:  # pragma: no cover
    import fuse  # fusepy

BACKING, MOUNTPOINT, CONTROL = sys.argv[1:4]


def held():
    # Bounded: a test that forgets to release is ended by its own cleanup
    # (which kills this process) long before this gives up.
    for _ in range(36000):
        if not os.path.exists(CONTROL):
            return
        time.sleep(0.1)


def mirrored(paths):
    """Wraps an operation: waits while held, and maps its first `paths`
    arguments (mount paths) onto BACKING. Nothing outside BACKING is ever
    touched."""

    def wrap(f):
        def op(self, *args):
            held()
            args = [BACKING + a if i < paths else a for i, a in enumerate(args)]
            return f(self, *args)

        op.__name__ = f.__name__
        return op

    return wrap


class Loopback(fuse.Operations):
    use_ns = True

    @mirrored(1)
    def access(self, path, mode):
        if not os.access(path, mode):
            raise fuse.FuseOSError(errno.EACCES)

    @mirrored(1)
    def getattr(self, path, fh=None):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise fuse.FuseOSError(errno.ENOENT)
        out = {
            k: getattr(st, k)
            for k in ("st_gid", "st_mode", "st_nlink", "st_size", "st_uid")
        }
        for k in ("st_atime", "st_ctime", "st_mtime"):
            out[k] = getattr(st, k + "_ns")
        return out

    @mirrored(1)
    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(path)

    @mirrored(1)
    def open(self, path, flags):
        return os.open(path, flags)

    @mirrored(1)
    def create(self, path, mode, fi=None):
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

    @mirrored(0)
    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    @mirrored(0)
    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    @mirrored(1)
    def truncate(self, path, length, fh=None):
        os.truncate(path, length)

    @mirrored(0)
    def flush(self, path, fh):
        return 0

    @mirrored(0)
    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    @mirrored(0)
    def release(self, path, fh):
        os.close(fh)
        return 0

    @mirrored(1)
    def mkdir(self, path, mode):
        os.mkdir(path, mode)

    @mirrored(1)
    def rmdir(self, path):
        os.rmdir(path)

    @mirrored(1)
    def unlink(self, path):
        os.unlink(path)

    @mirrored(2)
    def rename(self, old, new):
        os.rename(old, new)

    @mirrored(2)
    def link(self, target, source):
        os.link(source, target)

    @mirrored(1)
    def utimens(self, path, times=None):
        os.utime(path, ns=times) if times else os.utime(path)

    @mirrored(1)
    def chmod(self, path, mode):
        os.chmod(path, mode)

    @mirrored(1)
    def statfs(self, path):
        st = os.statvfs(path)
        return {
            k: getattr(st, k)
            for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax",
            )
        }


if __name__ == "__main__":
    BACKING = os.path.realpath(BACKING)
    assert os.path.isdir(BACKING) and BACKING != "/", BACKING
    fuse.FUSE(Loopback(), MOUNTPOINT, foreground=True)
