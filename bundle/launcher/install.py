"""The install: the launcher's bootstrap environment, then the app's venv from the install plan.
Standard library only (the platform's bare Python runs it).

The plan comes from the engine registry through ``python -m bundle.resolve`` (the extras of the
chosen engine, or of every engine ``backend: auto`` may pick here); this module maps those extras
to the requirement files of requirements/index.json (bundle/reqfiles.py) and runs pip:

- torch, wherever an extra lists it, is a step of its own: reused from the platform's Python
  (a .pth appends its site-packages to the venv), or the CPU / CUDA build;
- an extra that lists llama-cpp-python is built for the CPU, or for CUDA (CMAKE_ARGS, no wheel
  cache: pip's cache key ignores CMAKE_ARGS and would hand back a CPU build);
- each step tries wheels/ with no index first (offline), then the index unless --offline, is timed,
  and logs to logs/pip-<step>.log. A stamp in the venv records every finished step (its file's
  digest), so a rerun skips what is done and an interrupted install resumes where it stopped;
- a release bundle's requirement files carry a ``--hash`` on every line (bundle/hashes.py;
  requirements/index.json lists them under "hashed"): those steps run with ``--require-hashes``,
  so pip installs no file — from wheels/, the index or a mirror — whose digest is not pinned. Before
  the first step that reads wheels/, every wheel there is checked against those pins (or, for torch,
  SHA256SUMS), and a changed or foreign wheel stops the install with its file named.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..archive import SUMS_NAME, parse_sums, sha256_file
from ..hashes import HASHED_KEY, check_wheelhouse
from .app import App
from .lock import InstallLock
from .output import fail, note, ok, say, tail, warn
from .preflight import Index, Machine, index_problem, index_url_for, python_line
from .venv import clean_env, die_with_launcher, ensure_venv, platform_torch, venv_python, version_tuple

MIN_REUSED_TORCH = (2, 4)
STAMP_NAME = ".vt-install-stamp.json"
BOOTSTRAP_ENV = "launcher-env"


@dataclass
class Step:
    name: str  # "app", "torch-cpu", "transformers", "llamacpp-cuda", …
    file: str  # under requirements/
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    allow_wheels: bool = True
    before: str = ""  # said before the step starts
    digest: str = ""
    hashed: bool = False  # every line of its file has --hash: pip runs with --require-hashes


@dataclass
class Plan:
    venv: Path
    extras: list[str]
    engines: list[dict[str, Any]]  # name, label, why (from bundle.resolve)
    torch_needed: bool
    torch_mode: str  # install.torch: reuse | cpu | cuda
    torch_build: str | None  # the build installed, None = none (reused or not needed)
    torch_reused: str | None  # the platform's torch version, when reused
    llama: str  # none | cpu | cuda
    llama_why: str
    steps: list[Step]
    key: str = ""

    def describe(self) -> str:
        engines = ", ".join(f"{e['name']} ({e['why']})" for e in self.engines) or "none"
        torch = ("not needed / 不需要" if not self.torch_needed else
                 f"reuse {self.torch_reused}" if self.torch_reused else f"{self.torch_build} build")
        return (f"engines {engines}; extras: {', '.join(self.extras) or 'none (the core only)'}; torch: {torch}; "
                f"llama.cpp: {self.llama}{' (' + self.llama_why + ')' if self.llama != 'none' else ''}")


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def make_plan(app: App, cfg: dict[str, Any], resolved: dict[str, Any], machine: Machine, *,
              quiet: bool = False) -> Plan:
    """Requirement steps for the extras ``bundle.resolve`` planned (torch and llama.cpp variants)."""
    index = app.req_index()
    extras: list[str] = []
    for extra in resolved["extras"]:
        if extra in index["extras"]:
            extras.append(extra)
        elif not quiet:
            who = ", ".join(e["name"] for e in resolved["engines"] if extra in e.get("extras", ())) or "the plan"
            warn(f"{who} 需要的 extra [{extra}] 不在本应用的 pyproject.toml 中 / {who} declares the extra [{extra}], "
                 f"which this app's pyproject.toml does not define: install what it needs yourself")
    groups = [("app", index["core"])] + [(e, index["extras"][e]) for e in extras]
    torch_needed = any(g["torch"] for _, g in groups)
    torch_mode = cfg["install"]["torch"]
    build, reused = None, None
    if torch_needed:
        if torch_mode == "reuse":
            reused = platform_torch(sys.executable)
            if not reused or version_tuple(reused) < MIN_REUSED_TORCH:
                why = (f"torch {reused} is older than {'.'.join(map(str, MIN_REUSED_TORCH))}" if reused
                       else "the platform's Python has no torch")
                build, reused = app.target, None
                if not quiet:
                    note(f"torch: {why} → install the {build.upper()} build / 安装 {build} 版 torch")
        else:
            build = torch_mode
    llama, llama_why = "none", ""
    if any(g["llama_cpp"] for _, g in groups):
        if machine.gpu and not app.args.llama_cpu:
            llama, llama_why = "cuda", f"GPU present, {machine.nvcc_text}"
            if not machine.nvcc and app.bundle.get("llamacpp_wheel") != "cuda":
                fail(f"✖ 有 GPU 但没有 nvcc / GPU present but no nvcc: llama.cpp must be compiled for CUDA "
                     f"({machine.nvcc_text}).\n  修复 / Fix: install the CUDA toolkit (conda install -y -c nvidia "
                     f"cuda-nvcc, or an image with CUDA devel), or rerun with --llama-cpu to build the CPU version, "
                     f"or choose an engine that needs no llama.cpp (bash 1键推理.sh --help lists them).")
        else:
            llama, llama_why = "cpu", ("--llama-cpu" if machine.gpu else "no GPU") + " → CPU build"
    steps = [Step(f"torch-{build}", index["torch"][build])] if build else []
    for name, group in groups:
        step = Step(name, group["file"])
        if group["llama_cpp"]:
            step.name = f"{name}-{llama}"
            step.before = (f"llama-cpp-python: {llama.upper()} build ({llama_why}); compiling takes 5–20 min when no "
                           f"built wheel is at hand / 没有现成 wheel 时编译需 5–20 分钟")
            if llama == "cuda":
                step.env = {"CMAKE_ARGS": "-DGGML_CUDA=on", "FORCE_CMAKE": "1"}
                step.extra_args = ["--no-cache-dir", "--no-binary", "llama-cpp-python"]
                step.allow_wheels = app.bundle.get("llamacpp_wheel") == "cuda"
            else:
                step.allow_wheels = app.bundle.get("llamacpp_wheel") in ("cpu", None)
        steps.append(step)
    for step in steps:
        step.hashed = step.file in index.get(HASHED_KEY, ())
        step.digest = _digest(step.name, app.req(step.file).read_text(encoding="utf-8"),
                              json.dumps([step.env, step.extra_args, step.allow_wheels]))
    plan = Plan(venv=app.venv(cfg), extras=extras, engines=resolved["engines"], torch_needed=torch_needed,
                torch_mode=torch_mode, torch_build=build, torch_reused=reused, llama=llama, llama_why=llama_why,
                steps=steps)
    torch_state = f"reuse {reused}" if reused else (build or "none")
    plan.key = _digest(sys.version, sys.executable, app.target, torch_state)
    return plan


# -- the stamp ------------------------------------------------------------------------------------

def read_stamp(venv: Path) -> dict[str, Any]:
    try:
        data = json.loads((venv / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_stamp(venv: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=venv, prefix=f".{STAMP_NAME}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, venv / STAMP_NAME)


def plan_current(plan: Plan) -> bool:
    stamp = read_stamp(plan.venv)
    done = stamp.get("steps", {}) if stamp.get("key") == plan.key else {}
    return venv_python(plan.venv).exists() and all(done.get(s.name) == s.digest for s in plan.steps)


# -- pip --------------------------------------------------------------------------------------------

HASH_MISMATCH = "THESE PACKAGES DO NOT MATCH THE HASHES"


def _pip_failure_reason(log: Path) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    if HASH_MISMATCH in text:
        which = re.findall(r"^\s+(\S+==\S+ from [^\s#]+)", text.split(HASH_MISMATCH, 1)[1], re.M)
        return "hash mismatch / 哈希不符: " + ("; ".join(which) or "see the log")
    for pattern in (
        r"(Hashes are required in --require-hashes mode, but they are missing from some requirements)",
        r"No matching distribution found for (\S+)",
        r"Could not find a version that satisfies the requirement (\S+)",
        r"Failed building wheel for (\S+)",
        r"Failed to build (\S+)",
        r"ERROR: (Could not install packages due to an OSError.*)",
        r"ERROR: (Cannot install .*)",
        r"ERROR: (.+)",
    ):
        m = re.search(pattern, text)
        if m:
            return m.group(0).strip()
    return "see the log"


_WHEELS_CHECKED: set[Path] = set()


def tampered_wheels(app: App) -> list[str]:
    """What is wrong with wheels/ against the hash pins (and SHA256SUMS): one line per file."""
    wheels = app.wheels
    if wheels is None:
        return []
    index = app.req_index()
    hashed = [f for f in index.get(HASHED_KEY, ()) if app.req(f).is_file()]
    texts = {f: app.req(f).read_text(encoding="utf-8") for f in hashed}
    try:
        sums = parse_sums((app.dir / SUMS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sums = {}
    digests = {f"wheels/{w.name}": sha256_file(w) for w in sorted(wheels.glob("*.whl"))}
    if not hashed:  # a bundle from before hash pins: SHA256SUMS alone
        return [f"{rel}: sha256 differs from {SUMS_NAME}" for rel, d in digests.items() if sums.get(rel) not in (None, d)]
    allowed = {f"wheels/{n}" for n in app.bundle.get("unpinned_wheels", ())}
    report = check_wheelhouse(texts, hashed, digests, unpinned={r: d for r, d in sums.items() if r in allowed})
    return report.tampered + [f"{rel}: no requirement file pins it (not part of this bundle)" for rel in report.unknown]


def check_wheels_once(app: App) -> None:
    """Refuse a wheelhouse with a changed or foreign wheel, naming each file (once per launch)."""
    if app.wheels is None or app.dir in _WHEELS_CHECKED:
        return
    t0 = time.monotonic()
    bad = tampered_wheels(app)
    if bad:
        fail("✖ wheels/ 中的文件与发布包的哈希不符, 拒绝安装 / "
             "wheels/ holds files that do not match the bundle's hash pins; nothing was installed from it:\n" + "".join(f"    {line}\n" for line in bad)
             + "  修复 / Fix: download or extract the bundle again (python -m bundle verify <archive> checks it before "
               "you extract); or delete the named wheels to install those packages from the index (the same hashes "
               "apply there).")
    _WHEELS_CHECKED.add(app.dir)
    ok(f"[{time.monotonic() - t0:5.1f} s] wheels/: every wheel matches its hash pin / wheel 哈希校验通过")


def pip_install(app: App, python: Path, step: Step, *, index: Index | None, bootstrap: bool = False) -> None:
    """One timed install step: wheels/ (no index) first, then the index unless offline."""
    req = app.req(step.file)
    app.logs.mkdir(parents=True, exist_ok=True)
    log = app.logs / f"pip-{step.name}.log"
    base = [str(python), "-m", "pip", "install", "--progress-bar", "off", "--prefer-binary", "-r", str(req)]
    base += ["--require-hashes"] if step.hashed else []
    base += step.extra_args
    wheels = app.wheels if step.allow_wheels else None
    if wheels is not None:
        check_wheels_once(app)
    env = clean_env(step.env)
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        cmd = base + ["--no-index"] + (["--find-links", str(wheels)] if wheels else [])
        fh.write(f"# {step.name}: offline attempt (--no-index{' --find-links ' + str(wheels) if wheels else ''})\n"
                 f"$ {' '.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_launcher)
    if done.returncode == 0:
        ok(f"[{time.monotonic() - t0:5.1f} s] {step.name}: {'from wheels/' if wheels else 'already satisfied'} (offline)")
        return
    if HASH_MISMATCH in log.read_text(encoding="utf-8", errors="replace"):
        fail(f"✖ 哈希校验失败, 拒绝安装 / Refused at step '{step.name}': {_pip_failure_reason(log)}\n"
             f"  日志 / log: {log}\n"
             f"  修复 / Fix: a file does not match the hash the bundle pins for it: download or extract the bundle "
             f"again (python -m bundle verify <archive>); never install it.")
    if app.args.offline:
        fail(
            f"✖ 离线安装失败 / Offline install failed at step '{step.name}': {_pip_failure_reason(log)}\n"
            f"  日志 / log: {log}\n{tail(log)}\n"
            f"  修复 / Fix: the wheelhouse lacks a package for this Python ({python_line()}); build the bundle with "
            f"`python -m bundle build --wheelhouse full` on the same Python version, or rerun without --offline "
            f"when an index is reachable."
        )
    assert index is not None
    problem = index_problem(index.url)
    if problem is not None:
        first = ("\n  (这一步安装读取 manifest.yaml 所需的库, 所以其中的 install.index_url 尚未生效 / this step installs the "
                 "libraries that read manifest.yaml, so its install.index_url does not apply yet: use PIP_INDEX_URL or "
                 "--index-url for it)") if bootstrap else ""
        fail(
            f"✖ 无法连接 pip 源 / pip index unreachable: {index.url} (from {index.origin}): {problem}\n"
            f"  需要安装 / still to install: step '{step.name}' ({req.name}){first}\n"
            f"  修复 / Fix: set a reachable mirror: install.index_url in manifest.yaml or "
            f"PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple (or --index-url URL); "
            f"or use a bundle with a wheelhouse (python -m bundle build --wheelhouse) and --offline."
        )
    cmd = base + (["--index-url", index.url] if index.explicit else [])
    cmd += ["--find-links", str(wheels)] if wheels else []
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n# {step.name}: online attempt ({index.url})\n$ {' '.join(cmd)}\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_launcher)
    if done.returncode != 0:
        fail(
            f"✖ 安装失败 / Install failed at step '{step.name}': {_pip_failure_reason(log)}\n"
            f"  日志 / log: {log}\n{tail(log)}\n"
            f"  修复 / Fix: read the reason above (network, mirror missing a version, compiler); rerun afterwards: "
            f"finished steps are skipped / 修复后重新运行, 已完成的步骤会跳过."
        )
    ok(f"[{time.monotonic() - t0:5.1f} s] {step.name}: installed from {index.url}")


# -- the launcher's bootstrap environment ------------------------------------------------------------

def bootstrap_env(app: App) -> Path:
    return app.run_dir / BOOTSTRAP_ENV


def _bootstrap_key(app: App) -> str:
    index = app.req_index()
    return _digest(sys.version, sys.executable, app.req(index["bootstrap"]).read_text(encoding="utf-8"))


def bootstrap_ready(app: App) -> Path | None:
    """The bootstrap environment's Python when it is complete and current, else None."""
    env = bootstrap_env(app)
    py = venv_python(env)
    return py if py.exists() and read_stamp(env).get("key") == _bootstrap_key(app) else None


