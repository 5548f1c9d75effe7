# The morph service: DiffMorpher behind TorchServe 0.12, gRPC client, Locust capacity tests.
#   make demo   fresh clone -> venv, archive, server, one streamed morph -> out/morph.gif, stop
#   make test   every test, including a real TorchServe end to end
# Every target is idempotent: re-running does only what is out of date.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
STUBS := grpc_api/_generated/inference_pb2_grpc.py
INSTALLED := $(VENV)/.installed
LPIPS := .cache/lpips/lpips_alex_backbone.safetensors

MODEL ?= models/tiny-shapes-sd
MODEL_NAME ?= diffmorpher
ARCHIVE_FORMAT ?= default
WEIGHTS ?= copy
# MODEL may be one original single-file checkpoint (.safetensors): SD 2.x files need
# SINGLE_FILE_ARCH=sd21-base|sd21; .ckpt/.pt/.bin pickles need TRUST_PICKLE=1 (they run code).
SINGLE_FILE_ARCH ?=
TRUST_PICKLE ?=
DEVICE_TYPE ?= cpu
MAR := model_store/$(MODEL_NAME).mar
GRPC_TARGET ?= 127.0.0.1:7070
SERVE_TIMEOUT ?= 600

DEMO_A := assets/demo/red_circle.png
DEMO_B := assets/demo/blue_triangle.png
DEMO_FRAMES ?= 16
# Morph options for the demo (any MorphConfig field, key=value), sized for a 2-core CPU.
DEMO_OPTIONS ?= lora_steps=100 num_inference_steps=25
PYTEST_ARGS ?=

.PHONY: help setup stubs export serve stop demo test loadtest soak bench train-model clean web image image-test

help:
	@echo "make setup     venv with pinned deps (torch 2.14.1 via constraints.txt), the project (editable), gRPC stubs, LPIPS weights"
	@echo "make export    model_store/$(MODEL_NAME).mar from MODEL=$(MODEL), a diffusers folder or a single .safetensors (ARCHIVE_FORMAT=default|zip-store|no-archive, WEIGHTS=copy|external, SINGLE_FILE_ARCH=sd21-base|sd21|sd15|sdxl-base, TRUST_PICKLE=1)"
	@echo "make serve     start TorchServe in the background (config.properties), wait until the model is ready"
	@echo "               CLIENT_TOKENS=<file|dir>: the guard checks clients' tokens itself (guard/client_auth.py)"
	@echo "make stop      stop it"
	@echo "make demo      setup + export + serve + streamed gRPC morph of the demo images -> out/morph.gif, out/morph.mp4 + stop"
	@echo "make test      all tests (unit, core, end to end on a real TorchServe)"
	@echo "make loadtest  Locust capacity run (own TorchServe, or LOADTEST_ARGS=\"--target 127.0.0.1:7070\")"
	@echo "make bench     baseline vs default (cold, warm cache): stage times, ratios, quality -> benchmarks/results/"
	@echo "make soak      30-minute soak: mixed good/hostile requests, worker RSS/fd trends (SOAK_MINUTES=...)"
	@echo "make train-model  retrain the embedded model into models/tiny-shapes-sd"
	@echo "make eval      MorphBench with MODEL=<sd folder> BENCH=<MorphBench folder>: PPL, PDV, endpoint PSNR/LPIPS, FID (EVAL_ARGS=\"--device cuda --dtype float16\")"
	@echo "make sized-e2e ARCH=sd15|sd21-base|sd21|sdxl-base: a real-size random-weight model served and morphed at its native resolution"
	@echo "make gpu-check on a CUDA host: SD 2.1-base-sized bf16 morphs, presets x compile x cold/warm, sync check, profiler, FLOP floors (GPU_CHECK_ARGS=--fake: no GPU)"
	@echo "make image     the serving image (deploy/image/Dockerfile) built with podman, from a local stand-in base where no registry serves it"
	@echo "make image-test  a container of it served and morphed through its published ports, then stopped with SIGTERM (IMAGE_TEST_ARGS=--grace N)"
	@echo "make web       the morph web page on http://127.0.0.1:$(WEB_PORT)/ against make serve's TorchServe (started if needed)"

# ---------------------------------------------------------------------------- setup
setup: $(STAMP) $(INSTALLED) $(STUBS) $(LPIPS)

$(STAMP): requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -r requirements.txt
	@touch $@

# The project itself, editable: every package imports by its name from anywhere (pyproject.toml).
$(INSTALLED): pyproject.toml | $(STAMP)
	$(PY) -m pip install -c constraints.txt --no-deps --no-build-isolation -e .
	@touch $@

stubs: $(STUBS)

$(STUBS): grpc_api/proto/inference.proto | $(INSTALLED)
	$(PY) -m grpc_api.stubs

$(LPIPS): | $(INSTALLED)
	$(PY) -m export.lpips_weights prepare

