# tlsweep: sweep and track transfer-learning experiments on images.
# `make help` lists the targets; variables are passed as `make train DATASET=tf_flowers EPOCHS=3`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TLSWEEP := $(PY) -m sweeps.main  # the `tlsweep` command (console script of `pip install .`)
export TF_CPP_MIN_LOG_LEVEL ?= 3

# The Makefile only forwards variables: each set variable of a target's list becomes the flag of the same name
# (FINE_TUNE_AT=0.5 -> --fine-tune-at '0.5'), quoted as one argument (EXPERIMENT="my photos"); a SWITCH set to
# anything but 0, false, no or off is a bare flag (OVERWRITE=1 -> --overwrite; OVERWRITE=0 -> nothing).
# `tlsweep <command> --help` lists every flag; ARGS= passes any of them as they are (ARGS="--seed 3 --split 60/20/20").
lower = $(subst _,-,$(subst Z,z,$(subst Y,y,$(subst X,x,$(subst W,w,$(subst V,v,$(subst U,u,$(subst T,t,$(subst S,s,$(subst R,r,$(subst Q,q,$(subst P,p,$(subst O,o,$(subst N,n,$(subst M,m,$(subst L,l,$(subst K,k,$(subst J,j,$(subst I,i,$(subst H,h,$(subst G,g,$(subst F,f,$(subst E,e,$(subst D,d,$(subst C,c,$(subst B,b,$(subst A,a,$(1))))))))))))))))))))))))))))
SWITCHES := OVERWRITE REFIT QUIET VERBOSE NO_FEATURE_CACHE SERVER_AUTH
# Variables named otherwise than their flag
FLAG_REPORT_DIR := out-dir
FLAG_WORKER := worker-id
FLAG_SERVER_HOST := host
FLAG_SERVER_PORT := port
FLAG_SERVER_STORE := store
FLAG_SERVER_ARTIFACTS := artifacts
FLAG_SERVER_AUTH := auth
FLAG_UI_PORT := port
FLAG_MLFLOW_TRACKING_URI := tracking-uri
flag = --$(or $(FLAG_$(1)),$(call lower,$(1)))
quote = '$(subst ','\'',$(1))'
OFF := 0 false False FALSE no No NO off Off OFF
switch = $(if $(filter $(OFF),$($(1))),,$(call flag,$(1)))
flags = $(strip $(foreach v,$(1),$(if $($(v)),$(if $(filter $(v),$(SWITCHES)),$(call switch,$(v)),$(call flag,$(v)) $(call quote,$($(v)))))) $(ARGS))

TRAIN_VARS := DATASET BACKBONE WEIGHTS EPOCHS FINE_TUNE_EPOCHS FINE_TUNE_AT DROPOUT BATCH_SIZE LEARNING_RATE \
	FINE_TUNE_LEARNING_RATE IMAGE_SIZE AUGMENT SEED SPLIT OUTPUT OVERWRITE FEATURE_CACHE MIXED_PRECISION XLA \
	EARLY_STOPPING_PATIENCE CV_FOLDS LABEL_SMOOTHING WEIGHT_DECAY FINE_TUNE_SCHEDULE WARMUP_EPOCHS DATA_DIR DEVICE
SWEEP_VARS := DATASET SWEEP EXPERIMENT MAX_TRIALS TUNER SEED SPLIT QUIET VERBOSE NO_FEATURE_CACHE LOG_MODELS \
	TRIAL_PROCESS ON_CHANGE MIXED_PRECISION GPUS STATE_DIR ORACLE DEVICE

.PHONY: help install doctor test test-slow test-all train sweep sweep-chief sweep-worker server best-export report ui clean \
	clean-cache docs bench bench-memory bench-finetune bench-fixed-cost bench-search bench-knobs bench-tracking predict

