#!/usr/bin/env bash
# Install Modular MAX (`max serve`, the external engine of workers/chat/external) into its OWN virtualenv,
# .venv-max: MAX pins transformers 5.12, which must not replace Axion's. Once per version (stamp file).
# The OpenTelemetry pins spare pip's resolver a backtrack it gives up on (ResolutionImpossible): MAX wants
# opentelemetry-sdk <1.36 while the newest exporters want the newest SDK.
#   scripts/install_max.sh          AXION_SKIP_MAX=1 skips it (a machine that never runs the engine tests)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${AXION_SKIP_MAX:-}" ] && exit 0
python="${PYTHON:-python3}"
max_version="26.7.0"
otel="1.35.0"
stamp=".venv-max/.installed-max-${max_version}"
[ -f "$stamp" ] && exit 0
[ -x .venv-max/bin/python ] || "$python" -m venv .venv-max
echo "install: MAX ${max_version} into .venv-max (about 1.6 GB, once)"
.venv-max/bin/python -m pip install --quiet --disable-pip-version-check "max[serve]==${max_version}" \
  "opentelemetry-api==${otel}" "opentelemetry-sdk==${otel}" "opentelemetry-exporter-otlp-proto-grpc==${otel}" \
  "opentelemetry-exporter-otlp-proto-http==${otel}" "opentelemetry-exporter-prometheus==0.56b0"
touch "$stamp"