# ---------------------------------------------------------------------------- archive
# Always rebuilt (seconds for the embedded model): MODEL may point anywhere.
export: setup
	$(PY) -m export --model "$(MODEL)" --name $(MODEL_NAME) --archive-format $(ARCHIVE_FORMAT) \
		--weights $(WEIGHTS) --device-type $(DEVICE_TYPE) \
		$(if $(SINGLE_FILE_ARCH),--single-file-arch $(SINGLE_FILE_ARCH)) $(if $(TRUST_PICKLE),--trust-pickle)

# ---------------------------------------------------------------------------- server
# TorchServe writes key_file.json (the tokens) and logs/ into the directory it starts from. The
# guard (gateway on 7070, watchdog, token rotation, health on 8090) runs beside it; both share
# the control directory (cancellation markers, worker heartbeats). Ready means a morph would be
# served: the model's worker READY (management API) and the gateway answering; a worker that
# dies loading fails `make serve` at once with its error (client wait --model-ready).
CONTROL_DIR := $(CURDIR)/logs/control
GUARD_PID := logs/guard.pid
export DIFFMORPHER_CONTROL_DIR := $(CONTROL_DIR)
# Fitted LoRAs and inverted latents, kept across restarts (handler.cache_dir in model-config.yaml).
export DIFFMORPHER_CACHE_DIR ?= $(CURDIR)/.cache/morph

serve: setup
	@test -e $(MAR) -o -d model_store/$(MODEL_NAME) || $(MAKE) --no-print-directory export
	@if $(PY) -m client --target $(GRPC_TARGET) --key-file key_file.json wait --timeout 2 >/dev/null 2>&1; then \
		echo "TorchServe is already serving on $(GRPC_TARGET)"; \
	else \
		rm -f key_file.json; \
		mkdir -p logs $(CONTROL_DIR); \
		log_offset=$$(stat -c %s logs/model_log.log 2>/dev/null || echo 0); \
		PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/torchserve --start --ncs --ts-config config.properties >>logs/torchserve.out 2>&1; \
		echo "TorchServe starting (log: logs/torchserve.out, logs/model_log.log)"; \
		if ! { test -f $(GUARD_PID) && kill -0 $$(cat $(GUARD_PID)) 2>/dev/null; }; then \
			nohup $(PY) -m guard --ts-config config.properties --key-file key_file.json \
				$(if $(CLIENT_TOKENS),--client-tokens $(CLIENT_TOKENS)) >>logs/guard.out 2>&1 & \
			echo $$! > $(GUARD_PID); \
			echo "guard started (gateway $(GRPC_TARGET), health http://127.0.0.1:8090/healthz, log: logs/guard.out)"; \
		fi; \
		$(PY) -m client --target $(GRPC_TARGET) --key-file key_file.json wait --timeout $(SERVE_TIMEOUT) \
			--model-ready --ts-config config.properties --model-log logs/model_log.log --log-offset $$log_offset \
			|| { echo "stopping TorchServe and the guard (make stop)"; $(MAKE) --no-print-directory stop >/dev/null 2>&1; exit 1; }; \
	fi

stop:
	@if test -f $(GUARD_PID); then kill $$(cat $(GUARD_PID)) 2>/dev/null || true; rm -f $(GUARD_PID); fi
	@if test -x $(VENV)/bin/torchserve; then $(VENV)/bin/torchserve --stop || true; fi

# ---------------------------------------------------------------------------- demo
demo: setup export
	@rm -rf out/frames; mkdir -p out
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory serve; \
	trap '$(MAKE) --no-print-directory stop >/dev/null' EXIT; \
	served=$$(date +%s); \
	prompt_a=$$($(PY) -c 'import json; print(json.load(open("assets/demo/prompts.json"))["red_circle.png"])'); \
	prompt_b=$$($(PY) -c 'import json; print(json.load(open("assets/demo/prompts.json"))["blue_triangle.png"])'); \
	$(PY) -m client --target $(GRPC_TARGET) --key-file key_file.json morph $(DEMO_A) $(DEMO_B) \
		--prompt-a "$$prompt_a" --prompt-b "$$prompt_b" --frames $(DEMO_FRAMES) \
		$(foreach opt,$(DEMO_OPTIONS),--option $(opt)) \
		--stream --out out/morph.gif --out out/morph.mp4 --frames-dir out/frames \
		--metadata-out out/metadata.json; \
	$(PY) -m client strip out/frames --out out/strip.png; \
	done_=$$(date +%s); \
	echo "server start $$((served - start)) s, morph $$((done_ - served)) s (stages: out/metadata.json)"; \
	echo "Result: $(CURDIR)/out/morph.gif (also out/morph.mp4, out/frames/, out/strip.png)"

