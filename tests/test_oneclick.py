"""End to end: build the tarball, extract it into an empty folder, run 1键推理.sh as a user would.

The "platform Python" (VT_PYTHON) is this test run's own interpreter, which already has torch,
gradio, transformers ...: the script's venv reuses it through its .pth (as on a ModelArts image
with torch), so nothing is downloaded or compiled. The offline variant gives the script a platform
that has ONLY torch and a bundle with a wheelhouse, and a pip index that does not answer: the app's
packages must come from wheels/. Every bad input the script knows is reproduced and its message
checked. Every server the script starts is stopped in a finally.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from bundle.archive import verify_archive
from bundle.build import build

pytestmark = pytest.mark.slow

SCRIPT = "1键推理.sh"
QUESTION = "What is 2+2?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_port() -> int:
    # Bound-then-closed: nothing listens there, connections are refused at once.
    return _free_port()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VT_") and k not in ("PYTHONPATH", "HF_ENDPOINT")}
    env.update(VT_PYTHON=sys.executable, VT_START_TIMEOUT="600", VT_FAKE_NO_GPU="1", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _run(app: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(app / SCRIPT), *args], cwd=app, env=env or _env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    assert not any(dest.iterdir()), "extract into an empty folder"
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    (app,) = list(dest.iterdir())
    return app


def _server_pids(app: Path) -> list[int]:
    """The pids recorded for the app folder's servers (run/server-<port>.json), by port."""
    pids = []
    for record in sorted((app / "run").glob("server-*.json")):
        try:
            pids.append(int(json.loads(record.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            pass
    return pids


def _server_pid(app: Path) -> int | None:
    pids = _server_pids(app)
    assert len(pids) <= 1, pids
    return pids[0] if pids else None


def _force_stop(app: Path) -> None:
    """Whatever happened in the test: stop the script's servers (stop, then SIGKILL as a last resort)."""
    try:
        _run(app, "stop", timeout=150)
    except subprocess.TimeoutExpired:
        pass
    for pid in _server_pids(app):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"serve" in cmd:
            os.kill(pid, signal.SIGKILL)


def _ask(url: str) -> tuple[int, str]:
    """Ask through the page's own API (/chat, as the browser does); return (stream updates, final text)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    job = client.submit(QUESTION, api_name="/chat")
    updates = sum(1 for _ in job)
    history = job.result()[0]
    text = json.dumps(history, ensure_ascii=False)
    return updates, text


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return build(target="cpu", out_dir=tmp_path_factory.mktemp("dist")).archive


@pytest.fixture(scope="module")
def shared_app(archive: Path, tmp_path_factory) -> Iterator[Path]:
    """One extracted bundle for the bad-input checks (its venv is made once)."""
    app = _extract(archive, tmp_path_factory.mktemp("shared-app"))
    yield app
    _force_stop(app)


# ------------------------------------------------------------------------------------------------
# the journey


def test_oneclick_end_to_end(archive: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    app = _extract(archive, tmp_path / "extracted")
    port = _free_port()
    try:
        first = _run(app, "--daemon", "--backend", "transformers", "--model", str(tiny_model_dir),
                     "--host", "127.0.0.1", "--port", str(port))
        out = first.stdout
        assert first.returncode == 0, out
        assert "复用平台自带 torch" in out and "reusing the platform's torch" in out, out
        assert "服务已就绪 / Server ready" in out and f"http://127.0.0.1:{port}" in out, out
        assert "网页推理" in out
        assert "/health → 200" in out

        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.status_code == 200 and health.json() == {"health": "true"}
        pid = _server_pid(app)
        assert pid and Path(f"/proc/{pid}/cwd").resolve() == app.resolve(), "the server runs from the extracted folder"

        updates, text = _ask(f"http://127.0.0.1:{port}/")
        assert updates >= 2, "the answer streams"
        assert "\\\\boxed{4}" in text, text

        status = _run(app, "status")
        assert status.returncode == 0 and "running" in status.stdout and "ready" in status.stdout, status.stdout

        stop = _run(app, "stop")
        assert stop.returncode == 0 and "已停止 / stopped" in stop.stdout, stop.stdout
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert _run(app, "status").returncode == 3

        # Second run: install skipped; the port now comes from VT_PORT (env passes through to the app).
        port2 = _free_port()
        second = _run(app, "--daemon", "--backend", "transformers", "--model", str(tiny_model_dir), "--host", "127.0.0.1",
                      env=_env(VT_PORT=str(port2)))
        assert second.returncode == 0, second.stdout
        assert "跳过安装 / dependencies already installed, skipping install" in second.stdout
        assert "venv created" not in second.stdout
        assert httpx.get(f"http://127.0.0.1:{port2}/health", timeout=10).status_code == 200
        assert _run(app, "stop").returncode == 0

        # Foreground (the default): the script execs the server, so SIGTERM reaches it and it drains and exits.
        port3 = _free_port()
        proc = subprocess.Popen(["bash", str(app / SCRIPT), "--backend", "transformers", "--model", str(tiny_model_dir),
                                 "--host", "127.0.0.1", "--port", str(port3)], cwd=app, env=_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "服务已就绪" in line:
                    break
            assert any("服务已就绪" in line for line in lines), "".join(lines)
            assert _server_pid(app) == proc.pid, "exec: the server has the script's pid"
            assert httpx.get(f"http://127.0.0.1:{port3}/health", timeout=10).status_code == 200
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        _force_stop(app)


def _torch_only_platform(root: Path) -> Path:
    """A Python whose site has torch and what torch needs, nothing else (like a bare image with torch)."""
    from packaging.requirements import Requirement

    site_dir = root / "torch-site"
    site_dir.mkdir(parents=True)
    seen: set[str] = set()
    todo = ["torch"]
    while todo:
        name = todo.pop()
        dist = metadata.distribution(name)
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for entry in tops - {"__pycache__"}:
            src = Path(dist.locate_file(entry))
            if src.exists() and not (site_dir / entry).exists():
                (site_dir / entry).symlink_to(src)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "platform")], check=True)
    (plat_site,) = (root / "platform").glob("lib/python3*/site-packages")
    (plat_site / "torch_only.pth").write_text(f"import site; site.addsitedir({str(site_dir)!r})\n")
    python = root / "platform" / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch, importlib.util as u; "
                            "print(torch.__version__, u.find_spec('gradio') is None, u.find_spec('yaml') is None)"],
                           capture_output=True, text=True, env=_env())
    assert probe.returncode == 0 and probe.stdout.split()[1:] == ["True", "True"], probe.stdout + probe.stderr
    return python


def _start(app: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(app / SCRIPT), *args], cwd=app, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_launches_at_once_offline_from_wheelhouse(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A fresh bundle folder with a wheelhouse, a platform Python that has only torch, no index, and
    two launches started together on two ports (two terminals, a notebook cell run twice): one
    installs everything from wheels/, the other waits for it, reuses that install, and both serve."""
    archive = build(target="cpu", out_dir=tmp_path / "dist", wheelhouse="app").archive
    assert verify_archive(archive).ok, verify_archive(archive).render(str(archive))  # wheels/ match their hash pins
    app = _extract(archive, tmp_path / "extracted")
    assert any((app / "wheels").glob("gradio-*.whl"))
    platform_python = _torch_only_platform(tmp_path)
    ports = [_free_port(), _free_port()]
    # No index at all: a closed port, no find-links, no pip configuration files.
    env = _env(VT_PYTHON=str(platform_python), PIP_INDEX_URL=f"http://127.0.0.1:{_closed_port()}/simple",
               PIP_CONFIG_FILE=os.devnull)
    env.pop("PIP_FIND_LINKS", None)
    env.pop("PIP_EXTRA_INDEX_URL", None)
    procs = [_start(app, "--daemon", "--offline", "--backend", "transformers", "--model", str(tiny_model_dir),
                    "--host", "127.0.0.1", "--port", str(port), env=env) for port in ports]
    try:
        outs = [proc.communicate(timeout=900)[0] for proc in procs]
        for proc, out in zip(procs, outs):
            assert proc.returncode == 0, out
            assert "/health → 200" in out and "服务已就绪 / Server ready" in out, out
        installer = next(i for i, out in enumerate(outs) if "venv created" in out)
        waiter = 1 - installer
        out, other = outs[installer], outs[waiter]
        assert "reusing the platform's torch" in out
        assert "bootstrap: from wheels/ (offline)" in out and "app: from wheels/ (offline)" in out, out
        assert "transformers: from wheels/ (offline)" in out, out
        assert "wheels/: every wheel matches its hash pin" in out, out  # then pip ran with --require-hashes
        assert " --require-hashes" in (app / "logs" / "pip-app.log").read_text()
        # The second launch waited for the first, named it, and installed nothing itself.
        assert f"another launch is installing (pid {procs[installer].pid}), waiting…" in other, other
        assert "跳过安装 / dependencies already installed, skipping install" in other, other
        assert "venv created" not in other and "  → " not in other, other
        (venv_site,) = (app / ".venv").glob("lib/python3*/site-packages")
        assert (venv_site / "gradio").is_dir() and (venv_site / "transformers").is_dir(), "installed into the app's venv"
        assert not (venv_site / "torch").exists(), "torch is reused, not installed"
        assert json.loads((app / "run" / "install.lock").read_text())["released"] is True
        for port in ports:
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        # One server per port, each its own live `python -m ui serve` (daemons: not the launchers' pids).
        records = {json.loads(r.read_text())["pid"]: r.name for r in (app / "run").glob("server-*.json")}
        assert sorted(records.values()) == sorted(f"server-{port}.json" for port in ports), records
        for pid in records:
            assert b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
        updates, text = _ask(f"http://127.0.0.1:{ports[waiter]}/")
        assert updates >= 2 and "\\\\boxed{4}" in text, text
        status = _run(app, "status", env=env)
        assert status.returncode == 0 and all(f"127.0.0.1:{port}" in status.stdout for port in ports), status.stdout
        stop = _run(app, "stop", env=env)
        assert stop.returncode == 0 and stop.stdout.count("已停止 / stopped") == 2, stop.stdout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        _force_stop(app)


# ------------------------------------------------------------------------------------------------
# bad inputs: each one stops with its message, and nothing is left half-done


def test_missing_model_folder(shared_app: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    run = _run(shared_app, "--daemon", "--model", str(missing), "--host", "127.0.0.1", "--port", str(_free_port()))
    assert run.returncode == 1, run.stdout
    assert "模型文件夹不存在 / Model folder not found" in run.stdout and str(missing) in run.stdout
    assert "config.json" in run.stdout, "says what to put there"
    assert "model.source.download: true" in run.stdout
    assert _server_pid(shared_app) is None


def test_incomplete_model_folder(shared_app: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:1000])
    run = _run(shared_app, "--daemon", "--backend", "transformers", "--model", str(broken), "--host", "127.0.0.1",
               "--port", str(_free_port()))
    assert run.returncode == 1, run.stdout
    assert "模型文件夹不完整或损坏 / Model folder incomplete or corrupt" in run.stdout
    assert "model.safetensors" in run.stdout


def test_port_busy(shared_app: Path, tiny_model_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = _run(shared_app, "--daemon", "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port))
    assert run.returncode == 1, run.stdout
    assert f"端口已被占用 / Port {port} is already in use" in run.stdout and "--port N" in run.stdout


def test_bad_manifest_key(shared_app: Path, tmp_path: Path) -> None:
    bad = tmp_path / "manifest.yaml"
    bad.write_text((shared_app / "manifest.yaml").read_text().replace("  max_queue:", "  max_qeue:"))
    run = _run(shared_app, "--daemon", "--manifest", str(bad), "--port", str(_free_port()))
    assert run.returncode == 2, run.stdout
    assert "配置无效 / Invalid configuration" in run.stdout
    assert "server.max_qeue: unknown key" in run.stdout and "max_queue" in run.stdout
    assert "【2/5】" not in run.stdout, "stopped before installing anything"

    env_bad = _run(shared_app, "doctor", env=_env(VT_PORT="eighty"))
    assert env_bad.returncode == 1 and "VT_PORT" in env_bad.stdout


@pytest.mark.parametrize("flags, why", [(["--torch", "cuda"], "install.torch: cuda"),
                                        (["--device", "cuda"], "transformers.device: cuda")])
def test_cuda_requested_on_cpu_machine(shared_app: Path, flags: list[str], why: str) -> None:
    run = _run(shared_app, "--daemon", *flags, "--host", "127.0.0.1", "--port", str(_free_port()))
    assert run.returncode == 1, run.stdout
    assert "请求了 CUDA, 但没有可用的 NVIDIA GPU / CUDA was requested" in run.stdout and why in run.stdout
    assert "--torch cpu" in run.stdout


def test_gpu_without_nvcc_for_llamacpp(shared_app: Path, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Tesla T4, 15360 MiB, 535.104.05'\n")
    smi.chmod(0o755)
    env = _env(PATH=f"{fake}:/usr/bin:/bin", CUDA_HOME=str(tmp_path / "no-cuda"))
    env.pop("VT_FAKE_NO_GPU")
    run = _run(shared_app, "--daemon", "--backend", "llamacpp", "--port", str(_free_port()), env=env)
    assert run.returncode == 1, run.stdout
    assert "Tesla T4" in run.stdout
    assert "有 GPU 但没有 nvcc / GPU present but no nvcc" in run.stdout and "--llama-cpu" in run.stdout


def test_no_disk_space(shared_app: Path) -> None:
    run = _run(shared_app, "--daemon", "--port", str(_free_port()), env=_env(VT_MIN_FREE_GB="100000000"))
    assert run.returncode == 1, run.stdout
    assert "磁盘空间不足 / Not enough free disk space" in run.stdout and "100000000.0 GB" in run.stdout


def test_python_too_old(shared_app: Path, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python3", "python", "python3.10", "python3.11", "python3.12", "python3.13"):
        exe = fake / name
        exe.write_text("#!/bin/sh\necho 3.8.10\n")
        exe.chmod(0o755)
    conda = fake / "conda"  # a conda that cannot reach its channels
    conda.write_text("#!/bin/sh\necho 'CondaHTTPError: offline' >&2\nexit 1\n")
    conda.chmod(0o755)
    env = _env(PATH=f"{fake}:/usr/bin:/bin")
    env.pop("VT_PYTHON")
    run = _run(shared_app, env=env)
    assert run.returncode == 1, run.stdout
    assert "需要 Python ≥ 3.10" in run.stdout and "Python ≥ 3.10 is required" in run.stdout
    assert "3.8.10" in run.stdout
    assert "conda create -y -p" in run.stdout and "python=3.11" in run.stdout


def test_bad_argument_and_help(shared_app: Path) -> None:
    run = _run(shared_app, "--port", "eighty")
    assert run.returncode == 2 and "参数错误 / bad argument" in run.stdout
    helped = _run(shared_app, "--help")
    assert helped.returncode == 0
    for item in ("--backend", "--model", "--port", "--host", "--daemon", "--manifest", "--offline", "stop", "status",
                 "doctor", "VT_BACKEND", "VT_MODEL", "VT_PORT", "VT_PYTHON", "VT_MIN_FREE_GB", "PIP_INDEX_URL", "HF_ENDPOINT"):
        assert item in helped.stdout, item


def test_doctor_starts_nothing(shared_app: Path, tiny_model_dir: Path) -> None:
    port = _free_port()
    run = _run(shared_app, "doctor", "--model", str(tiny_model_dir), "--backend", "transformers", "--port", str(port))
    assert "doctor" in run.stdout and "GPU:" in run.stdout and "disk" in run.stdout
    # The effective configuration, through `python -m ui config`: value and origin of every key.
    assert re.search(rf"server\.port +?= {port}   # command-line flag", run.stdout), run.stdout
    assert re.search(r'backend +?= "transformers"   # command-line flag', run.stdout), run.stdout
    from backends import registry

    for spec in registry.engines().values():  # the registered engines, listed from the registry
        assert re.search(rf"{spec.name} +{re.escape(spec.summary)}", run.stdout), spec.name
    assert _server_pid(shared_app) is None


def test_doctor_reports_a_plugin_engine(shared_app: Path) -> None:
    """An engine added in one file outside the app (VT_ENGINE_MODULES + the user's PYTHONPATH) is
    listed, accepted by --backend and checked by doctor: it needs no model folder."""
    plugin = _env(VT_ENGINE_MODULES="helpers.echo_engine", PYTHONPATH=str(Path(__file__).resolve().parent))
    run = _run(shared_app, "doctor", "--backend", "echo", "--port", str(_free_port()), env=plugin)
    out = run.stdout
    assert "echo          repeats the question" in out and "[plugin: helpers.echo_engine]" in out, out
    assert "engines echo (backend: echo); extras: none (the core only); torch: not needed" in out, out
    assert "model echo: 无需本地模型 / needs no local model folder" in out, out
    assert "模型文件夹" not in out and "Model folder" not in out, "no model-folder problem"
    assert re.search(r'backend +?= "echo"   # command-line flag', out), out
    assert "# backend: echo (as configured) → echo: repeats the question" in out, out
    helped = _run(shared_app, "--help", env=plugin)
    assert helped.returncode == 0 and "[plugin: helpers.echo_engine]" in helped.stdout, helped.stdout
    # Without the plugin the schema refuses the name, listing the registered engines, before any install.
    refused = _run(shared_app, "--daemon", "--backend", "echo", "--port", str(_free_port()))
    assert refused.returncode == 2, refused.stdout
    assert "配置无效 / Invalid configuration" in refused.stdout and "backend = 'echo' (from command-line flag)" in refused.stdout
    assert "allowed: auto, transformers, llamacpp" in refused.stdout and "【2/5】" not in refused.stdout
    broken = _run(shared_app, "doctor", env=_env(VT_ENGINE_MODULES="no_such_engine_module"))
    assert broken.returncode == 1 and "引擎模块无法加载 / An engine module cannot be loaded" in broken.stdout
    assert "no_such_engine_module" in broken.stdout and "VT_ENGINE_MODULES" in broken.stdout


def test_remote_backend_plans_a_lean_install(shared_app: Path) -> None:
    """--backend remote (issue 12): no torch, no llama.cpp in the install plan, no model folder, and
    --set reaches the schema (the upstream's address shows as a command-line flag)."""
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    run = _run(shared_app, "doctor", "--backend", "remote", "--set", f"remote.base_url={url}",
               "--port", str(_free_port()))
    out = run.stdout
    assert "engines remote (backend: remote); extras: remote; torch: not needed / 不需要; llama.cpp: none" in out, out
    assert "model remote: 无需本地模型 / needs no local model folder" in out, out
    assert re.search(rf'remote\.base_url +?= "{re.escape(url)}"   # command-line flag', out), out
    bad = _run(shared_app, "doctor", "--set", "remote.base_url")
    assert bad.returncode == 1 and "expected KEY=VALUE" in bad.stdout, bad.stdout


def _bare_platform(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "bare")], check=True)
    return root / "bare" / "bin" / "python"


def test_pip_index_unreachable(archive: Path, tmp_path: Path) -> None:
    app = _extract(archive, tmp_path / "extracted")
    url = f"http://127.0.0.1:{_closed_port()}/simple"
    env = _env(VT_PYTHON=str(_bare_platform(tmp_path)), PIP_INDEX_URL=url, PIP_CONFIG_FILE=os.devnull)
    env.pop("PIP_FIND_LINKS", None)
    run = _run(app, "--daemon", "--port", str(_free_port()), env=env, timeout=300)
    assert run.returncode == 1, run.stdout
    assert "无法连接 pip 源 / pip index unreachable" in run.stdout and url in run.stdout
    assert "PIP_INDEX_URL=" in run.stdout and "install.index_url" in run.stdout
    assert "step 'bootstrap'" in run.stdout, "the first step installs what reads the manifest"
    for env_dir in (app / ".venv", app / "run" / "launcher-env"):
        assert not list(env_dir.glob(".vt-install-stamp*")), "no stamp for an unfinished install"


def test_interrupted_install_resumes(archive: Path, tmp_path: Path) -> None:
    app = _extract(archive, tmp_path / "extracted")
    platform = _bare_platform(tmp_path)
    with socket.socket() as silent:  # an index that accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = _env(VT_PYTHON=str(platform), PIP_INDEX_URL=f"http://127.0.0.1:{silent.getsockname()[1]}/simple",
                   PIP_CONFIG_FILE=os.devnull, VT_INDEX_TIMEOUT="120")
        env.pop("PIP_FIND_LINKS", None)
        proc = subprocess.Popen(["bash", str(app / SCRIPT), "--daemon", "--port", str(_free_port())], cwd=app, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = []
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "→ bootstrap" in line:
                    break
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "安装被中断 / Install interrupted" in out and "rerun" in out
    launcher_env = app / "run" / "launcher-env"  # where the libraries that read the manifest go first
    assert (launcher_env / "bin" / "python").exists() and not (launcher_env / ".vt-creating").exists()
    assert json.loads((app / "run" / "install.lock").read_text())["released"] is True
    # The rerun keeps the venv and resumes at the same step (here it then meets a closed index).
    env["PIP_INDEX_URL"] = f"http://127.0.0.1:{_closed_port()}/simple"
    again = _run(app, "--daemon", "--port", str(_free_port()), env=env, timeout=300)
    assert "venv created" not in again.stdout and "→ bootstrap" in again.stdout, again.stdout
    assert "pip index unreachable" in again.stdout


def _launcher_children(app: Path) -> list[int]:
    """Processes still running something from the app folder's environments (pip, venv)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(app).encode() in cmd and b"pip" in cmd:
                found.append(int(proc.name))
    return found


def test_killed_launch_leaves_a_lock_the_next_takes_over(archive: Path, tmp_path: Path) -> None:
    """A launch killed outright (SIGKILL: no cleanup) in the middle of its install leaves the lock
    file naming it; its pip dies with it; the next launch takes the lock over and resumes."""
    app = _extract(archive, tmp_path / "extracted")
    env = _env(VT_PYTHON=str(_bare_platform(tmp_path)), PIP_CONFIG_FILE=os.devnull, VT_INDEX_TIMEOUT="120")
    env.pop("PIP_FIND_LINKS", None)
    with socket.socket() as silent:  # an index that accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env["PIP_INDEX_URL"] = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
        proc = _start(app, "--daemon", "--port", str(_free_port()), env=env)
        try:
            lines = []
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "→ bootstrap" in line:
                    break
            assert any("→ bootstrap" in line for line in lines), "".join(lines)
            info = json.loads((app / "run" / "install.lock").read_text())
            assert info["pid"] == proc.pid and "bootstrap" in info["step"], info
            proc.kill()
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        deadline = time.monotonic() + 30
        while _launcher_children(app) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _launcher_children(app) == [], "pip must not keep writing after its launch was killed"
    assert json.loads((app / "run" / "install.lock").read_text())["pid"] == proc.pid, "the lock file names the dead launch"
    env["PIP_INDEX_URL"] = f"http://127.0.0.1:{_closed_port()}/simple"
    again = _start(app, "--daemon", "--port", str(_free_port()), env=env)
    out = again.communicate(timeout=300)[0]
    assert f"taking over the install lock left by a launch that died during its install (pid {proc.pid}" in out, out
    assert "waiting" not in out, "a dead launch's lock is not waited for"
    assert "→ bootstrap" in out and "pip index unreachable" in out, out
    info = json.loads((app / "run" / "install.lock").read_text())
    assert info["pid"] == again.pid and info["released"] is True


def _python_without_venv_support(root: Path) -> Path:
    """This Python with its standard library minus ensurepip — what Debian/Ubuntu's python3.X is
    without the python3.X-venv package: it runs, but `python -m venv` cannot install pip."""
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (root / "bin").mkdir(parents=True)
    stdlib = root / "lib" / version
    stdlib.mkdir(parents=True)
    shutil.copy2(Path(sys._base_executable).resolve(), root / "bin" / version)  # type: ignore[attr-defined]
    for lib in (base / "lib").glob("libpython*.so*"):
        (root / "lib" / lib.name).symlink_to(lib)
    for entry in (base / "lib" / version).iterdir():
        if entry.name not in ("ensurepip", "site-packages", "dist-packages"):
            (stdlib / entry.name).symlink_to(entry)
    (stdlib / "site-packages").mkdir()
    python = root / "bin" / version
    probe = subprocess.run([str(python), "-c", "import sys, json, fcntl; print(sys.prefix)"], capture_output=True,
                           text=True, env=_env())
    assert probe.returncode == 0 and probe.stdout.strip() == str(root), probe.stdout + probe.stderr
    assert subprocess.run([str(python), "-c", "import ensurepip"], capture_output=True).returncode != 0
    return python


def test_no_venv_support_message_is_unchanged(archive: Path, tmp_path: Path) -> None:
    """A Python without venv support gets the same message as before: install python3.X-venv."""
    app = _extract(archive, tmp_path / "extracted")
    python = _python_without_venv_support(tmp_path / "debian-python")
    run = _run(app, "--daemon", "--port", str(_free_port()), env=_env(VT_PYTHON=str(python)), timeout=300)
    assert run.returncode == 1, run.stdout
    venv = app / "run" / "launcher-env"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"✖ 无法创建虚拟环境 / Cannot create the virtual environment {venv}: " in run.stdout, run.stdout
    assert "ensurepip" in run.stdout, "the detail names what failed"
    assert (f"  修复 / Fix: apt-get install -y python{ver}-venv (Debian/Ubuntu), or use conda "
            f"(conda create -y -p {app / '.conda-py311'} python=3.11), then rerun.") in run.stdout, run.stdout
    assert "another launch" not in run.stdout and "disk" not in run.stdout.split("Cannot create")[1]
    assert not venv.exists(), "the half-made venv of this launch is removed"


def test_half_created_venv_is_left_to_its_live_owner(tmp_path: Path) -> None:
    """A venv marked as being made by a live launch is never deleted; one whose maker died is redone."""
    from bundle.launcher.output import Stop
    from bundle.launcher.venv import CREATING_MARK, ensure_venv

    venv = tmp_path / "venv"
    venv.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (venv / CREATING_MARK).write_text(str(owner.pid))
        (venv / "half").write_text("made by the other launch")
        with pytest.raises(Stop, match=f"being created by another launch \\(pid {owner.pid}\\)"):
            ensure_venv(venv, reuse_platform=False, app_dir=tmp_path, log=tmp_path / "venv.log")
        assert (venv / "half").exists(), "a live launch's venv is not touched"
    finally:
        owner.kill()
        owner.wait()
    ensure_venv(venv, reuse_platform=False, app_dir=tmp_path, log=tmp_path / "venv.log")
    assert (venv / "bin" / "python").exists() and not (venv / "half").exists() and not (venv / CREATING_MARK).exists()


def test_readme_troubleshooting_matches_the_messages() -> None:
    """Every message the README's troubleshooting table lists is one the code prints."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| message (中文 / English) | fix |"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) >= 15
    sources = [*sorted((root / "bundle" / "launcher").glob("*.py")), root / "scripts" / "1键推理.sh",
               root / "backends" / "models" / "fetch.py"]
    code = "".join(p.read_text(encoding="utf-8") for p in sources)
    code = code.replace("${MIN_MAJOR}.${MIN_MINOR}", "3.10")
    for row in rows:
        message = row.split("|")[1].strip()
        zh, _, en = message.partition(" / ")
        assert zh in code, f"README lists {zh!r}, which nothing prints"
        assert en.split("…")[0].strip() in code, f"README lists {en!r}, which nothing prints"


def _checkout_copy(dest: Path) -> Path:
    """The files a git clone has (no venv, no build outputs), links kept as links."""
    root = Path(__file__).resolve().parent.parent
    ignore = shutil.ignore_patterns(".git", ".venv", "dist", "build", "reports", "logs", "run", "__pycache__",
                                    "*.egg-info", ".pytest_cache")
    shutil.copytree(root, dest, symlinks=True, ignore=ignore)
    return dest


def test_source_checkout_runs_from_pyproject(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`bash 1键推理.sh` in a git checkout (the root link) works too: pyproject.toml's ranges are
    installed (here: already satisfied through the reused platform Python, with no index to reach)."""
    app = _checkout_copy(tmp_path / "checkout")
    assert (app / SCRIPT).is_symlink() and not (app / "requirements").exists()
    tracked = {p: p.read_bytes() for p in (app / "pyproject.toml", app / "manifest.yaml")}
    port = _free_port()
    try:
        run = _run(app, "--daemon", "--backend", "transformers", "--model", str(tiny_model_dir),
                   "--host", "127.0.0.1", "--port", str(port), env=_env(PIP_INDEX_URL=f"http://127.0.0.1:{_closed_port()}/simple"))
        assert run.returncode == 0, run.stdout
        assert "source checkout: dependencies from pyproject.toml's ranges" in run.stdout, run.stdout
        assert "服务已就绪 / Server ready" in run.stdout, run.stdout
        base = (app / "run" / "requirements" / "base.txt").read_text()
        assert "gradio>=6.0,<7" in base and "torch" not in base.split("edit pyproject.toml")[1], base
        updates, text = _ask(f"http://127.0.0.1:{port}/")
        assert updates >= 2 and "\\\\boxed{4}" in text, text
        assert _run(app, "stop").returncode == 0
        again = _run(app, "doctor", "--backend", "transformers", "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port))
        assert "installed and current" in again.stdout, again.stdout  # the stamp survived the rewrite check
    finally:
        _force_stop(app)
    assert all(p.read_bytes() == b for p, b in tracked.items()), "the checkout's own files are untouched"
