"""The run directory: one driver at a time, and a fresh run never destroys another run's files.

``RunDirLock`` holds an exclusive OS lock (``flock``) on ``<run_dir>/.lock`` for the driver's
whole life and writes the holder's host, pid and start time into it for the message a second
driver prints. The kernel drops the lock when the process dies, however it dies, so a driver
that was SIGKILLed never blocks its successor. Where ``flock`` is unsupported (some network
filesystems answer ENOLCK or EOPNOTSUPP) the lock degrades to a lease: the holder rewrites a
heartbeat every ``HEARTBEAT_S`` seconds and a holder silent for ``LEASE_S`` is taken to be dead.

``open_run_dir`` decides, under the lock, whether the run continues the one in the directory
(``trainer.resume=auto`` and a compatible ``config.json``: only the fields in
``RESUMABLE_CHANGES`` may differ) or starts afresh, in which case a directory holding another
run's files is refused, overwritten or replaced by a new one (``trainer.if_run_dir_exists``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlcore.validation import ConfigError
from trainers.checkpointing import CheckpointManager, write_json_atomic

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
# What a directory holds besides a run: the lock, and the cluster launcher's own files (Slurm's
# output, a job's Ray token: trainers.launch.slurm.LAUNCH_DIR), which belong to whichever run.
NOT_A_RUN = (LOCK_FILE, "launch")
HEARTBEAT_S = 10.0
LEASE_S = 60.0
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

# Fields a resumed run may change: how long it runs and how it is watched, placed and laid
# out (checkpoints load into any layout). Anything else (model, LoRA shape, algorithm, task,
# data sizes, optimizer, seed) would make the continued run a different experiment.
RESUMABLE_CHANGES = (
    "trainer.steps", "trainer.eval_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
    "trainer.resume", "trainer.if_run_dir_exists", "trainer.run_dir", "trainer.ray_address",
    "trainer.placement", "trainer.train_world_size", "trainer.micro_batch_size", "trainer.reward_workers",
    "trainer.reward_timeout_s", "trainer.max_skipped_steps", "trainer.preemption_grace_s",
    "trainer.fault_steps", "trainer.fault_kind", "logger.", "parallel.", "launch.", "sweep.", "model.cache_dir",
    "rollout.engines", "rollout.num_cpus_per_engine", "rollout.start_timeout_s", "rollout.call_timeout_s",
    "rollout.staging_dir", "rollout.engine.model", "rollout.engine.device", "rollout.engine.kv_cache_gib",
    "rollout.engine.gpu_memory_utilization", "rollout.engine.max_num_seqs", "rollout.engine.enforce_eager",
    "rollout.engine.tensor_parallel_size",
)
# A full-parameter run's checkpoint holds the fleet's own shards of every weight
# (parallel.full_state), so unlike an adapter's it is restored on the same layout only.
LAYOUT_CHANGES = ("trainer.train_world_size", "parallel.")


class RunDirLocked(RuntimeError):
    """Another live driver holds the run directory."""


def _holder_text(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}"


class RunDirLock:
    """An exclusive lock on a run directory for a driver's life (module docstring)."""

    def __init__(self, run_dir: str | Path, use_flock: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.use_flock = use_flock
        self._fd: int | None = None
        self._stop = threading.Event()
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def acquire(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if self.use_flock:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder()
                os.close(self._fd)
                self._fd = None
                raise RunDirLocked(f"{self.run_dir} is in use by another driver ({_holder_text(holder)}); "
                                   "wait for it to finish, stop it, or choose another trainer.run_dir") from None
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
                self.use_flock = False  # this filesystem has no flock: fall back to the lease
        if not self.use_flock:
            self._take_lease()
        self._write_holder()
        return self

    def _read_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _write_holder(self) -> None:
        payload = json.dumps({**self._info, "heartbeat": time.time(),
                              "mode": "flock" if self.use_flock else "lease"}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, payload, 0)
        os.fsync(self._fd)

    def _take_lease(self) -> None:
        holder = self._read_holder()
        alive = time.time() - holder.get("heartbeat", 0) < LEASE_S
        if holder and alive and (holder.get("host"), holder.get("pid")) != (self._info["host"], self._info["pid"]):
            os.close(self._fd)
            self._fd = None
            raise RunDirLocked(f"{self.run_dir} is leased by another driver ({_holder_text(holder)}; last "
                               f"heartbeat {time.time() - holder['heartbeat']:.0f} s ago, taken over after "
                               f"{LEASE_S:.0f} s of silence)")
        threading.Thread(target=self._heartbeat, name="run-dir-lease", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._fd is not None:
                self._write_holder()

    def release(self) -> None:
        self._stop.set()
        if self._fd is not None:
            if not self.use_flock:
                os.ftruncate(self._fd, 0)  # a released lease is free at once
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_resume_compatible(saved: dict[str, Any], new: dict[str, Any]) -> None:
    """Raises ``ConfigError`` naming the first field whose change a resumed run cannot make."""
    before, after = flatten(saved), flatten(new)
    full = bool(before.get("trainer.full_parameter"))
    resumable = tuple(c for c in RESUMABLE_CHANGES if not (full and c in LAYOUT_CHANGES))
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name) and not name.startswith(resumable):
            laid_out = "placed (a full-parameter run keeps its layout)" if full else "placed and laid out"
            raise ConfigError(name, after.get(name),
                              f"the run being resumed has {before.get(name)!r}; a resumed run may only "
                              f"change how long it runs and how it is logged, {laid_out}. Start "
                              "a new run: another trainer.run_dir, or trainer.resume=never with "
                              "trainer.if_run_dir_exists=new")


def _holds_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in NOT_A_RUN for p in run_dir.iterdir())


def _next_free(run_dir: Path) -> Path:
    for n in range(2, 10_000):
        candidate = run_dir.with_name(f"{run_dir.name}-{n}")
        if not _holds_files(candidate):
            return candidate
    raise ConfigError("trainer.run_dir", str(run_dir), "no free run_dir-N name below 10000")


@dataclass
class OpenedRunDir:
    path: Path
    lock: RunDirLock
    resume: bool  # continue the run in the directory (from its newest intact checkpoint, if any)


def open_run_dir(config: dict[str, Any], run_dir: str | Path, resume: str, if_exists: str, log=print) -> OpenedRunDir:
    """Locks the run directory and decides between resuming and a fresh start (module docstring).

    Writes ``config.json`` once the decision is made. Raises ``ConfigError`` (naming
    ``trainer.run_dir`` or the incompatible field) or ``RunDirLocked``.
    """
    path = Path(run_dir)
    saved_file = path / CONFIG_FILE
    if resume == "auto" and saved_file.is_file():
        check_resume_compatible(json.loads(saved_file.read_text()), config)
        lock = RunDirLock(path).acquire()
        write_config(path, config)
        return OpenedRunDir(path, lock, resume=True)
    if _holds_files(path) and if_exists == "new":
        path = _next_free(path)
        log(f"trainer.run_dir={run_dir} holds another run; this run writes to {path}")
    lock = RunDirLock(path).acquire()
    if _holds_files(path):
        if if_exists == "refuse":
            lock.release()
            newest = CheckpointManager(path, log=log).latest() if (path / "checkpoints").is_dir() else None
            what = f"checkpoints up to step {newest.step}" if newest else "files"
            raise ConfigError("trainer.run_dir", str(run_dir),
                              f"holds another run's {what}; continue it with trainer.resume=auto (and its "
                              "configuration), or set trainer.if_run_dir_exists=new to start in a new "
                              "directory beside it, or trainer.if_run_dir_exists=overwrite to delete it")
        log(f"trainer.if_run_dir_exists=overwrite: deleting the previous contents of {path}")
        for entry in path.iterdir():
            if entry.name not in NOT_A_RUN:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    write_config(path, config)
    return OpenedRunDir(path, lock, resume=False)


def write_config(path: Path, config: dict[str, Any]) -> None:
    """``config.json`` of the run, naming the directory it actually runs in."""
    if "trainer" in config:
        config = {**config, "trainer": {**config["trainer"], "run_dir": str(path)}}
    write_json_atomic(path / CONFIG_FILE, config)