# The tracking store: MLFLOW_TRACKING_URI when set, else SQLite mlflow.db here (the commands' default too).
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export MLFLOW_TRACKING_URI

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# GPU=1: also the gpu extra (tensorflow[and-cuda]: CUDA 12 / cuDNN 9 from pip); by default 1 where `nvidia-smi -L` lists a GPU
comma := ,
GPU_LISTED = $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
GPU ?= $(if $(filter-out 0,$(GPU_LISTED)),1,0)
EXTRAS = test$(comma)docs$(if $(filter 1,$(GPU)),$(comma)gpu)
GPU_WHY = $(if $(filter command line environment,$(origin GPU)),GPU=$(GPU) given,$(if $(filter-out 0,$(GPU_LISTED)),nvidia-smi -L lists $(GPU_LISTED) GPU(s),nvidia-smi lists no GPU))

install: $(PY) ## create .venv/ and install the project with its test and docs extras (+ the gpu extra where nvidia-smi lists a GPU; GPU=0/1 overrides; + Chromium for the tests)
	@echo "install: .[$(EXTRAS)] ($(GPU_WHY)$(if $(filter 1,$(GPU)),: TensorFlow with its CUDA 12 / cuDNN 9 pip packages,: no CUDA libraries))"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@# The headless-browser tests need Chromium; CI fails (not skips) without it. Installed where apt-get is.
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "installing chromium (apt-get) for the headless-browser tests"; \
		sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
		$$sudo apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ $$sudo apt-get update -qq >/dev/null && $$sudo apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: chromium not installed (no root or passwordless sudo): only the headless-browser tests need it"; \
	else echo "note: no chromium and no apt-get: install Chromium for the headless-browser tests"; fi

doctor: ## check this machine: versions, GPUs nvidia-smi lists vs TensorFlow sees, CUDA libraries, store, cache, weights
	$(TLSWEEP) doctor

test: ## fast tests (a few minutes; no network; real-data tests skip without ../shared/data)
	$(PY) -m pytest -q

test-slow: ## slow tests only: real training on ../shared/data/flower_photos
	$(PY) -m pytest -q -m slow

test-all: ## every test, fast and slow
	$(PY) -m pytest -q -m "slow or not slow"

docs: ## build the docs site (MkDocs, Material theme) into site/, warnings and broken links as errors
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

train: ## train one configuration: DATASET= BACKBONE= [EPOCHS= FINE_TUNE_AT= ... OUTPUT= DEVICE=cpu]
	@test -n "$(DATASET)" || { echo "usage: make train DATASET=<tfds name or folder> [BACKBONE=...]"; exit 2; }
	$(TLSWEEP) train $(call flags,$(TRAIN_VARS))

predict: ## top-k classes per image from an export: MODEL=<export dir> IMAGES=<file or folder> [TOP_K=3]
	@test -n "$(MODEL)" -a -n "$(IMAGES)" || { echo "usage: make predict MODEL=<export dir> IMAGES=<file or folder>"; exit 2; }
	$(TLSWEEP) predict $(call flags,MODEL IMAGES TOP_K)

sweep: ## Keras-Tuner search, every trial in MLflow: DATASET= [SWEEP=quick|<yaml>] [MAX_TRIALS= TUNER= EXPERIMENT= SEED= GPUS=all|0,1 DEVICE=cpu]
	@test -n "$(DATASET)" || { echo "usage: make sweep DATASET=<tfds name or folder> [SWEEP=quick]"; exit 2; }
	$(TLSWEEP) sweep $(call flags,$(SWEEP_VARS))

sweep-chief: ## distributed sweep, chief: serves the Keras Tuner oracle on ORACLE=host:port; same variables as sweep
	@test -n "$(DATASET)" || { echo "usage: make sweep-chief DATASET=... MLFLOW_TRACKING_URI=http://<server>:5000"; exit 2; }
	$(TLSWEEP) sweep --role chief $(call flags,$(SWEEP_VARS))

sweep-worker: ## distributed sweep, worker: runs trials from the chief's oracle: WORKER=<unique id> + sweep's variables
	@test -n "$(DATASET)" -a -n "$(WORKER)" || { echo "usage: make sweep-worker DATASET=... WORKER=w1 MLFLOW_TRACKING_URI=http://<server>:5000"; exit 2; }
	$(TLSWEEP) sweep --role worker $(call flags,$(SWEEP_VARS) WORKER)

