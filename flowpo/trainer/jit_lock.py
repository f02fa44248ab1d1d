"""Stale locks in torch's JIT extension cache: loud instead of an endless silent wait.

DeepSpeed compiles some of its ops on first use through `torch.utils.cpp_extension.load`
(on CPU: the shared-memory communication op, `deepspeed_shm_comm`, at every process-group
start). Every load, built or not, takes `<build dir>/lock`, created exclusively and held open
while ninja checks the build, and deleted after; a process that finds the file waits until it
disappears, forever and without a word. A start-up killed while holding it (a `timeout`, a
SIGKILL) leaves the file behind, and from then on every run sleeps at start.

`guard_extension_locks` runs a block (the process group's start-up) under watch: a lock that is
older than `stale_after_s` and that no process holds open (Linux: /proc/*/fd; elsewhere the age
alone decides) stops it with `StaleExtensionLock`, one line naming the file and the fix.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

# A build of DeepSpeed's shm op takes 30-70 s on 2 slow cores (docs/environment.md); a lock
# this old with no process holding it is left over. FLOWPO_STALE_LOCK_S overrides (tests).
STALE_AFTER_S = 300.0


class StaleExtensionLock(RuntimeError):
    """A lock file in torch's extension cache that no build holds; the message is one line."""


def extensions_root() -> Path:
    """Where torch builds JIT extensions: $TORCH_EXTENSIONS_DIR as it is, else the default
    cache (~/.cache/torch_extensions) plus a python/accelerator folder, e.g. py311_cpu: torch's
    own rule (torch.utils.cpp_extension)."""
    from torch.utils.cpp_extension import get_default_build_root

    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env is not None:
        return Path(env)
    if torch.version.hip is not None:
        accel = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accel = "cu" + torch.version.cuda.replace(".", "")
    else:
        accel = "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{accel}"


def lock_path(op_name: str) -> Path:
    """The lock file a JIT load of extension `op_name` takes."""
    return extensions_root() / op_name / "lock"


def _held_open(path: Path) -> bool | None:
    """Whether any process has `path` open (the builder keeps its lock's descriptor open until
    it deletes the file); None where /proc cannot tell (not Linux)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(path)
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return True
            except OSError:
                continue
    return False


def stale_after_s() -> float:
    return float(os.environ.get("FLOWPO_STALE_LOCK_S", STALE_AFTER_S))


def stale_lock_problem(path: Path, stale_after: float | None = None) -> str | None:
    """The one-line error for `path` when it is a stale lock (older than `stale_after` seconds
    and held by no process), else None."""
    limit = stale_after_s() if stale_after is None else stale_after
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if age < limit or _held_open(path):
        return None
    return (
        f"stale lock file {path} ({age / 60:.0f} min old, no process holds it): a start-up "
        "killed while DeepSpeed was loading its compiled op left it behind, and every start "
        f"would wait for it forever; delete it (rm {path}) and start again"
    )


@contextlib.contextmanager
def guard_extension_locks(paths: list[Path], poll_s: float = 1.0):
    """Run the block under watch of the lock files `paths`: one already stale stops it before
    it starts; one that turns stale while the block waits on it interrupts the main thread
    (the block must run in it) and raises StaleExtensionLock instead."""
    for path in paths:
        if (problem := stale_lock_problem(path)) is not None:
            raise StaleExtensionLock(problem)
    if not paths:
        yield
        return
    found: list[str] = []
    done = threading.Event()
    guard = threading.Lock()  # the interrupt only lands while the block runs

    def watch() -> None:
        while not done.wait(poll_s):
            for path in paths:
                if (problem := stale_lock_problem(path)) is not None:
                    with guard:
                        if not done.is_set():
                            found.append(problem)
                            _thread.interrupt_main()
                    return

    # interrupt_main runs the SIGINT handler: Python's own raises KeyboardInterrupt, but one
    # installed by other code (an embedding program, a trainer that ran in this process) may
    # only set a flag, and the wait would go on; the block runs under Python's own handler
    swapped, previous = False, None
    if threading.current_thread() is threading.main_thread():
        previous, swapped = signal.signal(signal.SIGINT, signal.default_int_handler), True
    watcher = threading.Thread(target=watch, name="flowpo-lock-watch", daemon=True)
    watcher.start()
    try:
        yield
    except KeyboardInterrupt:
        if found:
            raise StaleExtensionLock(found[0]) from None
        raise
    finally:
        with guard:
            done.set()
        watcher.join()
        if swapped and previous is not None:  # None: set outside Python, not restorable
            signal.signal(signal.SIGINT, previous)
