"""One driver per run: a lease that a launch takes before it writes anything, renews while it runs, and
gives back when it ends.

The lease is a small JSON record (host, pid, start time, last renewal) created exclusively, so that of two
drivers started on one run the second is refused at once, naming the first:

- local or NFS storage: `<run>/driver.lease`, created with O_CREAT | O_EXCL;
- S3 (and S3-compatible stores): the object `<run>/driver.lease`, put with `If-None-Match: *` (boto3; pyarrow
  cannot make a conditional put) and renewed with `If-Match: <its ETag>`;
- a search's Optuna study: a study named `thermosweep-lease:<study>` in the study's own database (its name
  is unique there, so creating it is exclusive), the record in its user attributes. Two runs cannot drive
  one study even when their run directories differ.

A heartbeat thread renews the lease every `ttl / 3` seconds. A lease is expired when its holder's
renewal is older than the ttl, or when the holder ran on this host and its process is gone (a SIGKILLed
driver can be resumed at once). `--resume` takes over an expired lease; `--take-over` takes a live one
(the holder, if it still runs, sees the loss at its next renewal and stops).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sweep.launch import LaunchError
from sweep.lease_stores import (
    DEFAULT_TTL_S,
    LEASE_FILE,
    Backend,
    LocalBackend,
    S3Backend,
    StudyBackend,
    run_backend,
)

__all__ = [
    "LEASE_FILE",
    "Backend",
    "DriverLease",
    "LeaseHeld",
    "LocalBackend",
    "S3Backend",
    "StudyBackend",
    "add_lease_arguments",
    "expired",
    "hold",
    "new_record",
    "run_backend",
    "unless_held",
]

TTL_ENV = "THERMOSWEEP_LEASE_TTL_S"


class LeaseHeld(LaunchError):
    """Another driver holds the run (or the study); the message names it and the fix."""


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no such process, or no permission to see it
        return None


def new_record(ttl: float) -> dict[str, Any]:
    """This driver's lease record: who holds it, since when, and a token that tells its renewals apart."""
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "renewed": now,
        "ttl_s": ttl,
        "token": uuid.uuid4().hex,
        "argv": sys.argv[1:],
    }


def expired(record: dict[str, Any] | None, now: float | None = None) -> bool:
    """True when the holder of `record` cannot be running: its last renewal is older than its ttl, or it
    ran on this host and its process is gone (or is another process with the same pid). An unreadable
    record counts as expired only once its ttl has passed (see `Backend.read`)."""
    if record is None:
        return True
    now = time.time() if now is None else now
    if now - float(record.get("renewed", 0)) > float(record.get("ttl_s", DEFAULT_TTL_S)):
        return True
    if record.get("host") == socket.gethostname():
        start = _process_start(int(record.get("pid", -1)))
        if start is None:
            return True
        if record.get("process_start") is not None and abs(start - float(record["process_start"])) > 1:
            return True
    return False


def describe(record: dict[str, Any] | None) -> str:
    """`host H, pid P, started T (renewed N s ago)` for messages."""
    if not record:
        return "a driver whose lease cannot be read"
    ago = time.time() - float(record.get("renewed", 0))
    return (
        f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')} "
        f"(lease renewed {ago:.0f} s ago)"
    )


# ------------------------------------------------------------------------------------------ the lease


