"""The first code that runs inside a sandboxed child process (see :mod:`backends.answers.sandbox`).

Copied into the run's control folder and started as ``python -I -X utf8 child.py config.json``
with stdin/stdout/stderr already pointing at the run's files and ``events_fd`` at its event file. In this
order it: reads the program and its call (before any limit applies); cuts the network (own network
namespace, when the parent asks: the fallback without bubblewrap); sets its resource limits (soft
and hard, so the program cannot raise them); as root, moves the work folder to, and switches to, a
user id of its own (root is exempt from the process limit and could raise any limit); installs an
audit hook that refuses sockets, new processes and writes outside the work folder with a clear
message; and runs the program.

Events (JSON lines on ``events_fd``) tell the parent what happened beyond the exit status: ``blocked``
(what the hook refused), ``memory`` (MemoryError), ``result`` (the value returned by a called
function), ``setup`` (what isolation took effect). A program can write there too: it can only
lie about itself, and every limit is enforced by the kernel regardless.

Stdlib only, Python 3.10+: it runs under the server's own interpreter.
"""
import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
EXIT_MEMORY = 3
EXIT_SETUP = 4

_events = None


def event(_kind, **data):
    try:
        _events.write(json.dumps({**data, "event": _kind}, default=repr) + "\n")
        _events.flush()
    except Exception:  # the program closed the event file: nothing more to say
        pass


def unshare_network():
    """An empty network namespace: no interface but a loopback nobody listens on."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        return os.strerror(ctypes.get_errno())
    return ""


def tasks_of(uid):
    """Threads of ``uid`` that this process can see (the kernel counts them for RLIMIT_NPROC)."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as fh:
                status = fh.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            if int(fields.get("Uid", "").split()[0]) == uid:
                count += int(fields.get("Threads", "1").strip())
        except (IndexError, ValueError):
            continue
    return count


# What competitive programs import. Loaded while still root: without bubblewrap, the run's own
# user id may not be able to read Python's folder (pyenv under /root, mode 0700).
PRELOAD = ("array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "fractions",
           "functools", "heapq", "io", "itertools", "json", "math", "operator", "random", "re", "socket",
           "statistics", "string", "threading", "typing", "ast", "inspect", "traceback", "cmath", "queue",
           "sys", "time", "enum", "numbers", "contextlib", "textwrap", "unicodedata", "encodings.idna")


def preload():
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module is the program's problem
            pass


def set_limits(cfg, uid):
    def both(which, value):
        resource.setrlimit(which, (value, value))

    both(resource.RLIMIT_CORE, 0)
    cpu = max(1, int(round(cfg["cpu_s"])))
    # Soft limit: SIGXCPU (a clear "CPU time" verdict); hard limit one second later: SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    both(resource.RLIMIT_AS, int(cfg["memory_bytes"]))
    both(resource.RLIMIT_FSIZE, int(cfg["output_bytes"]))
    both(resource.RLIMIT_NOFILE, 64)
    # The process limit counts every thread of the user id: those already running plus the budget.
    both(resource.RLIMIT_NPROC, tasks_of(uid) + int(cfg["max_processes"]))


def install_hook(workdir):
    work = os.path.realpath(workdir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    process_events = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                      "subprocess.Popen", "pty.spawn", "os.startfile"}

    def inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == work or real.startswith(work + os.sep)

    def refuse(kind, message):
        event("blocked", kind=kind, message=message)
        raise PermissionError(f"sandbox: {message}")

    def hook(name, args):
        if name == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            writing = bool(mode) and any(c in str(mode) for c in "wax+")
            writing = writing or bool(isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                refuse("write", f"writing {os.fsdecode(path)!r} outside the program's folder is not allowed")
        elif name.startswith("socket."):
            refuse("network", "network access is not allowed (the program tried to open a socket)")
        elif name in process_events:
            refuse("process", f"starting processes is not allowed ({name})")
        elif name in path_events:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    refuse("write", f"changing {os.fsdecode(path)!r} outside the program's folder is not allowed")

    sys.addaudithook(hook)


def pick_callable(namespace, source_names, wanted):
    """The function a LeetCode-style test calls: ``Solution().<wanted>`` or a top-level function."""
    cls = namespace.get("Solution")
    if isinstance(cls, type):
        obj = cls()
        methods = [n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")]
        if wanted and hasattr(obj, wanted):
            return getattr(obj, wanted)
        if len(methods) == 1:
            return getattr(obj, methods[0])
        raise LookupError(f"class Solution has methods {methods}; the example does not say which to call")
    functions = [n for n in source_names if callable(namespace.get(n)) and not isinstance(namespace.get(n), type)]
    if wanted and wanted in functions:
        return namespace[wanted]
    if len(functions) == 1:
        return namespace[functions[0]]
    if functions:
        return namespace[functions[-1]]
    raise LookupError("the program defines no function (or class Solution) to call")


def call(fn, kwargs):
    import inspect

    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    if kwargs and all(k in params for k in kwargs):
        return fn(**kwargs)
    return fn(*kwargs.values())  # the example names differ from the parameters: in order


def main():
    global _events
    with open(sys.argv[1], encoding="utf-8") as fh:
        cfg = json.load(fh)
    _events = os.fdopen(int(cfg["events_fd"]), "w", buffering=1, encoding="utf-8", closefd=False)
    with open(cfg["solution"], encoding="utf-8") as fh:
        source = fh.read()
    call_spec = cfg.get("call")
    workdir = cfg["workdir"]
    try:
        setup = {}
        if cfg.get("unshare_net"):
            problem = unshare_network()
            setup["network_namespace"] = not problem
            if problem:
                setup["network_namespace_error"] = problem
        uid = cfg.get("uid")
        if os.geteuid() == 0 and uid is not None:
            preload()
            os.chown(workdir, uid, uid)
            set_limits(cfg, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # clears every capability: the hard limits now hold
        else:
            set_limits(cfg, os.getuid())
        setup["uid"] = os.getuid()
        event("setup", **setup)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a sandbox error
        event("setup_failed", message=f"{type(exc).__name__}: {exc}")
        sys.exit(EXIT_SETUP)
    os.chdir(workdir)
    sys.path[:0] = [workdir]
    sys.dont_write_bytecode = True  # importing must not try to write .pyc files (the hook would object)
    install_hook(workdir)
    code = compile(source, "solution.py", "exec")
    namespace = {"__name__": "__main__" if call_spec is None else "solution", "__file__": "solution.py",
                 "__builtins__": __builtins__}
    try:
        _run(code, namespace, source, call_spec)
    finally:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        event("end", cpu_s=sum(u.ru_utime + u.ru_stime for u in usage))


def _run(code, namespace, source, call_spec):
    try:
        exec(code, namespace)
        if call_spec is not None:
            import ast

            names = [n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            fn = pick_callable(namespace, names, call_spec.get("function"))
            value = call(fn, call_spec.get("kwargs") or {})
            try:
                json.dumps(value)
                event("result", value=value)
            except (TypeError, ValueError):
                event("result", repr=repr(value))
    except MemoryError:
        event("memory")
        event("end")
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_MEMORY)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - the program's own failure: its traceback is the message
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