def install_bootstrap(app: App, lock: InstallLock) -> Path:
    """Install what reading the manifest needs into run/launcher-env (under the install lock)."""
    lock.acquire("bootstrap (the libraries that read manifest.yaml)")
    ready = bootstrap_ready(app)  # another launch may have made it while this one waited
    if ready is not None:
        return ready
    env = bootstrap_env(app)
    note(f"安装读取配置所需的库 / installing what reading manifest.yaml needs into {env}")
    index = app.req_index()
    step = Step("bootstrap", index["bootstrap"], hashed=index["bootstrap"] in index.get(HASHED_KEY, ()))
    try:
        ensure_venv(env, reuse_platform=False, app_dir=app.dir, log=app.logs / "venv-bootstrap.log")
        say(f"  → bootstrap ({step.file}) …")
        pip_install(app, venv_python(env), step, index=None if app.args.offline else index_url_for(app, None, {}),
                    bootstrap=True)
    except KeyboardInterrupt:
        interrupted("bootstrap")
    write_stamp(env, {"key": _bootstrap_key(app), "time": time.time()})
    return venv_python(env)


def interrupted(during: str) -> NoReturn:
    fail(f"⚠ 安装被中断 / Install interrupted (during {during}). 已完成的部分会保留, 重新运行 bash 1键推理.sh 即可继续 / "
         f"what finished is kept: rerun bash 1键推理.sh to resume (finished steps are recorded and skipped).", 130)


