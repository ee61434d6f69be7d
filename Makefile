# tlsweep: sweep and track transfer-learning experiments on images.
# `make help` lists the targets; variables are passed as `make train DATASET=tf_flowers EPOCHS=3`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TLSWEEP := $(PY) -m sweeps.main  # the `tlsweep` command (console script of `pip install .`)
export TF_CPP_MIN_LOG_LEVEL ?= 3

# Pass a CLI flag only when its Make variable is set.
opt = $(if $($(1)),--$(2) $($(1)))

TRAIN_FLAGS = --dataset "$(DATASET)" $(call opt,BACKBONE,backbone) $(call opt,WEIGHTS,weights) \
	$(call opt,EPOCHS,epochs) $(call opt,FINE_TUNE_EPOCHS,fine-tune-epochs) $(call opt,FINE_TUNE_AT,fine-tune-at) \
	$(call opt,DROPOUT,dropout) $(call opt,BATCH_SIZE,batch-size) $(call opt,LEARNING_RATE,learning-rate) \
	$(call opt,FINE_TUNE_LEARNING_RATE,fine-tune-learning-rate) $(call opt,IMAGE_SIZE,image-size) \
	$(call opt,AUGMENT,augment) $(call opt,SEED,seed) $(call opt,SPLIT,split) $(call opt,OUTPUT,output) \
	$(if $(OVERWRITE),--overwrite) $(call opt,FEATURE_CACHE,feature-cache) \
	$(call opt,MIXED_PRECISION,mixed-precision) $(call opt,XLA,xla) \
	$(call opt,EARLY_STOPPING_PATIENCE,early-stopping-patience) $(call opt,CV_FOLDS,cv-folds)

.PHONY: help install test test-slow test-all train sweep sweep-chief sweep-worker server best-export report ui clean \
	clean-cache bench bench-memory bench-finetune bench-fixed-cost predict

DATASET ?=
EXPERIMENT ?=
EXPORT_DIR ?= exports
UI_PORT ?= 5000
ORACLE ?= 127.0.0.1:8000
SERVER_PORT ?= 5000
# Loopback only by default: MLflow's server has no authentication unless started with basic auth.
SERVER_HOST ?= 127.0.0.1
SERVER_STORE ?= sqlite:///$(CURDIR)/mlflow-server.db
SERVER_ARTIFACTS ?= $(CURDIR)/mlartifacts-server
# The tracking store: MLFLOW_TRACKING_URI when set, else SQLite mlflow.db here.
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export MLFLOW_TRACKING_URI
SWEEP_FLAGS = --dataset "$(DATASET)" $(call opt,SWEEP,sweep) $(call opt,EXPERIMENT,experiment) \
	$(call opt,MAX_TRIALS,max-trials) $(call opt,TUNER,tuner) $(call opt,SEED,seed) $(call opt,SPLIT,split) \
	$(if $(QUIET),--quiet) $(if $(VERBOSE),--verbose) $(if $(NO_FEATURE_CACHE),--no-feature-cache) $(call opt,LOG_MODELS,log-models) \
	$(call opt,TRIAL_PROCESS,trial-process) $(call opt,ON_CHANGE,on-change) $(call opt,MIXED_PRECISION,mixed-precision) \
	$(call opt,GPUS,gpus)

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY) ## create .venv/ and install the project with its pinned dependency ranges (+ Chromium for the tests)
	$(PY) -m pip install --quiet -e ".[test]"
	@# The headless-browser tests need Chromium; CI fails (not skips) without it. Installed where apt-get is.
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "installing chromium (apt-get) for the headless-browser tests"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq >/dev/null && \
		  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null; }; \
	else echo "note: no chromium and no apt-get: install Chromium for the headless-browser tests"; fi

test: ## fast tests (a few minutes; no network; real-data tests skip without ../shared/data)
	$(PY) -m pytest -q

test-slow: ## slow tests only: real training on ../shared/data/flower_photos
	$(PY) -m pytest -q -m slow

test-all: ## every test, fast and slow
	$(PY) -m pytest -q -m "slow or not slow"

train: ## train one configuration: DATASET= BACKBONE= [EPOCHS= FINE_TUNE_AT= ... OUTPUT=]
	@test -n "$(DATASET)" || { echo "usage: make train DATASET=<tfds name or folder> [BACKBONE=...]"; exit 2; }
	$(TLSWEEP) train $(TRAIN_FLAGS)

predict: ## top-k classes per image from an export: MODEL=<export dir> IMAGES=<file or folder> [TOP_K=3]
	@test -n "$(MODEL)" -a -n "$(IMAGES)" || { echo "usage: make predict MODEL=<export dir> IMAGES=<file or folder>"; exit 2; }
	$(TLSWEEP) predict --model "$(MODEL)" --images "$(IMAGES)" $(call opt,TOP_K,top-k)