server: ## MLflow tracking server: SERVER_HOST=127.0.0.1 (another address needs MLFLOW_TRACKING_USERNAME/PASSWORD: basic auth) SERVER_PORT= SERVER_STORE= SERVER_ARTIFACTS= [SERVER_AUTH=1]
	$(TLSWEEP) server $(call flags,SERVER_HOST SERVER_PORT SERVER_STORE SERVER_ARTIFACTS SERVER_AUTH)

best-export: ## export the best trial (val_accuracy; ties by a steadier estimate: docs/selection.md): EXPERIMENT= [EXPORT_DIR=exports/] [OVERWRITE=1] [TFLITE=float16|dynamic] [MAX_LATENCY_MS= MAX_SIZE_MB=] [REFIT=1]
	@test -n "$(EXPERIMENT)" || { echo "usage: make best-export EXPERIMENT=<name, e.g. tf_flowers>"; exit 2; }
	$(TLSWEEP) best-export $(call flags,EXPERIMENT EXPORT_DIR OVERWRITE TFLITE MAX_LATENCY_MS MAX_SIZE_MB REFIT)

report: ## leaderboard + self-contained HTML/markdown report of an experiment: EXPERIMENT= [REPORT_DIR=reports/]
	@test -n "$(EXPERIMENT)" || { echo "usage: make report EXPERIMENT=<name, e.g. tf_flowers>"; exit 2; }
	$(TLSWEEP) report $(call flags,EXPERIMENT REPORT_DIR TOP)

ui: ## MLflow's UI on the tracking store at http://127.0.0.1:5000; prints each sweep's runs link [UI_PORT= EXPERIMENT=]
	$(TLSWEEP) ui $(call flags,MLFLOW_TRACKING_URI UI_PORT EXPERIMENT)

clean: ## remove sweep state, exports and the local tracking store (asks first)
	@read -p "delete sweeps_state/ exports/ mlflow.db mlartifacts/? [y/N] " ok && [ "$$ok" = y ] && \
	rm -rf sweeps_state exports mlflow.db mlartifacts || echo kept

clean-cache: ## empty the caches (frozen features, activations, decoded images) in TLSWEEP_CACHE (default ~/.cache/tlsweep); only folders tlsweep marked as its own
	$(PY) -m pipeline.safepath clean-cache

bench: ## plain Keras Tuner vs our default sweep (fine-tuning included), tracked and untracked, on a flower_photos subset; fails if the draws differ [BENCH_ARGS="--trials 6 --per-class 40 --split-overhead"]
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

bench-memory: ## resident memory after each of 10 fine-tuning trials of a sweep, prints growth_mb= [MEMORY_ARGS="--trial-process same"]
	$(PY) -m benchmarks.bench_memory $(MEMORY_ARGS)

bench-finetune: ## fine-tuning end to end vs only the top on cached cut activations, flower_photos 224 px [FINETUNE_ARGS="--whole-trial": whole trials, head phase included]
	$(PY) -m benchmarks.bench_finetune $(FINETUNE_ARGS)

bench-fixed-cost: ## a trial's wall time minus its training steps: head trial in-process, fine-tuning trial fresh [FIXED_ARGS=--repeats 2]
	$(PY) -m benchmarks.bench_fixed_cost $(FIXED_ARGS)

bench-search: ## winner's val/test accuracy of random, bayesian, tpe at 8/12/24 trials over 20 seeds (heads on cached flower_photos features); writes benchmarks/results/<date>-search.md [SEARCH_ARGS="--seeds 5"]
	$(PY) -m benchmarks.bench_search $(SEARCH_ARGS)

bench-knobs: ## validation and test accuracy of the default run on flower_photos without and with each fine-tuning knob, paired [KNOBS_ARGS="--seed 43 --runs label_smoothing"]
	$(PY) -m benchmarks.bench_knobs $(KNOBS_ARGS)

bench-tracking: ## what one trial's MLflow calls cost through the recorder, part by part (run, params, metrics, system metrics, datasets, artifacts, model), on SQLite and a local mlflow server [TRACKING_ARGS="--repeats 10 --stores sqlite"]
	$(PY) -m benchmarks.bench_tracking $(TRACKING_ARGS)
