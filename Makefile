# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv (`make setup` alone does only that) and install the pinned stack (requirements.txt,
# plus pytest from requirements-dev.txt) and omnissl in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omnissl-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

# Speech pretraining on the embedded corpus (generated on first use), then the linear probe vs random init and
# the log-mel baseline on the embedded keyword-spotting task, then the SUPERB-style report (learned layer
# weights, accuracy per layer, pretrained vs random init vs log-mel) in runs/demo/report (probe.md + PNG, W&B).
# It ends with the headline (runs/demo/report/headline.md): pretrained vs log-mel vs random init with 95 %
# intervals (one seed here: the test set's binomial interval), and the learning curves over seeds
# (bench/results/learning_curve/recipes/learning_curve.png, the current recipes' curve, copied beside it).
demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) bench/learning_check.py --objective wav2vec2 --steps 1500 --seeds 0 \
		--export runs/demo/encoder --report runs/demo/report --curve-tag recipes
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/omnissl probe runs/demo/encoder --train embedded:keywords:small \
		--valid embedded:keywords:small --test embedded:keywords:small --random-init --baseline \
		--report runs/demo/report --wandb
	@echo; cat runs/demo/report/headline.md; echo "(the learning curves: runs/demo/report/learning_curve.png)"

bench: $(STAMP)
	$(PY) bench/trunk_vs_hf.py

clean:
	rm -rf runs lightning_logs .pytest_cache
