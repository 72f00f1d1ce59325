# The two commands (see README.md): `make run` and `make test`. Both set everything up first.
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out

.PHONY: run test test-heavy setup lint bench patching circuits taskvec

$(VENV)/.echowh-setup: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(VENV)/.echowh-setup

# Main job: extraction (with the zero-ablation grid) + report on the embedded SmolLM2-135M.
run: setup
	$(BIN)/echowh extract --out $(OUT)/warehouse --resume
	$(BIN)/echowh report -w $(OUT)/warehouse -o $(OUT)/report.html

# Activation patching (off in the main job: README 'Activation patching') on four words, then its report.
PATCH_WORDS ?= cat dog house river
patching: setup
	mkdir -p $(OUT)
	printf '%s\n' $(PATCH_WORDS) > $(OUT)/patch_words.txt
	$(BIN)/echowh extract --patching --ablation zero --words $(OUT)/patch_words.txt --out $(OUT)/patching --resume
	$(BIN)/echowh report -w $(OUT)/patching -o $(OUT)/patching.html

# Edge attribution and circuits (off in the main job: README 'Circuits') on four words, both pair kinds.
CIRCUIT_WORDS ?= cat dog house river
circuits: setup
	mkdir -p $(OUT)
	printf '%s\n' $(CIRCUIT_WORDS) > $(OUT)/circuit_words.txt
	$(BIN)/echowh extract --circuits template,word --ablation zero --words $(OUT)/circuit_words.txt --out $(OUT)/circuits --resume
	$(BIN)/echowh report -w $(OUT)/circuits -o $(OUT)/circuits.html

# Task vectors, function vectors and steering (off in the main job: README 'Task vectors') on the
# default words, on both embedded models (Gemma 3 270M in its own raw prompt form).
taskvec: setup
	$(BIN)/echowh extract --task-vectors --ablation zero --out $(OUT)/taskvec --resume
	$(BIN)/echowh report -w $(OUT)/taskvec -o $(OUT)/taskvec.html
	$(BIN)/echowh extract --task-vectors --ablation zero -m gemma3-270m --out $(OUT)/taskvec-gemma --resume
	$(BIN)/echowh report -w $(OUT)/taskvec-gemma -o $(OUT)/taskvec-gemma.html

# Tests: also installs Debian's chromium (report rendering) and hdf5-tools (h5dump) when root.
test: setup
	bash scripts/setup.sh --browser
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The independent references against the engines on the real embedded models (issues 17, 18):
# about 25 minutes on 2 cores, so not part of `make test`.
test-heavy: setup
	$(BIN)/python -m pytest -q -m heavy

# Every benchmark (prints ratios, asserts nothing; bench_ray starts a local Ray cluster); the query and report ones read the main job's warehouse.
bench: setup
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_ablation.py
	$(BIN)/python benchmarks/bench_ray.py
	$(BIN)/python benchmarks/bench_patching.py
	test -f $(OUT)/warehouse/manifest.json || $(MAKE) run
	$(BIN)/python benchmarks/bench_query.py -w $(OUT)/warehouse
	$(BIN)/python benchmarks/bench_report.py -w $(OUT)/warehouse
