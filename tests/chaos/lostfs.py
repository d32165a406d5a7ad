"""A lost-write filesystem for tests: FUSE over a real directory that forgets what was never fsync'd.

Every operation goes through to the backing directory at once (readers see it, as they would see the
page cache), and the filesystem keeps what it needs to undo it. A *power cut* (`LostMount.cut`) kills
nothing itself (the caller kills its processes first, as the power would), unmounts, and reverts the
backing directory to what a disk would hold:

- file data written since the file's last `fsync`/`fdatasync` is gone (the file's bytes and size go
  back to what they were at that fsync; a file never fsync'd is empty);
- a name created, removed or renamed in a directory is durable only once that directory is fsync'd
  (POSIX; ext4's journal often makes such an entry durable sooner, so this is the strict reading). The
  namespace changes are kept per directory in order, and an fsync of a directory makes its changes
  durable together with every earlier change of the directories those touched, so what is undone is
  always a suffix that can be undone in reverse;
- a folder whose own creation is undone is gone with everything in it.

Two modes: ``drop`` undoes everything not synced (the pessimistic disk); ``random`` (seeded) keeps a
random prefix of the unsynced namespace changes (the journal committed them on its own) and, per file,
keeps all, none or a prefix of its unsynced bytes, or leaves its unsynced tail as zeros (a torn
write). So "a rename without a directory fsync may go either way".

Faults: rules (`Fault`) make chosen operations on chosen paths fail with EIO or ENOSPC (the nth call,
or every call). An fsync that fails with EIO "loses" the data written since the last good fsync at
the next cut, even if a later fsync succeeds (Linux marks the pages clean after a failed writeback),
unless those bytes are written again and fsync'd.

What it proves: that the code fsyncs each file and each directory before it relies on it (acknowledges
a write, publishes a pointer), and that it reads back what a disk may legally hold after a crash. What
it does not prove: the disk's own honesty (a drive that lies about flushes), block-level tearing inside
one write() other than at its tail, mmap'd writes (`msync`; nothing here writes through mmap), hard
links and symlinks (refused), or timing: the cut happens between operations, after the caller's
processes are dead, never inside a syscall.

Run as a script it is the daemon: ``python lostfs.py BACKING MOUNTPOINT CONTROL_SOCKET REPORT``.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HIDDEN = ".lostfs"  # inside the backing directory: unlinked files wait here until their removal is durable
MODES = ("drop", "random")
# what op="*" matches: every call that changes the disk (the machine "dies" at the first that fails)
MUTATING = frozenset({"write", "fsync", "fsyncdir", "create", "rename", "truncate", "mkdir", "unlink"})


@dataclass
class Fault:
    """Fail `op` ("write", "fsync", "fsyncdir", "create", "rename", "truncate", "mkdir", "unlink", "open", or
    "*" for every one of those but "open")
    on paths matching `path` (fnmatch on the path inside the mount, e.g. "*/live.log") with `error`
    ("EIO" or "ENOSPC"), after letting `after` matching calls pass, `times` times (0: every call)."""

    op: str
    path: str = "*"
    error: str = "EIO"
    after: int = 0
    times: int = 1
    seen: int = 0
    fired: int = 0


@dataclass
class _Data:
    """What to undo in one file's bytes: its size at the last fsync and the old bytes overwritten since."""

    durable_size: int
    old: list[tuple[int, bytes]] = field(default_factory=list)  # (offset, bytes before the write), in order
    written: list[tuple[int, int]] = field(default_factory=list)  # [start, end) written since the fsync


@dataclass
class _Op:
    kind: str  # create, mkdir, unlink, rmdir, rename
    dirs: set[int]  # inodes of the directories whose entries it changes
    path: str
    new: str = ""  # rename: the new path
    trash: str = ""  # backing path of what it removed (unlink, rmdir, rename over a name)


