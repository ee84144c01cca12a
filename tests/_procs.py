"""Process helpers for the tests that SIGKILL a sweep or search driver: find and end what it started."""

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below `pid` (none if it has already gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL each process and wait (up to 20 s) until they are gone."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=20)
