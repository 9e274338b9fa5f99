# Every target installs first: on a fresh machine `make demo` and `make test` are all it takes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATADIR ?= $(HOME)/cityscapes
SIZE ?= 1024x512
OUT ?= data_cache/cityscapes-$(SIZE)
DATA ?= $(OUT)
GPUS ?= 1
EPOCHS ?= 100
RUN ?= runs/cityscapes-$(SIZE)
# An ImageNet ResNet-50 under the U-Net decoder (README, "Models"); ENCODER=plain: from scratch
ENCODER ?= resnet50
# torchrun restarts a group whose rank failed (a lost GPU, the OOM killer) this many times;
# with --resume auto each restart continues from the last step checkpoint
RESTARTS ?= 3
# The DALI build: cuda13 matches torch's default wheels; CUDA=12 for a CUDA 12 torch.
CUDA ?= 13
OTHER_CUDA := $(if $(filter 12,$(CUDA)),13,12)
CHECKPOINT ?= $(RUN)/checkpoints/best.pt
ARGS ?=

.PHONY: install test test-fast coverage demo preprocess train evaluate bench gpu-report lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# two DALI builds in one environment overwrite each other's files: keep one
	$(BIN)/python -m pip uninstall -q -y nvidia-dali-cuda$(OTHER_CUDA)0 2>/dev/null || true
	$(BIN)/python -m pip install -q -e '.[dev,deploy,cuda$(CUDA)]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The suite under coverage: what the CPU runs. docs/design.md names the GPU-path lines it
# cannot and why; runs/coverage/ holds the data.
coverage: install
	rm -rf runs/coverage && mkdir -p runs/coverage
	$(BIN)/python -m coverage run -m pytest -q
	$(BIN)/python -m coverage report

# everything but the tests marked slow (over a second each: processes, kills, real fits, exports)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/python -m train.demo --out runs/demo

preprocess: install
	$(BIN)/cityprep preprocess --datadir $(DATADIR) --out $(OUT) --size $(SIZE)

# One process first checks that a step fits in memory for all $(GPUS) (one clear message
# rather than the OOM killer, or torchrun's page for a failed rank), fetching the encoder's
# ImageNet weights into torch's hub cache on the way; then torchrun, which restarts a failed
# group. --resume auto: the same command starts RUN or continues it.
train: install
	LOCAL_WORLD_SIZE=$(GPUS) $(BIN)/citytrain fit --data $(DATA) --out $(RUN) --epochs $(EPOCHS) --encoder $(ENCODER) --resume auto $(ARGS) --preflight-only
	$(BIN)/torchrun --standalone --nproc_per_node=$(GPUS) --max-restarts=$(RESTARTS) -m train.cli fit --data $(DATA) --out $(RUN) --epochs $(EPOCHS) --encoder $(ENCODER) --resume auto $(ARGS) --no-preflight

# every rank scores its share; ARGS e.g. "--datadir $(DATADIR) --mode slide --window 512x1024"
evaluate: install
	$(BIN)/torchrun --standalone --nproc_per_node=$(GPUS) -m train.cli evaluate --checkpoint $(CHECKPOINT) --data $(DATA) $(ARGS)

bench: install
	$(BIN)/cityprep bench --out runs/bench
	$(BIN)/cityprep bench-archives --out runs/bench
	$(BIN)/cityprep bench-loader runs/bench/shards
	@# the U-Net at its full size on 512x1024 crops is a GPU job; on a CPU, the README's setting
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/citytrain bench; \
	else \
		for amp in off bf16; do $(BIN)/citytrain bench --crop 128x256 --width 16 --depth 4 \
			--steps 6 --device cpu --amp $$amp || exit 1; done; \
		$(BIN)/citytrain bench --encoder all --crop 128x256 --width 16 --depth 4 --steps 6 \
			--device cpu --amp off --json runs/bench/models.json || exit 1; \
	fi

# On a CUDA machine: the GPU figures (within gpu-report's 210 s budget), then the suite with
# its CUDA-only tests: meant to stay within 6 minutes (not yet timed on a GPU).
gpu-report: install
	$(BIN)/citytrain gpu-report --out runs/gpu-report
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf runs/demo runs/bench
