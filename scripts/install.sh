#!/usr/bin/env bash
# Create .venv and install Axion into it, once per pyproject.toml version (a stamp file skips repeats).
#   scripts/install.sh        runtime only       scripts/install.sh test   with the test tools
# torch comes first and on purpose: the CUDA build where `nvidia-smi` sees a GPU, else the CPU build, so a CPU
# machine never downloads gigabytes of CUDA wheels. Where pip is configured with a local wheel folder
# (find-links), the pinned CPU wheel there is used; otherwise PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
torch_version="2.13.0"
stamp=".venv/.installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)${extra:+-$extra}"
# The test extra also gets Modular MAX, in its own .venv-max (own stamp): the engine tests run the real `max serve`;
# and vLLM in .venv (scripts/install_vllm.sh, own stamp): the backend tests run BACKEND=vllm on its CPU build.
if [ "$extra" = "test" ]; then scripts/install_max.sh; fi
vllm_too() { if [ "$extra" = "test" ]; then scripts/install_vllm.sh; fi; }
# The console test drives the system's chromium (Debian's package): installed where apt-get may, else skipped.
chromium_too() {
  if [ "$extra" = "test" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
      && [ "$(id -u)" = 0 ]; then
    echo "install: chromium (Debian's package) for the web console's test"
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
      || echo "install: chromium could not be installed; tests/test_console_e2e.py will be skipped"
  fi
}
chromium_too
[ -f "$stamp" ] && { vllm_too; exit 0; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: GPU found, installing CUDA torch ${torch_version}"
    "${pip[@]}" "torch==${torch_version}"
  elif [ -n "${PIP_FIND_LINKS:-}" ] || .venv/bin/python -m pip config list 2>/dev/null | grep -q find-links; then
    echo "install: no GPU, installing CPU torch ${torch_version} from the configured wheel folder"
    "${pip[@]}" "torch==${torch_version}"
  else
    echo "install: no GPU, installing CPU torch ${torch_version} from PyTorch's CPU index"
    "${pip[@]}" "torch==${torch_version}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".${extra:+[$extra]}"
rm -f .venv/.installed-*
touch "$stamp"
vllm_too
