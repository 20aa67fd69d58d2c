"""Start a server as a subprocess on loopback, wait until it answers, watch its memory, and stop it
cleanly: the ONE process launcher, used by the engine matrix (quantgate.engines) and by the
gateway's engine supervisor (quantgate.serve.supervisor). Layer 1: it imports only quantgate.errors.

Generic on purpose: it knows a command line, a health path and a deadline, nothing about any
engine, so a test drives it with a tiny local server script. The server runs in its own session
(process group), so stopping it reaches the workers it forked (vLLM's engine core): SIGTERM to
the group, SIGKILL after a grace period. Every started group is also remembered until it is
stopped, and an atexit hook kills what is left, so an exception path leaves no engine behind. Its output goes to a log file whose last lines travel
with any failure: a failed start is reported in the engine's own words, never swallowed.

Memory is read from /proc (no psutil): the summed VmRSS of every process in the server's
session, sampled while it runs, and the summed VmHWM (each process's own peak) as an upper
bound; GPU memory from nvidia-smi where there is one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import QuantgateError

TAIL_LINES = 40
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Command:
    """What to start: argv, the environment set on top of the inherited one, the health path."""

    argv: list[str]
    env: dict[str, str]
    health_path: str = "/v1/models"
    cpus: list[int] = field(default_factory=list)  # the cores the whole process tree may run on (empty: any)
    # set in the process's environment / sent with every health check, never recorded or printed:
    # the engine's API key and the identity token the reaper checks before it kills anything
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("secret_env", "headers")}


# process groups started and not yet stopped: killed at interpreter exit whatever path led there
_LIVE: dict[int, "ServerProcess"] = {}
_LIVE_LOCK = threading.Lock()


def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        pids = list(_LIVE)
        _LIVE.clear()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


atexit.register(_kill_leftovers)


def live_groups() -> list[int]:
    """Process-group ids started by this process and not yet stopped."""
    with _LIVE_LOCK:
        return list(_LIVE)


class EngineStartError(QuantgateError):
    """A server that exited or never answered; `record` holds what was measured, the message
    ends with the engine's own last log lines."""

    def __init__(self, message: str, record: LaunchRecord):
        tail = "\n".join(f"    {x}" for x in record.log_tail[-15:]) or "    (the engine wrote nothing)"
        super().__init__(f"{message}\n  the engine's last log lines ({record.log_path}):\n{tail}")
        self.record = record


