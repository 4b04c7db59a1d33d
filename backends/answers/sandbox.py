"""Running an untrusted Python program: its own process, a temporary folder, no network, limits.

LiveCodeBench's and evalplus's runners are not sandboxes (their own docstrings say so), and a
model's program can be anything: an endless loop, a fork bomb, a memory hog, a write to
``~/.bashrc``, a socket to the notebook's metadata service. Every run here:

- is its own process (``python -I -B -X utf8``: no environment, no user site, no .pyc writes),
  started in a new session so that the whole process group can be killed;
- gets kernel limits set by :mod:`._child` on itself before the program runs, soft and hard:
  CPU time (``RLIMIT_CPU``: SIGXCPU, then SIGKILL), address space (``RLIMIT_AS``), size of any file
  it writes, its output included (``RLIMIT_FSIZE``), processes and threads (``RLIMIT_NPROC``),
  open files, no core dumps. As root it first switches to a user id of its own (61000 + n):
  root is exempt from the process limit and could raise the others;
- is killed (the whole group) at a wall-clock timeout, and what it printed is read back
  truncated;
- refuses sockets, new processes and writes outside its folder through a Python audit hook, which
  gives a clear verdict ("blocked: network access is not allowed");
- with bubblewrap (Debian's ``bubblewrap``, when ``bwrap`` works here): runs in its own network,
  process, IPC and UTS namespaces with a read-only view of the system's and Python's folders
  only (no home, no /root, no app folder, no manifest), a private size-limited tmpfs as its
  folder, and dies with its parent. Without bubblewrap it still gets its own network namespace
  when the kernel allows it, and a private folder under the system's temporary directory.

The audit hook is a Python-level check (``ctypes`` can go around it); the kernel limits and the
namespaces are what actually hold. :attr:`Sandbox.isolation` says which of these are in force.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

CHILD_SOURCE = Path(__file__).with_name("_child.py")
# Inside the bubblewrap sandbox.
BOX_WORK = "/box"
BOX_CTL = "/ctl"
# Shown stdout/stderr (the comparison reads the whole output, which RLIMIT_FSIZE caps).
SHOWN_CHARS = 4000
# User ids the runs switch to when the server runs as root (one per concurrent run).
UID_BASE = 61000
UID_SPAN = 1000

SandboxMode = Literal["auto", "bubblewrap", "process"]


class SandboxUnavailable(RuntimeError):
    """The configured isolation cannot be had here; the message says why and what to do."""


class Outcome(str, enum.Enum):
    OK = "ok"  # exited 0 (the output still has to be compared)
    RUNTIME_ERROR = "runtime_error"
    TIME_LIMIT = "time_limit"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    BLOCKED = "blocked"
    COMPILE_ERROR = "compile_error"
    SANDBOX_ERROR = "sandbox_error"


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 4.0
    wall_s: float = 15.0
    memory_mb: int = 512
    output_kb: int = 1024
    max_processes: int = 8
    tmpfs_mb: int = 64
    source_kb: int = 64

    @classmethod
    def from_settings(cls, solve: Any) -> Limits:
        """From the manifest's ``solve`` section."""
        return cls(cpu_s=solve.cpu_time_s, wall_s=solve.wall_time_s, memory_mb=solve.memory_mb,
                   output_kb=solve.output_kb, max_processes=solve.max_processes)

    def describe(self) -> str:
        return (f"CPU {self.cpu_s:g} s, wall {self.wall_s:g} s, memory {self.memory_mb} MiB, "
                f"output {self.output_kb} KiB, {self.max_processes} processes")


