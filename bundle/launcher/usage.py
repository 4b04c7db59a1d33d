"""``bash 1键推理.sh --help``: a fixed text, then what only the app can say — its engines (from the
registry, plugins included) and the manifest keys' short environment variables (from the schema).
Standard library only.

The second part needs a Python that reads the schema. --help never installs anything: when the
platform's Python or the launcher's bootstrap environment (made by the first start) can answer,
the lists are printed; otherwise a pointer says where to find them. Nothing here names an engine.
"""
from __future__ import annotations

from typing import Any

from .app import App
from .config import existing_config_python
from .output import say

USAGE = """\
用法 / Usage: bash 1键推理.sh [start|stop|status|doctor] [options]

子命令 / Subcommands:
  start     检查、安装 (仅首次)、启动服务 (默认) / check, install (first run only), start the server (default)
  stop      停止服务 (SIGTERM, 等待进行中的请求) / stop the servers (SIGTERM, in-flight requests finish); --port N: one
  status    是否在运行, 健康状态 / whether they run, and their /health
  doctor    打印引擎、生效配置与全部检查, 不启动 / print the engines, the effective configuration and every check

选项 / Options (each sets a manifest.yaml key; 优先级 / precedence: 参数 flag > 环境变量 env > manifest.yaml > 默认 default):
  --backend NAME        推理引擎 / inference engine: auto or a registered engine (listed below)   [backend]
  --model PATH          模型文件夹或 .gguf / model folder or .gguf                              [model.path]
  --port N              端口 / port                                                             [server.port]
  --host H              监听地址 / bind address                                                 [server.host]
  --manifest P          配置文件 / manifest file (default: manifest.yaml in the app folder)
  --device auto|cuda|cpu        transformers 设备 / transformers device                         [transformers.device]
  --torch reuse|cpu|cuda        torch 来源: 复用平台 / CPU 版 / CUDA 版 / reuse the platform's torch, or install a build [install.torch]
  --index-url URL       pip 镜像 / pip mirror                                                   [install.index_url]
  --offline             只用 wheels/ 安装, 不下载模型 / install from wheels/ only, never download
  --llama-cpu           有 GPU 也编译 CPU 版 llama.cpp / build llama.cpp for the CPU even with a GPU
  --set KEY=VALUE       任意配置键 / any manifest key, e.g. --set remote.base_url=http://127.0.0.1:8000/v1 (repeatable)
  --daemon              后台运行, 日志 logs/server-<port>.log, pid run/server-<port>.json / run in the background
  -h, --help            显示本帮助 / show this help

环境变量 / Environment:
  每个配置键 / every manifest key: VT_<SECTION>__<KEY>, e.g. VT_SERVER__MAX_QUEUE=8, VT_GENERATION__TEMPERATURE=0.3;
  常用键的短名 (见下) / short names of common keys (below): VT_BACKEND, VT_MODEL, VT_PORT, …
  VT_ENGINE_MODULES 额外的引擎模块 / more engine modules (comma separated; PYTHONPATH must reach them)
  VT_PYTHON         使用的 Python / the Python to use (must be ≥ 3.10)
  VT_MIN_FREE_GB    需要的空闲磁盘 / free disk required (GB)
  VT_START_TIMEOUT  等待 /health 的秒数 / seconds to wait for /health (default 1800)
  VT_INDEX_TIMEOUT  pip 源连通性检查超时 / pip index reachability timeout (s, default 15)
  PIP_INDEX_URL     pip 镜像 / pip mirror;   HF_ENDPOINT  Hugging Face 镜像 / mirror (e.g. https://hf-mirror.com)

示例 / Examples:
  bash 1键推理.sh                                   # ModelArts: then click 网页推理
  bash 1键推理.sh --model /root/models/vibethinker-gguf --port 8081
  bash 1键推理.sh --backend remote --set remote.base_url=http://127.0.0.1:8000/v1   # 在 vLLM 前面 / in front of vLLM
  VT_PORT=8081 bash 1键推理.sh --daemon && bash 1键推理.sh status && bash 1键推理.sh stop
"""

SECRETS = ("password", "api_key")
POINTER = """\
引擎与短环境变量 / Engines and short variables: printed here once the launcher can read the schema (after the
  first start has installed its libraries, or when this Python has pyyaml + pydantic + pydantic-settings);
  meanwhile see manifest.yaml (backend:, and the comments) or run: bash 1键推理.sh doctor"""


def engine_lines(engines: list[dict[str, Any]], auto: str) -> list[str]:
    width = max([len(e["name"]) for e in engines] + [4])
    lines = [f"  {'auto':<{width}}  {auto}"]
    for e in engines:
        extra = f" [plugin: {e['plugin']}]" if e.get("plugin") else ""
        lines.append(f"  {e['name']:<{width}}  {e['summary']}{extra}")
    return lines


def cmd_help(app: App) -> int:
    say(USAGE)
    _, answer = existing_config_python(app, "--engines")
    if answer is None or "engines" not in answer:
        say(POINTER if answer is None else f"引擎列表不可用 / the engine list is unavailable: {answer.get('error')}")
        return 0
    say("引擎 / Engines (--backend NAME, manifest backend:):")
    say("\n".join(engine_lines(answer["engines"], answer["help"]["auto"])))
    cfg, origins = answer.get("config"), answer.get("origins", {})
    say("\n短环境变量 / Short environment variables (→ manifest key; now = the effective value):")
    for item in answer["help"]["env"]:
        now = ""
        if cfg is not None:
            node: Any = cfg
            for part in item["key"].split("."):
                node = node[part]
            shown = "***" if node and item["key"].rsplit(".", 1)[-1] in SECRETS else repr(node)
            now = f"  (now {shown}, {origins.get(item['key'], 'default')})"
        say(f"  {item['var']:<20} {item['key']}{now}")
    return 0
