# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
# The demo's model: `make demo DEMO_CONFIG=configs/tiny-cpu-llama.yaml DEMO_RUN=runs/demo/run-llama`
# trains the llama architecture on the same data instead.
DEMO_CONFIG ?= configs/tiny-cpu.yaml
DEMO_RUN    ?= $(DEMO)/run
PYTEST_ARGS ?=
# A stalled download fails after 60 s and is retried, instead of hanging the install.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check --progress-bar off --timeout 60 --retries 3

.PHONY: install demo test test-gpu bench soak lint clean

install: $(STAMP)

# Re-runs only when the package definition, the C++/CUDA sources or the op builds change.
$(STAMP): setup.py $(wildcard csrc/*) launch/warm_ops.py megatrain/train/prebuilt_ops.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -q setuptools wheel
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP_INSTALL) -q torch==2.13.0
	# Not quiet: the log shows what is being fetched or built if this ever stalls.
	$(PIP_INSTALL) --no-build-isolation --use-pep517 -e '.[dev]'
	# DeepSpeed's JIT ops (~1-2 min each), built once here and kept where runs load them
	# without torch's build lock (docs/self-healing.md).
	$(BIN)/python launch/warm_ops.py
	touch $@

# The main job on the built-in corpus: tokenizer -> shards -> 2-rank pretraining -> curves.png
# -> Hugging Face export, a sample and held-out bits per byte.
demo: install
	$(BIN)/python launch/train_tokenizer.py --input builtin:stdlib --vocab-size 8192 --out $(DEMO)/tokenizer
	$(BIN)/python launch/prepare_data.py --tokenizer $(DEMO)/tokenizer --input builtin:stdlib --out $(DEMO)/data
	$(BIN)/deepspeed --num_gpus 2 launch/pretrain.py --config $(DEMO_CONFIG) --set run.dir=$(DEMO_RUN) --resume none
	$(BIN)/python launch/plot.py $(DEMO_RUN)
	$(BIN)/python launch/export_hf.py $(DEMO_RUN) --out $(DEMO_RUN)-hf
	$(BIN)/python launch/generate.py --checkpoint $(DEMO_RUN) --prompt "def main(" \
		--temperature 0.8 --top-k 40 --seed 1 --max-new-tokens 48
	$(BIN)/python launch/evaluate.py --checkpoint $(DEMO_RUN) --input $(DEMO)/data

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# On a machine with a CUDA device: the kernel, the trainer on one GPU, device placement.
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests/gpu $(PYTEST_ARGS)

# Benchmarks: run with nothing else on the machine; each prints a table and writes JSON.
bench: install
	$(BIN)/python bench/tokenizer.py --json runs/bench/tokenizer.json
	$(BIN)/python bench/data.py --json runs/bench/data.json
	$(BIN)/python bench/train.py --json runs/bench/train.json
	$(BIN)/python bench/optimizer.py --json runs/bench/optimizer.json
	$(BIN)/python bench/pipeline.py --json runs/bench/pipeline.json
	$(BIN)/python bench/tensor_parallel.py --json runs/bench/tensor_parallel.json
	$(BIN)/python bench/plan.py --json runs/bench/plan.json
	$(BIN)/python bench/build.py --json runs/bench/build.json
	$(BIN)/python bench/convert.py --json runs/bench/convert.json
	$(BIN)/python bench/generate.py --json runs/bench/generate.json
	$(BIN)/python bench/grad_accum.py --json runs/bench/grad_accum.json

# Random kills and loss spikes on a tiny 2-rank run, 20 trials (~20 minutes); not in CI.
soak: install
	$(BIN)/python bench/soak.py --json runs/bench/soak.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info runs