# -- the app's venv -----------------------------------------------------------------------------------

def run_install(app: App, plan: Plan, cfg: dict[str, Any], origins: dict[str, str], lock: InstallLock) -> None:
    lock.acquire(f"venv {plan.venv}")
    try:
        ensure_venv(plan.venv, reuse_platform=plan.torch_reused is not None, app_dir=app.dir,
                    log=app.logs / "venv.log")
    except KeyboardInterrupt:
        interrupted("venv")
    stamp = read_stamp(plan.venv)
    if stamp.get("key") != plan.key:  # another Python or torch choice: every step runs again (pip is incremental)
        stamp = {"key": plan.key, "steps": {}}
    index = None if app.args.offline else index_url_for(app, cfg, origins)
    for step in plan.steps:
        if stamp["steps"].get(step.name) == step.digest:
            ok(f"{step.name}: 已安装 (上次运行) / already installed by an earlier run")
            continue
        lock.set_step(f"pip {step.name}")
        if step.before:
            note(step.before)
        say(f"  → {step.name} ({step.file}) …")
        try:
            pip_install(app, venv_python(plan.venv), step, index=index)
        except KeyboardInterrupt:
            interrupted(step.name)
        stamp["steps"][step.name] = step.digest
        stamp["time"] = time.time()
        write_stamp(plan.venv, stamp)