# ---------------------------------------------------------------------------- tests
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Locust's distributed mode: 1 master + LOADTEST_WORKERS workers, against LOADTEST_REPLICAS own
# replicas, or TARGET= running ones (comma-separated); LOADTEST_ARGS come last and win.
LOADTEST_WORKERS ?= 2
LOADTEST_REPLICAS ?= 2
loadtest: setup
	$(PY) -m loadtest.run --workers $(LOADTEST_WORKERS) $(if $(TARGET),--target $(TARGET)) \
		$(if $(TARGET)$(findstring --target,$(LOADTEST_ARGS)),,--replicas $(LOADTEST_REPLICAS)) $(LOADTEST_ARGS)

# The same morphs as the paper's implementation runs them (baseline), on the service's path with
# an empty cache, and again on the filled cache: stage times, ratios, memory, PPL/PDV/PSNR.
bench: setup
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

# Mixed good and hostile requests on an own server; worker RSS/fd trends in the report
# (loadtest/results/soak-<time>/). `make test` runs a 3-minute version (tests/test_soak.py).
SOAK_MINUTES ?= 30
soak: setup
	$(PY) -m reliability.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# The shipped model's recipe (models/tiny-shapes-sd/training.json): the VAE with its
# latent-interpolation loss, the UNet with a quarter of each batch blend scenes on lerped
# text, then 1000 more UNet steps at half the learning rate. About 30 min on 2 idle cores.
BLEND_ARGS := --blend-fraction 0.25 --blend-images 5000
train-model: setup
	$(PY) -m embedded_model train --out models/tiny-shapes-sd --vae-colour-lerp 3000 $(BLEND_ARGS)
	$(PY) -m embedded_model continue-unet --out models/tiny-shapes-sd --unet-steps 1000 --lr 5e-4 $(BLEND_ARGS)

clean:
	rm -rf out logs grpc_api/_generated model_store/*.mar key_file.json

# ---------------------------------------------------------------------------- MorphBench
# The paper's benchmark on any SD folder (benchmarks/morphbench.py, docs/quality.md "MorphBench"):
# per pair and overall PPL/PDV (17 frames), endpoint PSNR/LPIPS, and FID where Inception weights
# are given (EVAL_ARGS="--inception-weights PATH" or $$DIFFMORPHER_INCEPTION_WEIGHTS); results in
# benchmarks/results/morphbench-<time>/. On a GPU: EVAL_ARGS="--device cuda --dtype float16".
BENCH ?=
EVAL_ARGS ?=
.PHONY: eval
eval: setup
	@test -n "$(BENCH)" || { echo "make eval needs BENCH=<MorphBench folder> (Metamorphosis/ and Animation/ holding <name>_0.png, <name>_1.png)"; exit 2; }
	$(PY) -m benchmarks.morphbench --model "$(MODEL)" --bench "$(BENCH)" $(EVAL_ARGS)

# ---------------------------------------------------------------------------- real-size models
# A random-weight model of a published architecture (checkpoints/architectures.py: sd15, sd21-base,
# sd21, sdxl-base) exported, served and morphed at its native resolution with tiny step counts:
# archive size, time to ready, worker peak RSS, seconds per stage and per UNet call.
ARCH ?= sd15
.PHONY: sized-e2e
sized-e2e: setup
	$(PY) -m benchmarks.sized_e2e --arch $(ARCH) $(if $(DTYPE),--dtype $(DTYPE))

# ---------------------------------------------------------------------------- GPU check
# The one command for a CUDA host (benchmarks/gpu_check.py, docs/gpu-check.md): a random-weight
# SD 2.1-base-sized model in bf16 at 512 px, default and fast presets, cold and warm, compile off
# and on, a sync-debug pass, a profiler summary, each morph against its FLOP floor; JSON in
# benchmarks/results/gpu-check-<time>.json. GPU_CHECK_ARGS="--fake": the same on fake CUDA (CI).
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: setup
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# ---------------------------------------------------------------------------- web page
# A client of the service (python -m web, no torch): `make serve` first (a no-op when it already
# runs), then the page in the foreground until Ctrl-C; `make stop` stops the service.
WEB_PORT ?= 7860
WEB_ARGS ?=
web: setup
	@$(MAKE) --no-print-directory serve
	$(PY) -m web --port $(WEB_PORT) --target $(GRPC_TARGET) --key-file key_file.json --ts-config config.properties $(WEB_ARGS)

# ---------------------------------------------------------------------------- serving image
# deploy/image/Dockerfile built here with podman (installed with apt when missing, root only):
# the base python:3.11-slim-bookworm is made locally with debootstrap when no registry serves it,
# pip reads this host's local package indices and keeps its cache between builds; prints the
# image's size and build time. The tag is deploy/image_build.py's IMAGE.
image: setup
	$(PY) -m deploy.image_build

# A container of that image laid out as deploy/base's pod, with model_store/$(MODEL_NAME).mar:
# /healthz, one morph through the published gateway with the client, frames checked, SIGTERM
# drains within the grace period, container removed (deploy/image_smoke.py).
IMAGE_TEST_ARGS ?=
image-test: image
	@test -e $(MAR) || $(MAKE) --no-print-directory export
	$(PY) -m deploy.image_smoke --model-store model_store $(IMAGE_TEST_ARGS)