class LostFS:
    """The FUSE operations (mfusepy): a pass-through to `root` that records what a cut must undo."""

    use_ns = True

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.trash_dir = os.path.join(self.root, HIDDEN)
        shutil.rmtree(self.trash_dir, ignore_errors=True)
        os.mkdir(self.trash_dir)
        self.lock = threading.RLock()
        self.ops: list[_Op] = []
        self.data: dict[int, _Data] = {}
        self.lost: dict[int, list[tuple[int, int]]] = {}  # inode -> ranges a failed fsync lost
        self.faults: list[Fault] = []
        self.counts = {"write": 0, "fsync": 0, "fsyncdir": 0, "namespace": 0}
        self._trash_seq = 0

    # ---- helpers ---------------------------------------------------------------------------------
    def _b(self, path: str) -> str:
        if path == f"/{HIDDEN}" or path.startswith(f"/{HIDDEN}/"):
            raise OSError(errno.ENOENT, "hidden")
        return self.root + path

    def _ino(self, path: str) -> int:
        return os.lstat(self._b(path)).st_ino

    def _parent(self, path: str) -> int:
        return self._ino(os.path.dirname(path) or "/")

    def _fault(self, op: str, path: str) -> None:
        for f in self.faults:
            if (f.op == op or (f.op == "*" and op in MUTATING)) and fnmatch.fnmatch(path, f.path):
                f.seen += 1
                if f.seen > f.after and (f.times == 0 or f.fired < f.times):
                    f.fired += 1
                    raise OSError(getattr(errno, f.error), f"injected {f.error} on {op} {path}")

    def _to_trash(self, backing: str) -> str:
        self._trash_seq += 1
        dest = os.path.join(self.trash_dir, str(self._trash_seq))
        os.rename(backing, dest)
        return dest

    def _data(self, ino: int, size: int) -> _Data:
        if ino not in self.data:
            self.data[ino] = _Data(durable_size=size)
        return self.data[ino]

    def _save_old(self, fd: int, ino: int, offset: int, end: int) -> None:
        """Before bytes [offset, end) change: keep what a cut must restore (only bytes that were durable)."""
        d = self._data(ino, os.fstat(fd).st_size)
        hi = min(end, d.durable_size)
        if offset < hi:
            d.old.append((offset, os.pread(fd, hi - offset, offset)))
        d.written.append((offset, end))

    # ---- reading ---------------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._b(path))
        out = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_ino")}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def access(self, path: str, amode: int) -> int:
        os.lstat(self._b(path))
        return 0

    def opendir(self, path: str) -> int:
        os.lstat(self._b(path))
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        names = [n for n in os.listdir(self._b(path)) if not (path == "/" and n == HIDDEN)]
        return [".", "..", *names]

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                                            "f_files", "f_flag", "f_frsize", "f_namemax")}

    def open(self, path: str, flags: int) -> int:
        self._fault("open", path)
        with self.lock:
            # O_APPEND stays with the kernel (it sends the offset); pwrite on an O_APPEND fd would ignore it
            fd = os.open(self._b(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND))
            if flags & os.O_TRUNC:
                st = os.fstat(fd)
                self._save_old(fd, st.st_ino, 0, st.st_size)
                os.ftruncate(fd, 0)
            return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    # ---- file data -------------------------------------------------------------------------------
    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        self._fault("create", path)
        with self.lock:
            fd = os.open(self._b(path), (flags | os.O_CREAT | os.O_EXCL) & ~(os.O_TRUNC | os.O_APPEND), mode)
            ino = os.fstat(fd).st_ino
            self.data[ino] = _Data(durable_size=0)  # a new file (an inode number may be reused)
            self.lost.pop(ino, None)
            self.ops.append(_Op("create", {self._parent(path)}, path))
            self.counts["namespace"] += 1
            return fd

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._fault("write", path)
        with self.lock:
            self._save_old(fh, os.fstat(fh).st_ino, offset, offset + len(data))
            self.counts["write"] += 1
            return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._fault("truncate", path)
        with self.lock:
            fd = fh if fh is not None else os.open(self._b(path), os.O_RDWR)
            try:
                st = os.fstat(fd)
                self._save_old(fd, st.st_ino, min(length, st.st_size), max(length, st.st_size))
                os.ftruncate(fd, length)
                self.lost[st.st_ino] = [(a, min(b, length)) for a, b in self.lost.get(st.st_ino, []) if a < length]
            finally:
                if fh is None:
                    os.close(fd)
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.lock:
            ino = os.fstat(fh).st_ino
            try:
                self._fault("fsync", path)
            except OSError as e:
                d = self.data.pop(ino, None)  # the kernel marks the pages clean: they are lost, yet readable
                if e.errno == errno.EIO and d is not None:
                    self.lost.setdefault(ino, []).extend(d.written)
                    self.data[ino] = _Data(durable_size=os.fstat(fh).st_size)
                else:
                    self.data[ino] = d if d is not None else _Data(os.fstat(fh).st_size)
                raise
            os.fsync(fh)
            d = self.data.pop(ino, None)
            if d is not None and ino in self.lost:  # rewritten and synced: no longer lost
                self.lost[ino] = _subtract(self.lost[ino], d.written)
            self.counts["fsync"] += 1
            return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._b(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._b(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._b(path), ns=times) if times else os.utime(self._b(path))
        return 0

    # ---- the namespace ---------------------------------------------------------------------------
    def mkdir(self, path: str, mode: int) -> int:
        self._fault("mkdir", path)
        with self.lock:
            os.mkdir(self._b(path), mode)
            self.ops.append(_Op("mkdir", {self._parent(path)}, path))
            self.counts["namespace"] += 1
            return 0

    def unlink(self, path: str) -> int:
        self._fault("unlink", path)
        with self.lock:
            parent = self._parent(path)
            self.ops.append(_Op("unlink", {parent}, path, trash=self._to_trash(self._b(path))))
            self.counts["namespace"] += 1
            return 0

    def rmdir(self, path: str) -> int:
        self._fault("unlink", path)
        with self.lock:
            if os.listdir(self._b(path)):
                raise OSError(errno.ENOTEMPTY, path)
            parent = self._parent(path)
            self.ops.append(_Op("rmdir", {parent}, path, trash=self._to_trash(self._b(path))))
            self.counts["namespace"] += 1
            return 0

    def rename(self, old: str, new: str) -> int:
        self._fault("rename", new)
        with self.lock:
            dirs = {self._parent(old), self._parent(new)}
            src = os.lstat(self._b(old))
            trash = ""
            if os.path.lexists(self._b(new)):
                dst = os.lstat(self._b(new))
                if stat.S_ISDIR(dst.st_mode) and (not stat.S_ISDIR(src.st_mode) or os.listdir(self._b(new))):
                    raise OSError(errno.ENOTEMPTY if stat.S_ISDIR(src.st_mode) else errno.EISDIR, new)
                trash = self._to_trash(self._b(new))
            os.rename(self._b(old), self._b(new))
            self.ops.append(_Op("rename", dirs, old, new=new, trash=trash))
            self.counts["namespace"] += 1
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self._fault("fsyncdir", path)
        with self.lock:
            self._commit_dirs({self._ino(path)})
            self.counts["fsyncdir"] += 1
            return 0

    def symlink(self, target: str, source: str) -> int:
        raise OSError(errno.EPERM, "lostfs does not model symlinks")

    def link(self, target: str, source: str) -> int:
        raise OSError(errno.EPERM, "lostfs does not model hard links")

    def _commit_dirs(self, dirs: set[int]) -> None:
        """Make durable every change of `dirs`, and every earlier change of the directories those touch."""
        last = -1
        for i, op in enumerate(self.ops):
            if op.dirs & dirs:
                last = i
        while True:  # closure: everything before `last` that shares a directory with a committed change
            grown = set(dirs)
            for op in self.ops[: last + 1]:
                if op.dirs & grown:
                    grown |= op.dirs
            if grown == dirs:
                break
            dirs = grown
        keep = []
        for i, op in enumerate(self.ops):
            if i <= last and op.dirs & dirs:
                self._finish(op)
            else:
                keep.append(op)
        self.ops = keep

    def _finish(self, op: _Op) -> None:
        """A change became durable: what it removed is gone for good."""
        if op.trash:
            ino = os.lstat(op.trash).st_ino
            shutil.rmtree(op.trash) if os.path.isdir(op.trash) else os.unlink(op.trash)
            self.data.pop(ino, None)
            self.lost.pop(ino, None)

    # ---- the cut ---------------------------------------------------------------------------------
    def power_cut(self, mode: str, seed: int) -> dict[str, Any]:
        """Revert the backing directory to what the disk holds (called after the unmount)."""
        rng = random.Random(seed)
        kept_ops = rng.randint(0, len(self.ops)) if mode == "random" else 0
        for op in self.ops[:kept_ops]:
            self._finish(op)
        undone = self.ops[kept_ops:]
        for op in reversed(undone):
            self._undo(op)
        self.ops = []
        paths = _inodes(self.root)
        report: dict[str, Any] = {"mode": mode, "seed": seed, "ops_kept": kept_ops, "ops_undone": len(undone),
                                  "undone": [f"{o.kind} {o.path}{' -> ' + o.new if o.new else ''}" for o in undone],
                                  "files_reverted": [], "bytes_dropped": 0, "counts": self.counts}
        for ino in sorted(set(self.data) | set(self.lost)):
            path = paths.get(ino)
            if path is None:
                continue
            dropped = self._revert_file(path, self.data.get(ino), self.lost.get(ino, []), mode, rng)
            if dropped:
                report["files_reverted"].append(os.path.relpath(path, self.root))
                report["bytes_dropped"] += dropped
        shutil.rmtree(self.trash_dir, ignore_errors=True)
        return report

    def _undo(self, op: _Op) -> None:
        b = self.root + op.path
        if op.kind == "create":
            if os.path.lexists(b):
                os.unlink(b)
        elif op.kind == "mkdir":
            shutil.rmtree(b, ignore_errors=True)
        elif op.kind in ("unlink", "rmdir"):
            os.rename(op.trash, b)
        elif op.kind == "rename":
            os.rename(self.root + op.new, b)
            if op.trash:
                os.rename(op.trash, self.root + op.new)

    @staticmethod
    def _revert_file(path: str, d: _Data | None, lost: list[tuple[int, int]], mode: str, rng: random.Random) -> int:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            fate = rng.choice(("none", "all", "prefix", "zeros")) if mode == "random" and d is not None else "none"
            if d is not None and fate != "all":
                keep_to = d.durable_size
                if fate in ("prefix", "zeros") and size > d.durable_size:
                    keep_to = rng.randint(d.durable_size, size)
                for offset, old in reversed(d.old):
                    f.seek(offset)
                    f.write(old)
                if fate == "zeros":
                    f.seek(d.durable_size)
                    f.write(b"\0" * (keep_to - d.durable_size))
                f.truncate(keep_to)
            for a, b in lost:  # what a failed fsync lost: a hole where the file still reaches
                end = min(b, os.fstat(f.fileno()).st_size)
                if a < end:
                    f.seek(a)
                    f.write(b"\0" * (end - a))
            return max(0, size - os.fstat(f.fileno()).st_size) + sum(max(0, b - a) for a, b in lost)


def _subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = ranges
    for c, d in minus:
        nxt = []
        for a, b in out:
            if d <= a or b <= c:
                nxt.append((a, b))
                continue
            if a < c:
                nxt.append((a, c))
            if d < b:
                nxt.append((d, b))
        out = nxt
    return out


def _inodes(root: str) -> dict[int, str]:
    out = {}
    for folder, dirs, files in os.walk(root):
        if folder == root and HIDDEN in dirs:
            dirs.remove(HIDDEN)
        for name in files:
            p = os.path.join(folder, name)
            out[os.lstat(p).st_ino] = p
    return out


# ---- the daemon ----------------------------------------------------------------------------------
def _serve_control(fs: LostFS, sock_path: str, state: dict[str, Any]) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as stream:
            for line in stream:
                cmd = json.loads(line)
                with fs.lock:
                    if cmd["cmd"] == "faults":
                        fs.faults = [Fault(**r) for r in cmd["rules"]]
                        answer: Any = "ok"
                    elif cmd["cmd"] == "stats":
                        answer = {"faults": [asdict(f) for f in fs.faults], "pending_ops": len(fs.ops),
                                  "dirty_files": len(fs.data), "counts": fs.counts}
                    elif cmd["cmd"] == "cut":
                        state.update(cut=cmd["mode"], seed=cmd["seed"])
                        answer = "ok"
                    else:
                        answer = f"unknown command {cmd['cmd']!r}"
                stream.write(json.dumps(answer) + "\n")
                stream.flush()


def main(argv: list[str]) -> None:
    import mfusepy

    backing, mountpoint, sock_path, report_path = argv
    fs = LostFS(backing)
    state: dict[str, Any] = {"cut": None}
    threading.Thread(target=_serve_control, args=(fs, sock_path, state), daemon=True).start()

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        pass

    for name in ("getattr", "access", "opendir", "readdir", "releasedir", "statfs", "open", "read", "create",
                 "write", "truncate", "fsync", "flush", "release", "chmod", "chown", "utimens", "mkdir",
                 "unlink", "rmdir", "rename", "fsyncdir", "symlink", "link"):
        setattr(Ops, name, _errno_wrapped(getattr(fs, name)))
    Ops.use_ns = True

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            # ftruncate on an open file: by its handle (mfusepy drops it), since the name may be gone
            fh = fip.contents.fh if fip else None
            return int(self.operations.truncate(None if path is None else path.decode(), length, fh) or 0)

    # hard_remove: an unlink or a rename over an open file happens as on a disk (libfuse would otherwise
    # rename it to .fuse_hidden* first, a change a disk never makes); the open handle keeps the file.
    # Attribute and entry caches off: after a cut the kernel must ask again (the remount does too).
    Fuse(Ops(), mountpoint, foreground=True, nothreads=False, fsname="lostfs", hard_remove=True,
         attr_timeout=0, entry_timeout=0, negative_timeout=0)
    if state["cut"] is not None:
        report = fs.power_cut(state["cut"], state["seed"])
    else:  # a clean unmount: what was written stays (an orderly shutdown flushes everything)
        for op in fs.ops:
            fs._finish(op)
        shutil.rmtree(fs.trash_dir, ignore_errors=True)
        report = {"mode": "clean", "counts": fs.counts}
    Path(report_path).write_text(json.dumps(report))


def _errno_wrapped(method: Any) -> Any:
    """mfusepy wants FuseOSError; an OSError from the backing directory carries the right errno."""
    import mfusepy

    def call(self: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except OSError as e:
            raise mfusepy.FuseOSError(e.errno or errno.EIO) from None

    call.__name__ = method.__name__
    return call


# ---- the test's side ---------------------------------------------------------------------------
class LostMount:
    """A lost-write filesystem mounted at `mountpoint` over `backing`, run as a daemon process.

    The mountpoint and the backing directory must not be inside each other.
    """

    def __init__(self, backing: Path, mountpoint: Path, workdir: Path) -> None:
        self.backing, self.mountpoint, self.workdir = backing, mountpoint, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts = 0
        self.reports: list[dict[str, Any]] = []
        for p in (backing, mountpoint, workdir):
            p.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        self._sock = str(self.workdir / f"ctl-{self.cuts}.sock")
        self._report = self.workdir / f"report-{self.cuts}.json"
        for p in (Path(self._sock), self._report):
            p.unlink(missing_ok=True)
        self._log = self.workdir / "lostfs.log"
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.backing), str(self.mountpoint),
                                      self._sock, str(self._report)],
                                     stdout=self._log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (os.path.ismount(self.mountpoint) and os.path.exists(self._sock)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lostfs did not mount at {self.mountpoint}: {self._log.read_text()[-2000:]}")
            time.sleep(0.02)

    def _ask(self, cmd: dict[str, Any]) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self._sock)
            s.sendall((json.dumps(cmd) + "\n").encode())
            return json.loads(s.makefile().readline())

    def faults(self, rules: list[Fault]) -> None:
        """Replace the fault rules (an empty list clears them)."""
        self._ask({"cmd": "faults", "rules": [asdict(r) for r in rules]})

    def stats(self) -> dict[str, Any]:
        return dict(self._ask({"cmd": "stats"}))

    def cut(self, mode: str = "drop", seed: int = 0, remount: bool = True) -> dict[str, Any]:
        """Lose power: drop what was never synced (processes using the mount must be dead or closed)."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
        self._ask({"cmd": "cut", "mode": mode, "seed": seed})
        report = self._unmount()
        self.cuts += 1
        self.reports.append(report)
        if remount:
            self.mount()
        return report

    def unmount(self, lazy: bool = False) -> dict[str, Any]:
        """A clean unmount: everything written stays. `lazy`: detach even while files are still open."""
        return self._unmount(lazy)

    def _unmount(self, lazy: bool = False) -> dict[str, Any]:
        assert self.proc is not None
        for attempt in range(100):
            r = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True)
            if r.returncode == 0:
                break
            if lazy and attempt >= 10:  # detach, and stop the daemon (it would wait for the last close)
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=True)
                self.proc.kill()
                self.proc.wait(timeout=60)
                self.proc = None
                return {"mode": "lazy"}
            if "busy" not in r.stderr or attempt == 99:
                raise RuntimeError(f"fusermount3 -u {self.mountpoint}: {r.stderr.strip()} (a file or a memory "
                                   "map of this process or a child is still open)")
            time.sleep(0.05)  # a process that held a file open is still being reaped
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"lostfs exited {self.proc.returncode}: {self._log.read_text()[-3000:]}")
        self.proc = None
        return dict(json.loads(self._report.read_text()))


def prerequisites() -> str | None:
    """Why a lost-write filesystem cannot be mounted here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy cannot load libfuse3: {e} (pip install mfusepy; apt-get install fuse3)"
    return None


if __name__ == "__main__":
    main(sys.argv[1:])
