"""One writer per store.

On a local disk: an advisory lock (flock) on `<store>.lock` beside the store. A second writer fails at
once with a one-line error and touches nothing; the lock dies with its process, so a killed writer
never leaves a stale lock.

On object storage there is no lock that dies with its holder, so the writer takes a *lease*: the
object `<store>.lock`, created only if absent (a conditional PUT, `If-None-Match: *` on S3), holding
its owner and an expiry. The holder renews it every third of its term; before every commit the writer
checks that the lease is still its own (a writer paused past its term, whose lease another writer has
taken, stops before committing anything more). A killed writer's lease is taken over once it has
expired, or at once by a writer on the same host when the holder's process is gone. Backends without
exclusive creation get no lease, with a warning (see the README for what that means).
"""

from __future__ import annotations

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

LEASE_SECONDS = 60.0


@contextmanager
def writer_lock(output: str, storage_options: dict | None = None, lease_seconds: float = LEASE_SECONDS):
    """Hold the store's writer lock (local) or lease (object storage) for the block; yields a guard
    to call before each commit (it raises if the lease was lost)."""
    from convcache.location import resolve

    loc = resolve(output, storage_options, what="-o", write=True)
    if loc.local:
        with _flock(Path(loc.path.rstrip("/") + ".lock"), output):
            yield lambda: None
        return
    lease = Lease(loc.sibling(".lock"), output, lease_seconds)
    lease.acquire()
    try:
        yield lease.check
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
        yield
    finally:
        os.close(fd)  # releases the lock


class Lease:
    def __init__(self, loc, output: str, seconds: float):
        self.loc, self.output, self.seconds = loc, output, float(seconds)
        self.owner = uuid.uuid4().hex
        self.fs = loc.fs
        self.held = False
        self.lost: str | None = None
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

    def acquire(self) -> None:
        for _ in range(3):
            try:
                self.fs.pipe_file(self.loc.path, self._record(), mode="create")
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
        while not self._stop.wait(self.seconds / 3):
            try:
                held = self._read()
                if held is None or held.get("owner") != self.owner:
                    self.lost = "another writer took it over" if held else "it was removed"
                    return
                self.fs.pipe_file(self.loc.path, self._record())
            except Exception as exc:  # a network hiccup: try again next period, check() decides
                log.warning("could not renew the writer lease (%s)", exc)

    def check(self) -> None:
        """Before a commit: is the lease still ours and unexpired?"""
        if not self.held:
            return
        held = self._read() if self.lost is None else None
        if self.lost is None and (held is None or held.get("owner") != self.owner):
            self.lost = "another writer took it over" if held else "it was removed"
        if self.lost is None and held.get("expires", 0) < time.time():
            self.lost = "it expired (this writer stalled longer than the lease)"
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
