#!/usr/bin/env bash
# 1键推理.sh — 一键启动 VibeThinker 网页推理 / one-click start of the VibeThinker web app.
# Run it from the extracted bundle (or a git checkout). This file only finds a Python ≥ 3.10 (Gradio 6 needs it);
# everything else (checks, install, model, server) is bundle/oneclick.py, standard library only.
set -uo pipefail

APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# In a source checkout this file lives in scripts/ (the repository root has a link to it):
# the app is the folder above.
if [ ! -d "$APP_DIR/bundle" ] && [ -d "$APP_DIR/../bundle" ]; then
    APP_DIR="$(cd "$APP_DIR/.." && pwd)"
fi
MIN_MAJOR=3
MIN_MINOR=10
CONDA_ENV="$APP_DIR/.conda-py311"

usage() {
    cat <<'EOF'
用法 / Usage: bash 1键推理.sh [start|stop|status|doctor] [options]

子命令 / Subcommands:
  start     检查、安装 (仅首次)、启动服务 (默认) / check, install (first run only), start the server (default)
  stop      停止服务 (SIGTERM, 等待进行中的请求) / stop the server (SIGTERM, in-flight requests finish)
  status    是否在运行, 健康状态 / whether it runs, and its /health
  doctor    打印生效配置与全部检查, 不启动 / print the effective configuration and every check, start nothing

选项 / Options:
  --backend transformers|llamacpp|auto   推理后端 / inference backend (manifest: backend)
  --model PATH          模型文件夹或 .gguf / model folder or .gguf (default /root/models/vibethinker-1.5b-app)
  --port N              端口 / port (default 8080)
  --host H              监听地址 / bind address (default 0.0.0.0)
  --manifest P          配置文件 / manifest file (default ./manifest.yaml)
  --device auto|cuda|cpu        transformers 设备 / transformers device
  --torch reuse|cpu|cuda        torch 来源: 复用平台 / CPU 版 / CUDA 版 / torch: reuse the platform's, CPU or CUDA build
  --index-url URL       pip 镜像 / pip mirror (manifest: install.index_url)
  --offline             只用 wheels/ 安装, 不下载模型 / install from wheels/ only, never download
  --llama-cpu           有 GPU 也编译 CPU 版 llama.cpp / build llama.cpp for the CPU even with a GPU
  --daemon              后台运行, 日志 logs/server.log, pid run/server.json / run in the background
  -h, --help            显示本帮助 / show this help

环境变量 / Environment (优先级 / precedence: 参数 flag > 环境变量 env > manifest.yaml > 默认 default):
  VT_BACKEND  VT_MODEL  VT_PORT  VT_HOST  VT_DEVICE  VT_MODEL_ID  VT_GGUF_QUANT  VT_ROOT_PATH
  VT_API_KEY  VT_USERNAME  VT_PASSWORD  VT_THINKING_BUDGET  VT_MAX_NEW_TOKENS     (manifest keys, see manifest.yaml)
  VT_PYTHON         使用的 Python / the Python to use (must be ≥ 3.10)
  VT_MIN_FREE_GB    需要的空闲磁盘 / free disk required (GB)
  VT_START_TIMEOUT  等待 /health 的秒数 / seconds to wait for /health (default 1800)
  VT_INDEX_TIMEOUT  pip 源连通性检查超时 / pip index reachability timeout (s, default 15)
  PIP_INDEX_URL     pip 镜像 / pip mirror;   HF_ENDPOINT  Hugging Face 镜像 / mirror (e.g. https://hf-mirror.com)

示例 / Examples:
  bash 1键推理.sh                                   # ModelArts: then click 网页推理
  bash 1键推理.sh --backend llamacpp --model /root/models/vibethinker-gguf
  VT_PORT=8081 bash 1键推理.sh --daemon && bash 1键推理.sh status && bash 1键推理.sh stop
EOF
}

for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
    esac
done

# "3.11.7" for a Python, nothing when it does not run.
py_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null | tail -n 1; }
version_ok() {
    local major minor
    IFS=. read -r major minor _ <<<"$1"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    (( major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR) ))
}

PY=""
TRIED=()
try_python() {
    local exe version
    exe="$(command -v "$1" 2>/dev/null)" || return 1
    version="$(py_version "$exe")"
    if [ -n "$version" ] && version_ok "$version"; then
        PY="$exe"
        return 0
    fi
    TRIED+=("$exe (${version:-does not run})")
    return 1
}

if [ -n "${VT_PYTHON:-}" ]; then
    try_python "$VT_PYTHON" || true
else
    for candidate in python3 python "$CONDA_ENV/bin/python" python3.13 python3.12 python3.11 python3.10; do
        try_python "$candidate" && break
    done
fi

if [ -z "$PY" ] && [ -z "${VT_PYTHON:-}" ] && command -v conda >/dev/null 2>&1; then
    echo "⚠ 没有 Python ≥ ${MIN_MAJOR}.${MIN_MINOR}, 用 conda 创建 / no Python ≥ ${MIN_MAJOR}.${MIN_MINOR}: creating one with conda:"
    echo "  conda create -y -p $CONDA_ENV python=3.11"
    if conda create -y -p "$CONDA_ENV" python=3.11; then
        try_python "$CONDA_ENV/bin/python" || true
    else
        echo "✖ conda create 失败 / conda create failed (see above)"
    fi
fi

if [ -z "$PY" ]; then
    echo "✖ 需要 Python ≥ ${MIN_MAJOR}.${MIN_MINOR} (Gradio 6) / Python ≥ ${MIN_MAJOR}.${MIN_MINOR} is required (Gradio 6)."
    echo "  找到 / found: ${TRIED[*]:-no python3 on PATH}"
    echo "  修复 / Fix, one of:"
    echo "    conda create -y -p $CONDA_ENV python=3.11        # then rerun: bash 1键推理.sh"
    echo "    apt-get install -y python3.11 python3.11-venv      # then: VT_PYTHON=python3.11 bash 1键推理.sh"
    exit 1
fi

export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}"
cd "$APP_DIR" || exit 1
exec "$PY" -m bundle.oneclick --app-dir "$APP_DIR" "$@"