sweep: ## Keras-Tuner search, every trial in MLflow: DATASET= [SWEEP=quick|<yaml>] [MAX_TRIALS= TUNER= EXPERIMENT= SEED= GPUS=all|0,1]
	@test -n "$(DATASET)" || { echo "usage: make sweep DATASET=<tfds name or folder> [SWEEP=quick]"; exit 2; }
	$(TLSWEEP) sweep $(SWEEP_FLAGS)

sweep-chief: ## distributed sweep, chief: serves the Keras Tuner oracle on ORACLE=host:port; same variables as sweep
	@test -n "$(DATASET)" || { echo "usage: make sweep-chief DATASET=... MLFLOW_TRACKING_URI=http://<server>:5000"; exit 2; }
	$(TLSWEEP) sweep $(SWEEP_FLAGS) --role chief --oracle "$(ORACLE)"

sweep-worker: ## distributed sweep, worker: runs trials from the chief's oracle: WORKER=<unique id> + sweep's variables
	@test -n "$(DATASET)" -a -n "$(WORKER)" || { echo "usage: make sweep-worker DATASET=... WORKER=w1 MLFLOW_TRACKING_URI=http://<server>:5000"; exit 2; }
	$(TLSWEEP) sweep $(SWEEP_FLAGS) --role worker --oracle "$(ORACLE)" --worker-id "$(WORKER)"

server: ## MLflow tracking server: SERVER_HOST=127.0.0.1 (another address needs MLFLOW_TRACKING_USERNAME/PASSWORD: basic auth) SERVER_PORT= SERVER_STORE= SERVER_ARTIFACTS= [SERVER_AUTH=1]
	$(TLSWEEP) server --host "$(SERVER_HOST)" --port $(SERVER_PORT) --store "$(SERVER_STORE)" \
		--artifacts "$(SERVER_ARTIFACTS)" $(if $(SERVER_AUTH),--auth)

best-export: ## export the best trial by val_accuracy: EXPERIMENT= [EXPORT_DIR=exports/] [OVERWRITE=1] [TFLITE=float16|dynamic] [MAX_LATENCY_MS= MAX_SIZE_MB=]
	@test -n "$(EXPERIMENT)" || { echo "usage: make best-export EXPERIMENT=<name, e.g. tf_flowers>"; exit 2; }
	$(TLSWEEP) best-export --experiment "$(EXPERIMENT)" --export-dir "$(EXPORT_DIR)" $(if $(OVERWRITE),--overwrite) $(call opt,TFLITE,tflite) \
		$(call opt,MAX_LATENCY_MS,max-latency-ms) $(call opt,MAX_SIZE_MB,max-size-mb)

report: ## leaderboard + self-contained HTML/markdown report of an experiment: EXPERIMENT= [REPORT_DIR=reports/]
	@test -n "$(EXPERIMENT)" || { echo "usage: make report EXPERIMENT=<name, e.g. tf_flowers>"; exit 2; }
	$(TLSWEEP) report --experiment "$(EXPERIMENT)" $(call opt,REPORT_DIR,out-dir)

ui: ## MLflow's UI on the tracking store at http://127.0.0.1:5000; prints each sweep's runs link [UI_PORT= EXPERIMENT=]
	$(TLSWEEP) ui --tracking-uri "$(MLFLOW_TRACKING_URI)" --port $(UI_PORT) $(call opt,EXPERIMENT,experiment)

clean: ## remove sweep state, exports and the local tracking store (asks first)
	@read -p "delete sweeps_state/ exports/ mlflow.db mlartifacts/? [y/N] " ok && [ "$$ok" = y ] && \
	rm -rf sweeps_state exports mlflow.db mlartifacts || echo kept

clean-cache: ## empty the frozen-feature cache (TLSWEEP_CACHE/features, default ~/.cache/tlsweep/features)
	rm -rf "$${TLSWEEP_CACHE:-$$HOME/.cache/tlsweep}/features"

bench: ## plain Keras Tuner vs our default sweep (fine-tuning included), tracked and untracked, on a flower_photos subset; fails if the draws differ [BENCH_ARGS="--trials 6 --per-class 40 --split-overhead"]
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

bench-memory: ## resident memory after each of 10 fine-tuning trials of a sweep, prints growth_mb= [MEMORY_ARGS="--trial-process same"]
	$(PY) -m benchmarks.bench_memory $(MEMORY_ARGS)

bench-finetune: ## fine-tuning end to end vs only the top on cached cut activations, flower_photos 224 px [FINETUNE_ARGS="--whole-trial": whole trials, head phase included]
	$(PY) -m benchmarks.bench_finetune $(FINETUNE_ARGS)

bench-fixed-cost: ## a trial's wall time minus its training steps: head trial in-process, fine-tuning trial fresh [FIXED_ARGS=--repeats 2]
	$(PY) -m benchmarks.bench_fixed_cost $(FIXED_ARGS)
