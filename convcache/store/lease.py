"""One writer per store.

On a local disk: an advisory lock (flock) on `<store>.lock` beside the store. A second writer fails at
once with a one-line error and touches nothing; the lock dies with its process, so a killed writer
never leaves a stale lock.

On object storage there is no lock that dies with its holder, so the writer takes a *lease*: the
object `<store>.lock`, created only if absent (a conditional PUT, `If-None-Match: *` on S3), holding
its owner and an expiry. The holder renews it every third of its term, conditionally (`If-Match` on the
ETag it last wrote, where the storage supports it), so a renewal can never overwrite another writer's
lease. Before every mutation of the store (each block's resize and chunk writes, each commit) the writer
checks that the lease is still its own: its own clock first (a writer whose last renewal is a term old,
as one that was SIGSTOPped past its lease, has lost it, whatever the object says), then the object.
Each writer also takes a **fencing token**, one above the store's `writer_fence` (kept in the root's
attributes), writes it there, and puts it in every commit; before committing it checks that no writer
with a higher token has started since. A killed writer's lease is taken over once it has expired, or at
once by a writer on the same host when the holder's process is gone. Backends without exclusive creation
get no lease, with a warning (see the README for what that means).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from convcache.errors import ConvcacheError

log = logging.getLogger(__name__)

LEASE_SECONDS = float(os.environ.get("CONVCACHE_LEASE_SECONDS", "60"))  # (the environment: tests only)


@contextmanager
def writer_lock(output: str, storage_options: dict | None = None, lease_seconds: float = LEASE_SECONDS):
    """Hold the store's writer lock (local) or lease (object storage) for the block; yields a guard to
    call before each mutation (it raises if the lease was lost), whose `fence(root)` takes the fencing
    token once the store's root is open, and whose `token` every commit records."""
    from convcache.location import resolve

    loc = resolve(output, storage_options, what="-o", write=True)
    if loc.local:
        with _flock(Path(loc.path.rstrip("/") + ".lock"), output):
            yield _NoGuard()
        return
    lease = Lease(loc.sibling(".lock"), output, lease_seconds)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


@contextmanager
def _flock(lock_path: Path, output: str):
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ConvcacheError(f"-o {output}: another extract is writing to this store (pid {holder}); "
                                 "wait for it to finish or write to another store") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:  # no pid in the file: no writer (`writer_active`), even while this process lives on
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def writer_active(loc) -> bool:
    """Whether a writer holds the store at `loc` (a resolved location) now: a reader's question, which takes
    and changes nothing (probing the flock itself could make a writer starting that instant fail). On a local
    disk: the lock file names a process (a writer writes its pid there and clears it as it finishes) that is
    still running, so a writer killed with SIGKILL is not taken for one at work; on object storage: its lease
    is there, not expired, and not one whose process on this host is gone."""
    if loc.local:
        try:
            with open(loc.path.rstrip("/") + ".lock", "rb") as f:
                pid = int(f.read(32).strip() or 0)
        except (OSError, ValueError):
            return False
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            return True
        return True
    try:
        held = Lease(loc.sibling(".lock"), str(getattr(loc, "url", loc.path)), LEASE_SECONDS)._read()
    except Exception:  # unreadable: no writer this reader can wait for
        return False
    return held is not None and not _stale(held)


class _NoGuard:
    """A local store's flock dies with its holder: nothing to check before a mutation, no fencing token."""

    token = None

    def __call__(self) -> None:
        pass

    def fence(self, root) -> None:
        pass