class DriverLease:
    """Leases this driver holds (the run's, and a search's study's), renewed by one heartbeat thread.

    `on_lost(where)` runs in the heartbeat thread when another driver took a lease over (default: print
    one line and interrupt the main thread, so Tune stops as on Ctrl-C)."""

    def __init__(self, ttl: float | None = None, on_lost: Callable[[str], None] | None = None) -> None:
        self.ttl = float(ttl if ttl is not None else os.environ.get(TTL_ENV, DEFAULT_TTL_S))
        self.record = new_record(self.ttl)
        self.held: list[tuple[Backend, Any]] = []
        self.on_lost = on_lost or _stop_main_thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def acquire(self, backend: Backend, *, what: str, resume: bool, take_over: bool) -> None:
        """Take the lease at `backend` or raise LeaseHeld naming its holder and the fix.

        A new lease is created exclusively. An existing one is taken when it has expired and this launch
        resumes (a dead driver's run), or when `take_over` is set; otherwise refused."""
        version = backend.create(self.record)
        if version is None:
            holder, current = backend.read()
            if current is None and holder is None:  # released between the two calls
                version = backend.create(self.record)
            elif take_over or expired(holder):  # a new run's manifest check already passed
                if holder and not expired(holder):
                    print(f"--take-over: taking {what} from {describe(holder)}", file=sys.stderr, flush=True)
                version = backend.replace(self.record, current)
            if version is None:
                fix = (
                    "wait for it to finish or stop it; if it is gone (e.g. its machine died), pass "
                    "--take-over"
                )
                raise LeaseHeld(f"{what} is held by {describe(holder)} ({backend.where}); {fix}")
        self.held.append((backend, version))
        self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="thermosweep-lease", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.renew()

    def renew(self) -> None:
        """Write a fresh renewal time into every lease held; report one another driver took over."""
        self.record = {**self.record, "renewed": time.time()}
        for i, (backend, version) in enumerate(list(self.held)):
            try:
                new = backend.replace(self.record, version)
            except Exception as err:  # noqa: BLE001 - a full disk, the network: retried at the next beat
                full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                if not self._warned and not full:  # a full storage is reported once, by the launcher
                    print(f"warning: cannot renew the lease {backend.where}: {err}", file=sys.stderr)
                    self._warned = True
                continue
            if new is None:
                self.held.remove((backend, version))
                self.on_lost(backend.where)
            else:
                self.held[i] = (backend, new)

    def release(self) -> None:
        """Stop renewing and remove every lease still held (never raises: the run's outcome matters more)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for backend, version in self.held:
            try:
                backend.delete(version)
            except Exception:  # noqa: BLE001 - it expires on its own
                pass
        self.held.clear()

    def __enter__(self) -> DriverLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _stop_main_thread(where: str) -> None:
    import _thread
    import signal

    print(
        f"another driver took over the lease {where} (--take-over); stopping this one",
        file=sys.stderr,
        flush=True,
    )
    _thread.interrupt_main(signal.SIGINT)


# ------------------------------------------------------------------------------------------ launches


def add_lease_arguments(p: Any) -> None:
    """--take-over (sweep.grid and sweep.search)."""
    p.add_argument(
        "--take-over",
        action="store_true",
        help="take the run (and a search's study) from a driver that still holds its lease, e.g. "
        "one on a machine that died before its lease expired (the holder, if alive, stops)",
    )


def unless_held(read_manifest: Callable[[], Any], run_uri: str | None, *, what: str, take_over: bool) -> Any:
    """`read_manifest()` (a launch's own checks of an existing run) for a run no live driver holds; a
    launch on a held run is refused at once naming the holder (LeaseHeld), also where the manifest check
    would have refused it for another reason ("already exists"). `run_uri` None: no lease to check (a
    dry run, a new default-named run). `hold` takes the lease itself, exclusively."""
    if run_uri is None or take_over:
        return read_manifest()
    try:
        manifest = read_manifest()
    except LaunchError:
        try:
            refuse_if_held(run_uri, what=what)
        except LeaseHeld:
            raise
        except Exception:  # noqa: BLE001 - the manifest's own error says why the storage cannot be read
            pass
        raise
    refuse_if_held(run_uri, what=what)
    return manifest


def refuse_if_held(run_uri: str, *, what: str) -> None:
    """Raise LeaseHeld if a live driver holds the run at `run_uri`."""
    holder, version = run_backend(run_uri).read()
    if version is not None and holder is not None and not expired(holder):
        raise LeaseHeld(
            f"{what} is held by {describe(holder)} ({run_uri}/{LEASE_FILE}); wait for it to finish or "
            "stop it; if it is gone (e.g. its machine died), pass --take-over"
        )


def hold(
    run_uri: str,
    *,
    what: str,
    resume: bool,
    take_over: bool,
    study: tuple[Any, str, str] | None = None,
) -> DriverLease:
    """A started `DriverLease` on the run (and, for a search, on `study` = (Optuna storage, study name,
    where it is shown)). Raises LeaseHeld, having released whatever it took."""
    lease = DriverLease()
    try:
        lease.acquire(run_backend(run_uri), what=what, resume=resume, take_over=take_over)
        if study is not None:
            storage, name, where = study
            lease.acquire(
                StudyBackend(storage, name, where),
                what=f"study {name!r}",
                resume=True,  # the run's lease decided whether this is a resume; a dead holder's goes
                take_over=take_over,
            )
    except BaseException:
        lease.release()
        raise
    return lease
