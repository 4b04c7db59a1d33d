"""The engine registry: a third engine added in ONE file, from outside the app, is offered,
chosen, described and served like the built-in ones."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from backends import ManifestError, load_manifest, registry
from helpers.server import ROOT, ServerProcess

PLUGIN = {"VT_ENGINE_MODULES": "helpers.echo_engine", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VT_")}
    return subprocess.run([sys.executable, "-m", "ui", *args], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


def test_builtin_engines_declare_what_the_app_derives_from_them():
    specs = registry.engines()
    assert list(specs)[:3] == ["transformers", "llamacpp", "remote"]
    assert registry.choices()[0] == "auto"
    for spec in specs.values():
        assert spec.summary and spec.label and spec.extras, spec.name
        # An engine that runs a local model checks it and bids for auto; the remote one does neither.
        local = spec.needs_local_model
        assert (spec.check_model is not None) == local and (spec.auto_rank is not None) == local, spec.name
    # The manifest accepts exactly the registered names.
    with pytest.raises(ManifestError, match="backend = 'echo'.*allowed: auto, transformers, llamacpp, remote$"):
        load_manifest(env={}, overrides={"backend": "echo"})


def test_an_engine_in_one_file_is_offered_chosen_and_described():
    helped = _cli("serve", "--help", **PLUGIN)
    assert helped.returncode == 0, helped.stderr
    assert "auto,transformers,llamacpp,remote,echo" in helped.stdout.replace(" ", "").replace("\n", "")
    assert "repeats the question" in " ".join(helped.stdout.split())
    config = _cli("config", "--backend", "echo", **PLUGIN)
    assert config.returncode == 0, config.stderr
    assert 'backend                           = "echo"' in config.stdout or '= "echo"   # command-line flag' in config.stdout
    assert "# backend: echo (as configured) → echo: repeats the question" in config.stdout
    # Without the plugin the same flag is refused, naming the choices.
    refused = _cli("serve", "--backend", "echo")
    assert refused.returncode == 2 and "invalid choice: 'echo'" in refused.stderr
    broken = _cli("serve", "--help", VT_ENGINE_MODULES="no_such_engine_module")
    assert broken.returncode == 2 and "no_such_engine_module" in broken.stderr and "VT_ENGINE_MODULES" in broken.stderr


@pytest.mark.slow
def test_the_plugin_engine_serves_the_page_and_the_api():
    from gradio_client import Client

    with ServerProcess(["--backend", "echo", "--model", "/nonexistent/model"], env=PLUGIN, ready_timeout=120) as srv:
        models = httpx.get(srv.url + "/v1/models", timeout=10).json()
        assert models["data"][0]["metadata"]["backend"] == "echo"
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"model": "vibethinker-1.5b", "messages": [{"role": "user", "content": "hello there"}],
                             "n": 2})
        body = r.json()
        assert r.status_code == 200, body
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert body["choices"][1]["message"]["content"] == "The answer is \\boxed{11}."
        assert body["choices"][0]["message"]["reasoning_content"] == "echo: hello there"
        # The prompt is counted once for the two samples.
        assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 2 * (3 + 5)
        job = Client(srv.url, verbose=False).submit("What is 2+2?", api_name="/chat")
        chat, stats, _ = job.result(timeout=60)
        assert "\\boxed{12}" in str(chat[-1]["content"]) and "finish: stop" in stats


def test_registry_loads_with_only_the_launchers_bootstrap_libraries() -> None:
    """The launcher asks the registry (bundle.resolve) in an environment that holds only
    bundle/reqfiles.py's BOOTSTRAP: an engine module must not import anything else at import time."""
    from bundle.reqfiles import BOOTSTRAP

    probe = f"""
import importlib.abc, importlib.metadata, re, sys, sysconfig
stdlib = sysconfig.get_paths()["stdlib"]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
dists = {{norm(d) for d in {list(BOOTSTRAP)!r}}}
allowed = {{top for top, owners in importlib.metadata.packages_distributions().items()
           if any(norm(o) in dists for o in owners) and not top.startswith("_")}}
# What the allowed packages themselves pull in (pydantic -> typing_extensions, dotenv …) is theirs.
for name in allowed:
    __import__(name)
base = set(sys.modules)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in base or top in allowed or top in sys.builtin_module_names or top == "backends":
            return None
        for finder in sys.meta_path[1:]:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        origin = spec.origin or ""
        if origin.startswith(stdlib) and "site-packages" not in origin or origin in ("built-in", "frozen"):
            return None
        raise ImportError(f"engine import pulled in {{name}} ({{origin}})")
sys.meta_path.insert(0, Block())
from backends import registry
print(sorted(registry.engines()))
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llamacpp" in proc.stdout and "transformers" in proc.stdout