@dataclass(frozen=True)
class Isolation:
    """What protects the machine from the programs (shown on the page and in the API)."""

    kind: Literal["bubblewrap", "process"]
    network: bool  # kernel-level: no network (a namespace); False = only the audit hook refuses sockets
    filesystem: bool  # kernel-level: read-only system, private folder; False = only the audit hook
    own_user: bool  # runs as a user id of its own
    limits: Limits
    note: str = ""  # why bubblewrap is not in use, when it is not

    @property
    def summary(self) -> str:
        if self.kind == "bubblewrap":
            head = "bubblewrap sandbox (no network, own processes, read-only system, private folder)"
        else:
            parts = ["own process"]
            parts.append("no network" if self.network else "sockets refused by an audit hook only")
            if self.own_user:
                parts.append("own user id")
            parts.append("writes outside its folder refused by an audit hook only")
            head = "process limits (" + ", ".join(parts) + ")"
        text = f"{head}; limits: {self.limits.describe()}"
        return f"{text}. {self.note}" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "network_isolated": self.network, "filesystem_isolated": self.filesystem,
                "own_user": self.own_user, "limits": dataclasses.asdict(self.limits), "note": self.note,
                "summary": self.summary}


@dataclass
class Execution:
    """One run of a program on one input."""

    outcome: Outcome
    message: str  # one line for people ("CPU time limit of 4 s exceeded")
    stdout: str = ""  # the whole output (at most output_kb)
    stderr: str = ""  # the tail
    exit_code: int | None = None
    signal: str | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    value: Any = None  # call mode: the returned value (JSON), or its repr in value_repr
    value_repr: str | None = None
    has_value: bool = False
    events: list[dict] = field(default_factory=list)

    @property
    def shown_stdout(self) -> str:
        return _clip(self.stdout)

    @property
    def shown_stderr(self) -> str:
        return _clip(self.stderr, tail=True)


def _clip(text: str, tail: bool = False) -> str:
    if len(text) <= SHOWN_CHARS:
        return text
    return ("…" + text[-SHOWN_CHARS:]) if tail else (text[:SHOWN_CHARS] + "…")


class _UidPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()
        self._next = itertools.count((os.getpid() * 37) % UID_SPAN)

    def take(self) -> int:
        with self._lock:
            for _ in range(UID_SPAN):
                uid = UID_BASE + next(self._next) % UID_SPAN
                if uid not in self._used:
                    self._used.add(uid)
                    return uid
        raise SandboxUnavailable("every sandbox user id is in use; lower solve.parallel_runs")

    def give(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)


_UIDS = _UidPool()


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real user id is ``uid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as fh:
                fields = dict(line.split(":", 1) for line in fh.read().splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and not fields.get("State", "").strip().startswith(("Z", "X")):
                found.append(int(name))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return found


def _kill_user(uid: int, patience_s: float = 5.0) -> int:
    """SIGKILL every process of ``uid`` (a run's own user id: whatever escaped its group) until
    none is left; returns how many were killed."""
    killed = 0
    deadline = time.monotonic() + patience_s
    while (pids := _processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.02)
    if pids:
        log.warning("processes of sandbox user %d are still there after SIGKILL: %s", uid, pids)
    return killed


def _system_binds() -> list[str]:
    """bubblewrap arguments for a read-only view of the system and of this Python."""
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(top)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), top]
        elif p.is_dir():
            args += ["--ro-bind", top, top]
    # Folders bubblewrap creates on the way to a bind are root-only (0700): the run's own user id
    # could not walk to Python's files.
    args += ["--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
             "--ro-bind-try", "/etc/localtime", "/etc/localtime"]
    roots: list[str] = []
    for folder in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
                   os.path.dirname(sys.executable)):
        real = os.path.realpath(folder)
        for path in {folder, real}:
            if path.startswith("/usr/") or path == "/usr":
                continue
            if not any(path == r or path.startswith(r + "/") for r in roots):
                roots = [r for r in roots if not r.startswith(path + "/")] + [path]
    made: set[str] = {"/", "/etc"}
    for path in sorted(roots):
        for parent in reversed(Path(path).parents):
            if str(parent) not in made and not str(parent).startswith("/usr"):
                made.add(str(parent))
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", path, path]
    return args