class Lease:
    def __init__(self, loc, output: str, seconds: float):
        self.loc, self.output, self.seconds = loc, output, float(seconds)
        self.owner = uuid.uuid4().hex
        self.fs = loc.fs
        self.held = False
        self.lost: str | None = None
        self.etag: str | None = None  # of the lease object as this writer last wrote it
        self.renewed = time.monotonic()  # this writer's own clock: when the lease was last known to be ours
        self.token: int | None = None  # the fencing token (see fence)
        self._root = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.seconds}).encode()

    def _read(self) -> dict | None:
        try:
            self.fs.invalidate_cache()
            record = json.loads(self.fs.cat_file(self.loc.path))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable content: treat as expired
            return {"expires": 0}
        if not isinstance(record, dict):  # [], "x", null: not a lease anyone holds
            return {"expires": 0}
        try:
            record["expires"] = float(record.get("expires", 0))
        except (TypeError, ValueError):  # {"expires": "soon"}
            record["expires"] = 0.0
        return record

    def _etag(self, response=None) -> str | None:
        tag = response.get("ETag") if isinstance(response, dict) else None
        if tag is None:
            try:
                tag = self.fs.info(self.loc.path).get("ETag")
            except Exception:  # a backend without ETags: renewals are then read-compare-write
                tag = None
        return tag

    def acquire(self) -> None:
        for _ in range(3):
            try:
                self.etag = self._etag(self.fs.pipe_file(self.loc.path, self._record(), mode="create"))
                self.renewed = time.monotonic()
                break
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue  # released in between: try again
                if not _stale(held):
                    until = time.strftime("%H:%M:%S", time.localtime(held.get("expires", 0)))
                    raise ConvcacheError(
                        f"-o {self.output}: another extract holds this store's lease (pid {held.get('pid', '?')} "
                        f"on {held.get('host', '?')}, renewed until {until}); wait for it, or write to another "
                        "store") from None
                log.warning("taking over the expired lease of pid %s on %s", held.get("pid"), held.get("host"))
                self.fs.rm_file(self.loc.path)
            except TypeError:  # a backend whose pipe_file has no exclusive mode
                log.warning("%s: this storage cannot create an object exclusively; no writer lease (run one "
                            "writer per store)", self.output)
                return
            except Exception as exc:  # permissions, network
                raise ConvcacheError(f"-o {self.output}: cannot take the writer lease "
                                     f"({exc.__class__.__name__}: {exc})") from None
        else:
            raise ConvcacheError(f"-o {self.output}: could not take the writer lease (contended); try again")
        self.held = True
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3) and self.renew_once():
            pass

    def renew_once(self) -> bool:
        """One renewal; False once the lease is lost (this writer stalled past its term, or the object is no
        longer the one it wrote: the conditional PUT is refused rather than overwrite another's lease)."""
        try:
            if time.monotonic() - self.renewed >= self.seconds:  # stalled past the term (SIGSTOP, ...)
                self.lost = "it expired (this writer stalled longer than the lease)"
                return False
            held = self._read()
            if held is None or held.get("owner") != self.owner:
                self.lost = "another writer took it over" if held else "it was removed"
                return False
            started = time.monotonic()
            if self.etag:  # only if it is still the object this writer wrote
                out = self.fs.pipe_file(self.loc.path, self._record(), IfMatch=self.etag)
            else:
                out = self.fs.pipe_file(self.loc.path, self._record())
            self.etag, self.renewed = self._etag(out), started
        except OSError as exc:
            # s3fs: a failed If-Match is OSError(EINVAL, "...PreconditionFailed..."); others may differ
            if isinstance(exc, (FileExistsError, PermissionError, FileNotFoundError)) or exc.errno == errno.EINVAL \
                    or "precondition" in str(exc).lower():
                self.lost = "another writer took it over (a conditional renewal was refused)"
                return False
            log.warning("could not renew the writer lease (%s)", exc)
        except Exception as exc:  # a network hiccup: try again next period; check() decides
            log.warning("could not renew the writer lease (%s)", exc)
        return True

    def fence(self, root) -> None:
        """Take the store's next fencing token (`writer_fence` in the root's attributes) and record it there;
        every commit carries it (`SplitWriter`), and `check` refuses once a higher one is recorded."""
        from convcache.store.layout import update_root_attributes

        if not self.held:
            return
        self.check()
        self._root = root
        self.token = int(_fence_of(root) or 0) + 1
        update_root_attributes(root, {"writer_fence": self.token})  # the snapshot stays for its readers

    def __call__(self) -> None:
        self.check()

    def check(self) -> None:
        """Before a mutation: is the lease still ours and unexpired, by this writer's clock and by the object,
        and has no writer with a higher fencing token started since?"""
        if not self.held:
            return
        if self.lost is None and time.monotonic() - self.renewed >= self.seconds:
            self.lost = "it expired (this writer stalled longer than the lease)"
        held = self._read() if self.lost is None else None
        if self.lost is None and (held is None or held.get("owner") != self.owner):
            self.lost = "another writer took it over" if held else "it was removed"
        if self.lost is None and held.get("expires", 0) < time.time():
            self.lost = "it expired (this writer stalled longer than the lease)"
        if self.lost is None and self._root is not None and self.token is not None:
            newer = _fence_of(self._root, fresh=True)
            if newer is not None and newer > self.token:
                self.lost = f"a writer with a higher fencing token ({newer} > {self.token}) has started since"
        if self.lost:
            raise ConvcacheError(f"-o {self.output}: lost the writer lease ({self.lost}); stopped before committing "
                                 "more. Committed rows are kept; re-run to resume")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.held and not self.lost:
            try:
                held = self._read()
                if held and held.get("owner") == self.owner:
                    self.fs.rm_file(self.loc.path)
            except Exception as exc:  # it will expire on its own
                log.warning("could not release the writer lease (%s); it expires in %.0f s", exc, self.seconds)


def _fence_of(root, fresh: bool = False) -> int | None:
    """The highest fencing token the store records: the root's `writer_fence` and every split's (a writer that
    lost its lease inside a consolidation can still rewrite the root with its older token), read again from
    storage with `fresh`."""
    from convcache.store.layout import open_group

    if fresh:
        root = open_group(root, consolidated=False)
    values = [root.attrs.get("writer_fence")]
    for name in root.group_keys():
        try:
            values.append(open_group(root, name, consolidated=False).attrs.get("writer_fence"))
        except Exception:  # a split without its own metadata: --verify reports it
            pass
    tokens = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return max(tokens) if tokens else None


def _stale(held: dict) -> bool:
    if held.get("expires", 0) < time.time():
        return True
    if held.get("host") == socket.gethostname():  # same host: is the holder's process still there?
        try:
            os.kill(int(held.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError):
            return False
    return False
