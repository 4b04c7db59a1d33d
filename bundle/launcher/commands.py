"""The launcher's commands (start, doctor, stop, status, --help) and its command line.
Standard library only (the platform's bare Python runs it).

start:
  【1/5】 preflight: Python, GPU (nvidia-smi), CUDA toolkit, wheelhouse; then the configuration
        through the one schema (config.py: a Python that can read it, bootstrapped if needed),
        with the install plan from the engine registry and a headers-only model check, so that a
        bad key, a missing model, no disk, a busy port or CUDA on a CPU machine stop here;
  【2/5】 install (install.py) under the install lock (lock.py), skipped when the stamp is current;
  【3/5】 the configuration again, in the app's venv (exactly what the server will use);
  【4/5】 the model check, or its download when model.source.download (still under the lock);
  【5/5】 ``python -m ui serve`` in the foreground (exec: SIGTERM reaches the server) or --daemon.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from .app import App, load_bundle_info
from .config import config_flags, config_or_stop, config_python, existing_config_python, gpu_flag, resolve
from .install import Plan, check_wheels_once, make_plan, plan_current, run_install
from .lock import InstallLock
from .output import Stop, fail, note, ok, say, warn
from .preflight import Machine, check_cuda_request, check_disk, check_port, gpu_info, index_problem, index_url_for
from .preflight import report as preflight_report
from .process import cmd_status, cmd_stop, running, start_server
from .usage import cmd_help, engine_lines
from .venv import venv_python

FIRST_QUESTION = ("--engines", "--plan", "--check-model", "--no-choice")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _model_line(model: dict[str, Any], choice: str = "") -> str:
    if model.get("path") is None:
        head = f"{model['engine']}: 无需本地模型 / needs no local model folder"
    else:
        head = f"{model['path']} ({model['kind']}){': ' + model['check'] if model.get('check') else ''}"
    return head + (f"; {choice}" if choice else "")


def _model_will_download(app: App, first: dict[str, Any]) -> bool:
    return bool(first["config"]["model"]["source"]["download"]) and not app.args.offline


def cmd_start(app: App) -> int:
    # A platform stopping us (SIGTERM) during the install gets the same clean report as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    lock = InstallLock(app.run_dir)
    try:
        return _start(app, lock)
    finally:
        lock.release()


def _start(app: App, lock: InstallLock) -> int:
    t_all = time.monotonic()
    say("【1/5】环境检查 / preflight")
    machine = Machine()
    load_bundle_info(app, lambda: machine.gpu)
    preflight_report(app, machine)
    _, first = config_python(app, lock, *FIRST_QUESTION, *gpu_flag(machine.gpu))
    if first.get("kind") in ("manifest", "engines"):
        config_or_stop(first)
    cfg, origins = first["config"], first["origins"]
    port = int(cfg["server"]["port"])
    for _, info in running(app, port):
        say(f"● 已在运行 / already running: pid {info['pid']}, {info['url']}  (bash 1键推理.sh stop 停止 / to stop)")
        return 0
    plan = make_plan(app, cfg, first["plan"], machine)
    current = plan_current(plan)
    check_disk(app, not current, plan.torch_build)
    check_cuda_request(cfg, origins, plan.torch_build, machine, app.target)
    check_port(cfg)
    if not first.get("ok") and not (first.get("kind") == "model" and _model_will_download(app, first)):
        config_or_stop(first)  # the model folder: stop before a long install
    note(f"安装计划 / install plan: {plan.describe()}")

    say("【2/5】安装依赖 / install")
    if not current:
        lock.acquire(f"install into {plan.venv}")
        current = plan_current(plan)  # another launch may have finished it while this one waited
    if current:
        ok(f"依赖已安装, 跳过安装 / dependencies already installed, skipping install ({plan.venv})")
    else:
        _install(app, plan, cfg, origins, lock)
    vpy = venv_python(plan.venv)

    say("【3/5】配置 / configuration")
    result = config_or_stop(resolve(app, vpy, *gpu_flag(machine.gpu)))  # type: ignore[arg-type]
    cfg, origins = result["config"], result["origins"]
    check_cuda_request(cfg, origins, plan.torch_build, machine, app.target)
    ok(f"backend {cfg['backend']}, model {cfg['model']['path']}, listen {cfg['server']['host']}:{cfg['server']['port']}")

    say("【4/5】模型检查 / model check")
    t0 = time.monotonic()
    fetch = _model_will_download(app, result)
    if fetch:
        lock.acquire("model check / download")
    result = config_or_stop(resolve(app, vpy, "--check-model", *(["--fetch"] if fetch else []),  # type: ignore[arg-type]
                                    *gpu_flag(machine.gpu)))
    ok(f"[{time.monotonic() - t0:4.1f} s] {_model_line(result['model'], result.get('choice', ''))}")
    check_port(cfg)
    lock.release()

    say(f"【5/5】启动 / start  (preparation took {time.monotonic() - t_all:.1f} s)")
    return start_server(app, vpy, cfg, config_flags(app))


def _install(app: App, plan: Plan, cfg: dict[str, Any], origins: dict[str, str], lock: InstallLock) -> None:
    t0 = time.monotonic()
    torch = (f"reuse (reusing the platform's torch {plan.torch_reused} / 复用平台自带 torch)" if plan.torch_reused
             else plan.torch_build or "not needed / 不需要")
    note(f"venv: {plan.venv}; torch: {torch}")
    run_install(app, plan, cfg, origins, lock)
    ok(f"安装完成 / install complete in {time.monotonic() - t0:.1f} s")


def _checks(*checks: Any) -> int:
    problems = 0
    for check in checks:
        try:
            check()
        except Stop as exc:
            say(str(exc))
            problems += 1
    return problems


def cmd_doctor(app: App) -> int:
    say("== doctor: 只检查, 不启动 / checks only, nothing is started ==")
    machine = Machine()
    load_bundle_info(app, lambda: machine.gpu)
    preflight_report(app, machine)
    question = (*FIRST_QUESTION, *gpu_flag(machine.gpu))
    python, first = existing_config_python(app, *question)
    problems = 0
    if first is None:
        note("读取配置需要先安装 pyyaml/pydantic 等 (只装这些) / reading the manifest needs pyyaml, pydantic, … "
             "first: installing only those (run/launcher-env)")
        lock = InstallLock(app.run_dir)
        try:
            python, first = config_python(app, lock, *question)
        except Stop as exc:
            say(str(exc))
            say("== 1 problem(s) / 发现 1 个问题 (the rest needs the configuration) ==")
            return 1
        finally:
            lock.release()
    if first.get("kind") in ("manifest", "engines"):
        try:
            config_or_stop(first)
        except Stop as exc:
            say(str(exc))
        return 1
    say("  · 已注册引擎 / registered engines (--backend NAME; plugins: VT_ENGINE_MODULES):")
    say("\n".join("  " + line for line in engine_lines(first["engines"], first["help"]["auto"])))
    cfg, origins = first["config"], first["origins"]
    plan: Plan | None = None
    try:
        plan = make_plan(app, cfg, first["plan"], machine)
    except Stop as exc:
        say(str(exc))
        problems += 1
    current = plan is not None and plan_current(plan)
    if plan is not None:
        say(f"  · venv {plan.venv}: {'installed and current / 已安装' if current else 'install needed / 需要安装'}")
        say(f"  · 安装计划 / install plan: {plan.describe()}")
    if not current and not app.args.offline:
        index = index_url_for(app, cfg, origins)
        problem = index_problem(index.url)
        (warn if problem else ok)(f"pip index {index.url} ({index.origin}): {problem or 'reachable'}")
        problems += bool(problem) and not app.wheels
    torch_build = plan.torch_build if plan else None
    if not current:  # what the install would read from wheels/ must match the bundle's hash pins
        problems += _checks(lambda: check_wheels_once(app))
    problems += _checks(lambda: check_disk(app, not current, torch_build),
                        lambda: check_cuda_request(cfg, origins, torch_build, machine, app.target),
                        lambda: check_port(cfg))
    checker = venv_python(plan.venv) if plan is not None and current else python
    result = first if not current else resolve(app, checker, "--check-model", *gpu_flag(machine.gpu))  # type: ignore[arg-type]
    assert result is not None
    if result.get("ok") and "model" in result:
        ok(f"model {_model_line(result['model'], result.get('choice', ''))}")
    elif result.get("kind") == "model" and _model_will_download(app, result):
        note(f"model: {cfg['model']['path']} is missing; it is downloaded on start (model.source.download)")
    else:
        problems += _checks(lambda: config_or_stop(result))
    done = subprocess.run([str(checker), "-m", "ui", "config", *config_flags(app)], cwd=app.dir, capture_output=True,
                          text=True, env=app.child_env())
    say(f"  · 生效配置 / effective configuration (python -m ui config{'' if current else ', before the install'}):")
    say("\n".join("    " + line for line in (done.stdout or done.stderr).splitlines()))
    servers = ", ".join("pid {} on {}".format(info["pid"], info["url"]) for _, info in running(app))
    say(f"  · server: {servers or 'not running'}")
    say(f"== {problems} problem(s) / 发现 {problems} 个问题 ==")
    return 1 if problems else 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="1键推理.sh", add_help=False)
    p.add_argument("command", nargs="?", default="start", choices=["start", "stop", "status", "doctor"])
    p.add_argument("--app-dir", required=True)
    p.add_argument("-h", "--help", action="store_true")
    # Values are checked by the schema (python -m bundle.resolve), which knows every registered
    # engine, plugins included, and names the allowed values and where a bad one came from.
    p.add_argument("--backend", metavar="NAME")
    p.add_argument("--model")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    p.add_argument("--manifest")
    p.add_argument("--device")
    p.add_argument("--torch")
    p.add_argument("--index-url", dest="index_url")
    p.add_argument("--daemon", action="store_true")
    p.add_argument("--offline", action="store_true")
    p.add_argument("--llama-cpu", action="store_true", dest="llama_cpu")
    # Any manifest key, as `python -m ui serve --set` takes it (e.g. remote.base_url for --backend remote).
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")

    def error(message: str) -> NoReturn:
        raise Stop(f"✖ 参数错误 / bad argument: {message}. 查看全部参数 / all options: bash 1键推理.sh --help", 2)

    p.error = error  # type: ignore[method-assign]
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        app = App(dir=Path(args.app_dir).resolve(), args=args)
        if args.model:
            args.model = str(Path(args.model).expanduser().resolve())
        if args.manifest:
            if not Path(args.manifest).expanduser().is_file():
                fail(f"✖ 找不到配置文件 / manifest not found: {args.manifest}. 修复 / Fix: pass an existing file to "
                     f"--manifest.", 2)
            args.manifest = str(Path(args.manifest).expanduser().resolve())
        os.chdir(app.dir)
        if args.help:
            load_bundle_info(app, lambda: gpu_info()[0])
            return cmd_help(app)
        if args.command == "stop":
            return cmd_stop(app)
        if args.command == "status":
            return cmd_status(app)
        if args.command == "doctor":
            return cmd_doctor(app)
        return cmd_start(app)
    except Stop as exc:
        print(str(exc), flush=True)
        return exc.code
    except KeyboardInterrupt:
        print("⚠ 已中断 / interrupted", flush=True)
        return 130