@dataclass
class LaunchRecord:
    name: str
    argv: list[str]
    env: dict[str, str]  # only what the launcher set on top of the inherited environment
    port: int
    log_path: str
    pid: int | None = None
    ready: bool = False
    startup_s: float | None = None  # spawn → first healthy answer
    exit_code: int | None = None  # set when the process ended on its own (a failed start)
    peak_rss_mb: float | None = None  # max over samples of the session's summed VmRSS
    peak_hwm_mb: float | None = None  # sum of each process's own VmHWM (upper bound)
    peak_gpu_mb: float | None = None
    processes: int = 0  # distinct processes seen in the session
    metrics_endpoint: bool | None = None  # GET /metrics answered (Prometheus) after readiness
    stopped_by: str | None = None  # sigterm | sigkill | exited
    shutdown_s: float | None = None
    log_tail: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base_url"] = self.base_url
        return d


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail_of(path: str | Path, n: int = TAIL_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `n` lines of a log file (reads at most its last `max_bytes`)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [x.rstrip() for x in data.replace("\r", "\n").split("\n")]
    return [x for x in lines if x.strip()][-n:]


# ------------------------------------------------------------------------------ /proc reading
def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after "pid (comm) " (so fields[0] is the state, field 3 of stat(5)); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields and len(fields) > 3 and int(fields[3]) == sid:  # state ppid pgrp session
            pids.append(int(entry))
    return pids


def started_at(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if there is no such
    process. A pid and this together name one process: a reused pid starts later."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def kill_leftover_session(sid: int, leader_started: int, token: str) -> list[int]:
    """SIGKILL what is left of a session this program started (leader pid `sid`, started at
    `leader_started`) and another process of it recorded; returns the pids signalled. Only members
    that carry `token` in their environment (TOKEN_ENV, given to that spawn alone) are killed: the
    session id and the start time say which session it was, the token proves each process is the
    engine that was spawned, whatever happened to the leader (it may have exited, the pid reused)."""
    members = session_pids(sid)
    if not members:
        return []
    now = started_at(sid)
    if now is not None and now != leader_started:
        return []
    members = [p for p in members if carries(p, TOKEN_ENV, token)]
    for pid in members:  # each one: a worker may have moved to a process group of its own
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return members


TOKEN_ENV = "QUANTGATE_ENGINE_TOKEN"  # the identity an engine process carries (see kill_leftover_session)

# What a child is not given of this process's environment: the variables the gateway read its own
# API keys from (withhold(), called where they are read), and for engines anything named like a
# credential. A command provider's CLI keeps the latter: it may need its own key to do its job.
_WITHHELD: set[str] = set()
SECRET_NAME = re.compile(r"(?i)(?:^|_)(?:API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(?:$|_)")


def withhold(name: str) -> None:
    """`name` holds one of this process's own secrets: no child started from here inherits it."""
    _WITHHELD.add(name)


def child_environ(engine: bool = True) -> dict[str, str]:
    """This process's environment as a child should inherit it (see _WITHHELD)."""
    return {k: v for k, v in os.environ.items()
            if k not in _WITHHELD and not (engine and SECRET_NAME.search(k))}


def carries(pid: int, name: str, value: str) -> bool:
    """True when process `pid`'s environment has NAME=VALUE (readable for our own processes only)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{name}={value}".encode() in env.split(b"\0")


def host_identity() -> dict:
    """What ties a pid to this machine's processes: the host name, this boot and this PID namespace
    (a ledger on a shared volume, from before a reboot or from another container names other ones)."""
    import socket

    def read(path: str, link: bool = False) -> str | None:
        try:
            return os.readlink(path) if link else Path(path).read_text().strip()
        except OSError:
            return None

    return {"host": socket.gethostname(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("/proc/self/ns/pid", link=True)}


def listening_inodes(port: int) -> set[int]:
    """The socket inodes listening on TCP `port` (any address, IPv4 and IPv6), from /proc/net."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                out.add(int(f[9]))
    return out


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes process `pid` holds open."""
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def port_owned_by(port: int, pids: list[int]) -> str | None:
    """None when every socket listening on `port` is held by one of `pids` (the session we spawned);
    else why not: nobody listens, or another process does (a squatter that took the port first)."""
    listening = listening_inodes(port)
    if not listening:
        return f"nothing listens on port {port}"
    ours = set().union(*(socket_inodes(p) for p in pids)) if pids else set()
    if not listening <= ours:
        return f"port {port} is held by a process this gateway did not start"
    return None


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _gpu_mb(pids: set[int]) -> float | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0.0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            with contextlib.suppress(ValueError):
                total += float(parts[1])
    return total


class _MemoryWatch(threading.Thread):
    """Samples the session's memory until stopped; keeps the peaks."""

    def __init__(self, sid: int, interval_s: float = 0.5, gpu_every: int = 4):
        super().__init__(daemon=True)
        self.sid, self.interval_s, self.gpu_every = sid, interval_s, gpu_every
        self.peak_rss_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.peak_gpu_mb: float | None = None
        self._halt = threading.Event()

    def sample(self, with_gpu: bool = False) -> None:
        pids = session_pids(self.sid)
        rss = 0
        for pid in pids:
            rss += _status_kb(pid, "VmRSS")
            hwm = _status_kb(pid, "VmHWM")
            if hwm:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        if with_gpu:
            g = _gpu_mb(set(pids))
            if g is not None:
                self.peak_gpu_mb = max(self.peak_gpu_mb or 0.0, g)

    def run(self) -> None:
        i = 0
        while not self._halt.wait(self.interval_s):
            self.sample(with_gpu=i % self.gpu_every == 0)
            i += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        with contextlib.suppress(Exception):
            self.sample(with_gpu=True)


# ----------------------------------------------------------------------------- the server
def http_ok(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """One engine server. `start()` returns once it answers its health path or raises
    EngineStartError; `stop()` is idempotent; use it as a context manager."""

    def __init__(self, name: str, command: Command, *, port: int, log_path: str | Path,
                 startup_timeout_s: float = 900.0, poll_s: float = 0.5, grace_s: float = 20.0,
                 clock=time.monotonic):
        self.command, self.startup_timeout_s, self.poll_s, self.grace_s = command, startup_timeout_s, poll_s, grace_s
        self.clock = clock
        self.record = LaunchRecord(name=name, argv=list(command.argv), env=dict(command.env), port=port,
                                   log_path=str(log_path))
        self._proc: subprocess.Popen | None = None
        self._watch: _MemoryWatch | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return self.record.base_url

    def start(self, abort: threading.Event | None = None, on_spawn=None) -> ServerProcess:
        """Spawn and wait until the health path answers; `abort` (set from another thread) gives up
        early, as a timeout does: the group is stopped and EngineStartError raised. `on_spawn(pid)`
        is called as soon as the process exists (the supervisor records its group there)."""
        rec = self.record
        Path(rec.log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log = open(rec.log_path, "wb")
        t0 = self.clock()
        try:
            self._proc = subprocess.Popen(self.command.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL,
                                          env={**child_environ(), **self.command.env, **self.command.secret_env},
                                          start_new_session=True)
        except OSError as exc:
            rec.error = f"cannot start {self.command.argv[0]}: {exc.strerror or exc}"
            self._close_log()
            raise EngineStartError(rec.error, rec) from None
        rec.pid = self._proc.pid
        if self.command.cpus:
            # the whole tree, its API server included: children and threads inherit the mask. Set right
            # after the spawn (no preexec_fn, unsafe in a threaded gateway), while the new interpreter is
            # still importing, before it starts a thread or a worker. The planner offers only cores this
            # process may use, so a refusal means the process is already gone (its start then fails)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(rec.pid, self.command.cpus)
        with _LIVE_LOCK:
            _LIVE[self._proc.pid] = self
        if on_spawn is not None:
            on_spawn(self._proc.pid)
        self._watch = _MemoryWatch(self._proc.pid)
        self._watch.start()
        url = f"{self.base_url}{self.command.health_path}"
        deadline = t0 + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                rec.exit_code = code
                self.stop()  # its workers may outlive it
                rec.error = f"{rec.name} exited with code {code} before it answered {self.command.health_path}"
                raise EngineStartError(rec.error, rec)
            if http_ok(url, headers=self.command.headers):
                rec.ready, rec.startup_s = True, round(self.clock() - t0, 3)
                self._watch.sample()  # a run shorter than the sampling interval still counts its workers
                rec.metrics_endpoint = http_ok(f"{self.base_url}/metrics")
                return self
            if abort is not None and abort.is_set():
                self.stop()
                rec.error = f"{rec.name}: start abandoned (shutting down or superseded)"
                raise EngineStartError(rec.error, rec)
            if self.clock() >= deadline:
                self.stop()
                rec.error = (f"{rec.name} did not answer {url} within {self.startup_timeout_s:g} s "
                             "(raise startup_timeout_s if it is still warming up)")
                raise EngineStartError(rec.error, rec)
            if abort is not None:
                abort.wait(self.poll_s)  # a bounded readiness poll that an abort cuts short
            else:
                time.sleep(self.poll_s)  # a bounded readiness poll, not synchronisation

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the leader has exited (negative: the signal that ended it)."""
        return self._proc.poll() if self._proc is not None else None

    def stop(self, grace_s: float | None = None) -> LaunchRecord:
        """SIGTERM to the whole session, SIGKILL after `grace_s` (default: the one it was made with; 0
        for a hung process); records how it ended."""
        if self._proc is None or self.record.stopped_by is not None:
            return self.record
        grace_s = self.grace_s if grace_s is None else grace_s
        t0 = self.clock()
        how = "exited"
        if self._proc.poll() is None:
            how = "sigterm"
            if self._watch is not None:
                self._watch.sample()  # the last look at the workers before they are signalled
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                how = "sigkill"
                self._signal(signal.SIGKILL)
                self._proc.wait(timeout=30)
        # workers that outlived the leader still belong to the session
        stragglers = [p for p in session_pids(self._proc.pid) if p != self._proc.pid]
        if stragglers:
            self._signal(signal.SIGKILL)
        with _LIVE_LOCK:
            _LIVE.pop(self._proc.pid, None)
        self._finish(how, self.clock() - t0)
        return self.record

    def _signal(self, sig) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _finish(self, how: str, took: float) -> None:
        rec = self.record
        if self._watch is not None:
            self._watch.stop()
            rec.peak_rss_mb = round(self._watch.peak_rss_kb / 1024, 1) or None
            rec.peak_hwm_mb = round(sum(self._watch.hwm_kb.values()) / 1024, 1) or None
            rec.peak_gpu_mb = self._watch.peak_gpu_mb
            rec.processes = len(self._watch.hwm_kb)
        rec.stopped_by, rec.shutdown_s = how, round(took, 3)
        if rec.exit_code is None and self._proc is not None and how == "exited":
            rec.exit_code = self._proc.returncode
        self._close_log()
        rec.log_tail = tail_of(rec.log_path)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
