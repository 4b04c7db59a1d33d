#!/usr/bin/env bash
# 1键推理.sh — 一键启动 VibeThinker 网页推理 / one-click start of the VibeThinker web app.
# Run it from the extracted bundle (or a git checkout). This file only finds a Python ≥ 3.10 (Gradio 6 needs it);
# everything else (checks, install, model, server, --help) is bundle/launcher/, standard library only.
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

# --help is printed by the launcher (bundle/launcher/usage.py): it lists the registered engines
# and the manifest's environment variables, which only the app knows. It needs a Python, never
# installs anything, and never creates a conda environment.
WANT_HELP=0
for arg in "$@"; do
    case "$arg" in
        -h | --help) WANT_HELP=1 ;;
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

if [ -z "$PY" ] && [ -z "${VT_PYTHON:-}" ] && [ "$WANT_HELP" = 0 ] && command -v conda >/dev/null 2>&1; then
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

# The app folder first; the user's own PYTHONPATH (plugin engines: VT_ENGINE_MODULES) is kept
# behind it and passed on to the configuration check and the server.
export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}"
cd "$APP_DIR" || exit 1
exec "$PY" -m bundle.launcher --app-dir "$APP_DIR" "$@"