class Sandbox:
    """Runs programs under :class:`Limits`; at most ``parallel`` at once (the rest wait)."""

    def __init__(self, limits: Limits | None = None, mode: SandboxMode = "auto", parallel: int = 2,
                 python: str | None = None) -> None:
        self.limits = limits or Limits()
        self.mode = mode
        self.python = python or sys.executable
        self._slots = threading.BoundedSemaphore(max(1, parallel))
        self._probe_lock = threading.Lock()
        self._isolation: Isolation | None = None
        self._root = os.geteuid() == 0

    @classmethod
    def from_settings(cls, solve: Any) -> Sandbox:
        """From the manifest's ``solve`` section (limits, ``sandbox`` mode, ``parallel_runs``)."""
        return cls(Limits.from_settings(solve), mode=solve.sandbox, parallel=solve.parallel_runs)

    # -- which isolation ----------------------------------------------------------------------
    @property
    def isolation(self) -> Isolation:
        """Probed once: bubblewrap when ``bwrap`` works here (mode auto/bubblewrap)."""
        with self._probe_lock:
            if self._isolation is None:
                self._isolation = self._probe()
            return self._isolation

    def _probe(self) -> Isolation:
        note = ""
        if self.mode in ("auto", "bubblewrap"):
            problem = self._bwrap_problem()
            if not problem:
                return Isolation("bubblewrap", network=True, filesystem=True, own_user=self._root, limits=self.limits)
            if self.mode == "bubblewrap":
                raise SandboxUnavailable(
                    f"solve.sandbox is bubblewrap but {problem}. Install it (Debian/Ubuntu: apt-get install "
                    "bubblewrap) or set solve.sandbox: auto to run with process limits only.")
            note = f"bubblewrap is not in use: {problem} (Debian/Ubuntu: apt-get install bubblewrap)"
            log.warning("code checks run without bubblewrap: %s", problem)
        net = self._probe_netns()
        return Isolation("process", network=net, filesystem=False, own_user=self._root, limits=self.limits,
                         note=note)

    def _bwrap_problem(self) -> str:
        bwrap = shutil.which("bwrap")
        if not bwrap:
            return "bwrap is not installed"
        with tempfile.TemporaryDirectory(prefix="vt-probe-") as tmp:
            cmd = [bwrap, *self._bwrap_args(Path(tmp)), self.python, "-I", "-c", "pass"]
            try:
                proc = subprocess.run(cmd, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"bwrap could not be started ({exc})"
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace").strip().splitlines()
            return f"bwrap cannot create its namespaces here ({why[-1] if why else f'exit {proc.returncode}'})"
        return ""

    def _probe_netns(self) -> bool:
        """Whether a child may get its own network namespace without bubblewrap."""
        code = ("import ctypes,os;l=ctypes.CDLL(None,use_errno=True);"
                "f=0x40000000 if os.geteuid()==0 else 0x50000000;raise SystemExit(0 if l.unshare(f)==0 else 1)")
        try:
            return subprocess.run([self.python, "-I", "-c", code], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _bwrap_args(self, ctl: Path) -> list[str]:
        args = ["--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net",
                "--unshare-uts", "--unshare-cgroup-try"]
        if not self._root:
            args.append("--unshare-user")  # what lets an ordinary user create the other namespaces
        # /tmp first: a Python (a venv) that lives under /tmp is bound on top of it, not hidden by it.
        args += ["--tmpfs", "/tmp"] + _system_binds()
        args += ["--proc", "/proc", "--dev", "/dev",
                 "--size", str(self.limits.tmpfs_mb * 1024 * 1024), "--tmpfs", BOX_WORK,
                 "--ro-bind", str(ctl), BOX_CTL, "--chdir", BOX_WORK,
                 "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", BOX_WORK,
                 "--setenv", "LANG", "C.UTF-8", "--"]
        return args

    # -- running --------------------------------------------------------------------------------
    def run(self, source: str, stdin: str = "", call: dict | None = None) -> Execution:
        """Run ``source`` as a script on ``stdin`` (``call=None``) or call its function
        (``call={"function": name or None, "kwargs": {...}}``, LeetCode style)."""
        if len(source.encode()) > self.limits.source_kb * 1024:
            return Execution(Outcome.COMPILE_ERROR, f"the program is longer than {self.limits.source_kb} KiB")
        try:
            compile(source, "solution.py", "exec")
        except SyntaxError as exc:
            return Execution(Outcome.COMPILE_ERROR, f"syntax error line {exc.lineno}: {exc.msg}")
        except (ValueError, RecursionError, MemoryError) as exc:
            return Execution(Outcome.COMPILE_ERROR, f"the program does not compile: {type(exc).__name__}")
        isolation = self.isolation
        with self._slots:
            uid = _UIDS.take() if self._root else None
            try:
                return self._run(source, stdin, call, isolation, uid)
            finally:
                if uid is not None:
                    _UIDS.give(uid)

    def _run(self, source: str, stdin: str, call: dict | None, isolation: Isolation, uid: int | None) -> Execution:
        limits = self.limits
        with tempfile.TemporaryDirectory(prefix="vt-run-") as tmp:
            base = Path(tmp)
            ctl, out = base / "ctl", base / "out"
            ctl.mkdir()
            out.mkdir()
            shutil.copyfile(CHILD_SOURCE, ctl / "child.py")
            (ctl / "solution.py").write_text(source, encoding="utf-8")
            (ctl / "stdin.txt").write_text(stdin, encoding="utf-8")
            bwrap = isolation.kind == "bubblewrap"
            if bwrap:
                ctl_dir, workdir = BOX_CTL, BOX_WORK
            else:
                work = base / "work"
                work.mkdir()
                ctl_dir, workdir = str(ctl), str(work)
                # The run's own user id must get into its folder and read its files.
                os.chmod(base, 0o755)
                for p in (ctl, ctl / "child.py", ctl / "solution.py", ctl / "stdin.txt"):
                    os.chmod(p, 0o755 if p.is_dir() else 0o644)
            cmd = [self.python, "-I", "-B", "-X", "utf8", f"{ctl_dir}/child.py", f"{ctl_dir}/config.json"]
            if bwrap:
                cmd = [shutil.which("bwrap") or "bwrap", *self._bwrap_args(ctl), *cmd]
            with open(ctl / "stdin.txt", "rb") as fin, open(out / "stdout", "wb") as fout, \
                    open(out / "stderr", "wb") as ferr, open(out / "events", "wb") as fev:
                config = {
                    "solution": f"{ctl_dir}/solution.py", "workdir": workdir, "call": call,
                    "cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb * 1024 * 1024,
                    "output_bytes": limits.output_kb * 1024, "max_processes": limits.max_processes,
                    "uid": uid, "unshare_net": (not bwrap) and isolation.network, "events_fd": fev.fileno(),
                }
                (ctl / "config.json").write_text(json.dumps(config), encoding="utf-8")
                os.chmod(ctl / "config.json", 0o644)
                return self._spawn(cmd, fin, fout, ferr, fev, out, uid, isolation)

    def _spawn(self, cmd: list[str], fin, fout, ferr, fev, out: Path, uid: int | None,
               isolation: Isolation) -> Execution:
        limits = self.limits
        started = time.perf_counter()
        try:
            # No preexec_fn (unsafe in a threaded server): the child limits itself (_child.py).
            proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, start_new_session=True,
                                    pass_fds=(fev.fileno(),), env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                    close_fds=True)
        except OSError as exc:
            return Execution(Outcome.SANDBOX_ERROR, f"could not start the program: {exc}")
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            _killpg(proc.pid)

        timer = threading.Timer(limits.wall_s, kill)
        timer.daemon = True
        timer.start()
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        _killpg(proc.pid)  # whatever it left running in its group
        if uid is not None:
            # Without bubblewrap: whatever left the group. With it: the namespace's processes are
            # being killed by the kernel; wait until they are gone so that nothing outlives a run.
            _kill_user(uid)
        fout.flush()
        return _judge_exit(proc.returncode, timed_out.is_set(), wall, rusage.ru_utime + rusage.ru_stime,
                           out, limits, isolation.kind == "bubblewrap")


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as fh:
        data = fh.read(limit)
    return data.decode("utf-8", errors="replace")


def _judge_exit(code: int, timed_out: bool, wall: float, cpu: float, out: Path, limits: Limits,
                bwrap: bool) -> Execution:
    stdout = _read(out / "stdout", limits.output_kb * 1024 + 1)
    stderr = _read(out / "stderr", limits.output_kb * 1024 + 1)
    events: list[dict] = []
    for line in _read(out / "events", 1 << 20).splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            events.append(item)
    ex = Execution(Outcome.OK, "", stdout=stdout, stderr=stderr[-SHOWN_CHARS * 4:], wall_s=wall, cpu_s=cpu,
                   events=events)
    kinds = {e.get("event") for e in events}
    if bwrap and code > 128 and "end" not in kinds:
        code = -(code - 128)  # bubblewrap passes a signal on as 128 + its number
    if code < 0:
        ex.signal = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
    else:
        ex.exit_code = code
    ends = [e for e in events if e.get("event") == "end" and isinstance(e.get("cpu_s"), (int, float))]
    if ends:
        ex.cpu_s = cpu = max(cpu, float(ends[-1]["cpu_s"]))
    blocked = [e for e in events if e.get("event") == "blocked"]
    result = [e for e in events if e.get("event") == "result"]
    if result:
        ex.has_value = True
        ex.value = result[-1].get("value")
        ex.value_repr = result[-1].get("repr")
    setup_failed = [e for e in events if e.get("event") == "setup_failed"]
    out_size = (out / "stdout").stat().st_size
    if setup_failed:
        why = setup_failed[-1].get("message")
        ex.outcome, ex.message = Outcome.SANDBOX_ERROR, f"the sandbox could not be set up: {why}"
    elif "setup" not in kinds and code != 0 and not timed_out:
        tail = stderr.strip().splitlines()
        ex.outcome, ex.message = Outcome.SANDBOX_ERROR, f"the sandbox failed to start: {tail[-1] if tail else code}"
    elif blocked:
        ex.outcome, ex.message = Outcome.BLOCKED, f"blocked: {blocked[0].get('message')}"
    elif timed_out:
        ex.outcome, ex.message = Outcome.TIME_LIMIT, f"wall-clock limit of {limits.wall_s:g} s exceeded (stopped)"
    elif ex.signal == "SIGXCPU" or (ex.signal == "SIGKILL" and cpu >= limits.cpu_s):
        ex.outcome, ex.message = Outcome.TIME_LIMIT, f"CPU time limit of {limits.cpu_s:g} s exceeded"
    elif "memory" in kinds or "MemoryError" in stderr:
        ex.outcome, ex.message = Outcome.MEMORY_LIMIT, f"memory limit of {limits.memory_mb} MiB exceeded"
    elif out_size >= limits.output_kb * 1024 or "[Errno 27]" in stderr:
        ex.outcome, ex.message = Outcome.OUTPUT_LIMIT, f"output limit of {limits.output_kb} KiB exceeded"
    elif ex.signal is not None:
        ex.outcome, ex.message = Outcome.RUNTIME_ERROR, f"crashed ({ex.signal})"
    elif code != 0:
        last = [line for line in stderr.strip().splitlines() if line.strip()]
        ex.outcome = Outcome.RUNTIME_ERROR
        ex.message = f"exit code {code}" + (f": {last[-1].strip()[:300]}" if last else "")
    else:
        ex.outcome, ex.message = Outcome.OK, "exited normally"
    return ex
