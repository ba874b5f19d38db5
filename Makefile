# The project's verbs. Everything runs from the virtual environment that `make install` builds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev,edge,deploy,ui
OVERLAY ?= gpu
KUBECTL ?= kubectl
NAMESPACE ?= superwav2lip
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help

.PHONY: install deps protos models models-dev lint test run bench bench-all bench-avatar bench-detection bench-stages bench-int8 bench-seed bench-live fuzz soak hostile gpu-check device-bundle clean k8s-validate deploy rollback images

help:  ## this list: every target with what it does, then the variables you may set (make VAR=value target)
	@awk 'match($$0, /^[a-zA-Z0-9_-]+:/) { name = substr($$0, 1, RLENGTH - 1); doc = $$0; \
		if (sub(/^[^#]*## /, "", doc) == 0) doc = "(no ## comment: see the Makefile)"; \
		printf "  %-16s %s\n", name, doc } \
		/^[A-Z_]+ \?= / { vars = vars " " $$1 "=" $$3 } \
		END { print "\nvariables:" vars }' $(firstword $(MAKEFILE_LIST))
.PHONY: help

install: $(VENV)/.installed  ## the virtualenv in .venv with the project and its extras (EXTRAS=...), once per pyproject.toml change

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

deps:  ## the system programs the tests start for real (redis-server, chromium, ffprobe, curl, openssl, coturn): apt-get installs the missing ones
	$(PYTHON) tools/system_deps.py

protos: install  ## regenerate stubs, .pyi and the Envoy descriptor set from protos/ (and the Kubernetes Envoy config that embeds it)
	$(PY) tools/gen_protos.py
	$(PY) -m deploy.k8s.edge

models: install  ## download and verify the real weights (needs internet)
	$(PY) -m service_runtime.model_store

models-dev: install  ## generate small random-weight models into models/dev
	$(PY) -m service_runtime.dev_models

lint: install  ## ruff (unused imports and names, syntax) and mypy (service_runtime, gateway and the SDK type-check)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: install deps  ## the whole suite in TEST_WORKERS processes, a test file per worker at a time, then the real-time (live) tests alone (first installs the missing system programs: make deps)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not realtime and not soak and not hostile"
	$(PY) -m pytest -q -p no:cacheprovider -m "realtime and not soak and not hostile"

gpu-check: install  ## on a CUDA machine (pip install -e .[gpu]): each model on CUDA and TensorRT vs CPU, latency at batch 1/8/32
	$(PY) -m tools.gpu_check

device-bundle: install  ## wheels the GPU machine lacks (CPython 3.12, CUDA 13 onnxruntime-gpu) as parts of <= 60 MiB in .run/device-bundle/ (docs/gpu.md)
	$(PY) -m tools.device.bundle

FUZZ_SECONDS ?= 60

fuzz: install  ## coverage-guided fuzzing (atheris) of every target, FUZZ_SECONDS in all; prints a table, fails on a crash
	$(PY) -m fuzz --seconds $(FUZZ_SECONDS)

soak: install deps  ## 200 generations from 8 clients against the running stack (memory, fds, threads, temp files), then a 60 s fuzz run
	$(PY) -m pytest -q -s -p no:cacheprovider -m soak tests/e2e/soak
	$(MAKE) fuzz FUZZ_SECONDS=60

hostile: install deps  ## attacks on real processes (tests/hostile): key-less floods through Envoy, slow and greedy clients, media bombs, altered Redis records, webhooks to private addresses
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m hostile tests/hostile

clean:  ## remove generated demo weights and test caches (models/dev, .pytest_cache)
	rm -rf models/dev .pytest_cache

run: install  ## start the whole stack on CPU (real weights when present, generated ones otherwise)
	$(PY) -m tools.run_stack

bench: install  ## throughput (batched vs the seed's lock), gateway memory and wire bytes; prints tables
	$(PY) -m bench.throughput

bench-all: install  ## every benchmark in turn (about 15 minutes on 2 cores); their durations go into bench/RESULTS.md
	$(PY) -m bench.all

bench-detection: install  ## detection cost and agreement by input size on the real clips; writes bench/RESULTS.md
	$(PY) -m bench.detection

bench-stages: install  ## one job's time by stage, from the services' own metrics; writes bench/RESULTS.md
	$(PY) -m bench.stages

bench-int8: install  ## int8 against fp32 Wav2Lip on real face crops: speed-up and output error; writes bench/RESULTS.md
	$(PY) -m bench.int8

bench-seed: install  ## the seed's comparison: a process per request vs resident services, with and without GFPGAN; writes bench/RESULTS.md
	$(PY) -m bench.seed

bench-avatar: install  ## fresh vs plan-cache hit vs avatar request on the same clip; writes bench/RESULTS.md
	$(PY) -m bench.avatar

bench-live: install  ## live sessions (1, 2, 4 at 720p and 512x512): fps, latency, first frame vs Wav2Lip alone; writes bench/RESULTS.md
	$(PY) -m bench.live

k8s-validate: install  ## render every overlay (kubectl wheel's kustomize), validate offline, apply policies, hadolint
	$(PY) -m deploy.k8s.validate

# deploy and rollback need only the standard library and your kubectl (and its current context).
deploy:  ## apply deploy/k8s/overlays/$(OVERLAY), wait for every rollout and /healthz; on failure explain and roll back
	$(PYTHON) -m deploy.k8s.rollout deploy --overlay deploy/k8s/overlays/$(OVERLAY) --kubectl $(KUBECTL) \
		--namespace $(NAMESPACE)

rollback:  ## undo the last rollout of each Deployment, wait, check /healthz
	$(PYTHON) -m deploy.k8s.rollout rollback --kubectl $(KUBECTL) --namespace $(NAMESPACE)

images:  ## print the image build commands; RUN=1 runs them with docker, PUSH=1 pushes too
	$(PYTHON) -m deploy.docker.images $(if $(RUN),--run) $(if $(PUSH),--push)
