# The pipeline as real files: each target is an artifact whose prerequisites are its inputs, the
# code of its stage and a stamp of its parameters (rewritten only when they change), so that
# `make student T=2` reruns the students and what follows, nothing before them.
SHELL := /bin/bash
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
.SUFFIXES:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
INSTALLED := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

# ---- parameters (override on the command line: make student T=2 ALPHA=0.7) ----
DS ?= fashion-mnist
DATA ?= data
SOURCE ?= $(FASHION)
PREPARE_ARGS ?=
# the teacher recipe: TEACHER names one of TEACHERS; a recipe's artifacts (teacher, caches, students, exports,
# bench reports, sweeps and their parameter stamps) are named <ds>-<recipe> (the default recipe's plain <ds>), so
# `make all TEACHER=strong` builds a second pipeline beside the default one and never touches it
# (docs/results.md, "A teacher worth distilling": how each recipe was chosen and what it scores)
TEACHER ?= default
TEACHERS := default strong
# the default recipe depends on the CPU: with bfloat16 instructions (AVX512-BF16 or AMX, the test that
# runtime.resolve_precision makes for `--precision auto`) ResNet-20 trains about 4x faster than in float32 on an
# AVX2-only CPU, so each kind gets the best recipe measured that keeps a fresh clone's `make all` within 30 minutes
# on a 2-core host: 2 members x 10 epochs with random erasing, or 1 x 7 without (docs/results.md, "Why these defaults")
BF16_CPU := $(shell grep -qwE 'avx512_bf16|amx_tile' /proc/cpuinfo 2>/dev/null && echo yes)
MEMBERS ?= $(if $(BF16_CPU),2,1)
TEACHER_ARCH ?= res:16x3-32x3-64x3
TEACHER_EPOCHS ?= $(if $(BF16_CPU),10,7)
ERASE ?= $(if $(BF16_CPU),0.5,0)
RECIPE ?= --optimizer sgd --lr 0.1 --weight-decay 5e-4 --label-smoothing 0.1 --max-shift 2 --flip 0.5 --precision auto
TEACHER_default = --members $(MEMBERS) --arch $(TEACHER_ARCH) --epochs $(TEACHER_EPOCHS) --erase $(ERASE) $(RECIPE)
TEACHER_strong ?= --members 3 --arch res:16x3-32x3-64x3 --epochs 30 --erase 0.5 $(RECIPE)
TEACHER_ARGS ?=
TEMPS ?= 1,2,4,8,20
CACHE_ARGS ?=
STUDENT_ARCH ?= mlp:128
T ?= 2
ALPHA ?= 0.5
EPOCHS ?= 30
STUDENT_ARGS ?=
EXPORT_ARGS ?=
BENCH_ARGS ?=
JOBS ?= 2
SWEEP_ARGS ?=
EXP_ARGS ?=
EXP_T_ARCHS ?= mlp:16,mlp:64,mlp:800-800
EXP_T_ARGS ?=
BENCH_STUDENT_ARGS ?=
JITTER_COPIES ?= 9
JITTER_ARGS ?=
EXP_H_EPOCHS ?= 12
EXP_H_TEMPS ?= 2,4,8,20
EXP_H_ARGS ?=
# the convolutional edge students (pipeline/specs.py), benchmarked beside the MLP ones by `make bench-edge`
# (docs/results.md, "Edge students": conv:32/2-64/2-128/2 at these settings, 94k weights, 92.2% test)
EDGE_ARCHS ?= conv:32/2-64/2-128/2
EDGE_T ?= 4
EDGE_EPOCHS ?= 20
EDGE_LR ?= 0.003
EDGE_STUDENT_ARGS ?=
BENCH_EDGE_ARGS ?= --threads 1 --batches 1
# views (docs/design.md, "views"): one cache of VIEWS_K views per row for each view family; students draw from the
# first K' of them (view j of a row does not depend on K, so one cache serves every K')
# (K = 16: +-2 px shifts make only 25 distinct views, and a 64-view cache of 55,000 rows is 3.5M teacher
# runs, about 100 minutes on a busy 2-core host; VIEWS_K=64 makes one)
VIEWS_K ?= 16
VIEW_FAMILIES ?= shift mix
VIEW_ARGS_shift ?= --view-max-shift 2
VIEW_ARGS_mix ?= --view-max-shift 2 --view-flip 0.5 --view-mixup 0.5
views_cache = $(DATA)/cache/$(NAME)-views-$(1).h5
EXP_V_ARCHS ?= mlp:128,mlp:800-800
EXP_V_USED ?= 1,4,16
EXP_V_EPOCHS ?= 30,60,120
EXP_V_TEMPS ?= 4
EXP_V_ARGS ?=

# ---- code: every target depends on the files its stage runs (its package, its command module
# commands/<stage>.py and commands/main.py, and what they import), read from the import graph by
# scripts/code_deps.py (regenerated whenever a .py file changes; make then restarts with it).  Stages
# never import each other (tests/unit/test_layering.py), so a module only the student imports, or the
# student's command, reruns the students and what follows, never the cache. ----
CODE_MK := .make/code.mk
PY_FILES := $(shell find commands pipeline stages -name '*.py' 2>/dev/null)
$(CODE_MK): $(PY_FILES) scripts/code_deps.py
	@mkdir -p $(@D)
	@$(PYTHON) scripts/code_deps.py > $@.tmp && mv $@.tmp $@
include $(CODE_MK)
code = $(CODE_$(1))

# ---- artifacts (NAME: the data set, tagged with the teacher recipe unless it is the default) ----
ifeq ($(filter $(TEACHER),$(TEACHERS)),)
$(error TEACHER=$(TEACHER) is not a teacher recipe; the recipes are: $(TEACHERS))
endif
TAG := $(if $(filter default,$(TEACHER)),,-$(TEACHER))
NAME := $(DS)$(TAG)
PREPARED := $(DATA)/prepared/$(DS).h5
TEACHER_ONNX := $(DATA)/teachers/$(NAME)/ensemble.onnx
CACHE := $(DATA)/cache/$(NAME).h5
PREPARED_J := $(DATA)/prepared/$(DS)-jitter.h5
CACHE_J := $(DATA)/cache/$(NAME)-jitter.h5
STU := $(DATA)/students
HARD := $(STU)/$(NAME)-hard
KD := $(STU)/$(NAME)-kd
RAW := $(KD).raw
BENCH := $(DATA)/bench/$(NAME)
PARAMS := $(DATA)/params
SWEEPS := $(DATA)/sweeps/$(NAME)

ARGS_prepare := --source $(SOURCE) $(PREPARE_ARGS)
ARGS_teacher := $(TEACHER_$(TEACHER)) $(TEACHER_ARGS)
ARGS_cache := --temperatures $(TEMPS) $(CACHE_ARGS)
ARGS_jitter := --copies $(JITTER_COPIES) $(JITTER_ARGS)
ARGS_hard := --arch $(STUDENT_ARCH) --alpha 0 --temperature $(T) --epochs $(EPOCHS) $(STUDENT_ARGS)
ARGS_kd := --arch $(STUDENT_ARCH) --alpha $(ALPHA) --temperature $(T) --epochs $(EPOCHS) $(STUDENT_ARGS)
ARGS_export := $(EXPORT_ARGS)
ARGS_bench := $(BENCH_ARGS)
ARGS_edge := --alpha $(ALPHA) --temperature $(EDGE_T) --epochs $(EDGE_EPOCHS) --lr $(EDGE_LR) $(EDGE_STUDENT_ARGS)
ARGS_bench_edge := $(BENCH_EDGE_ARGS)
# the prepared sets' stamps are shared by every recipe; the rest are the recipe's own
stamp = $(PARAMS)/$(1)$(if $(filter prepare jitter,$(1)),,$(TAG)).args

.PHONY: help all smoke setup lint test test-fast prepare teacher cache student export bench bench-fidelity clean clean-smoke
.PHONY: bench-student sweep experiments exp-small-transfer exp-omitted-class exp-temperature
.PHONY: jitter cache-jitter exp-hinton views-caches exp-views student-edge export-edge bench-edge

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_.-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | awk 'BEGIN{FS=":.*## "}{printf "  %-14s %s\n", $$1, $$2}'
	@echo "  parameters: DS DATA SOURCE TEACHER ($(TEACHERS)) MEMBERS TEACHER_ARCH TEACHER_EPOCHS ERASE TEMPS STUDENT_ARCH"
	@echo "              T ALPHA EPOCHS *_ARGS"
	@echo "  the default teacher on this CPU ($(if $(BF16_CPU),bfloat16,float32) training): $(MEMBERS) x $(TEACHER_ARCH), $(TEACHER_EPOCHS) epochs, erasing $(ERASE)"

all: $(BENCH).md ## run the whole pipeline on the default data and print where the report is
	@echo "report: $(BENCH).md (JSON: $(BENCH).json, every timed run: $(BENCH).csv)"

SMOKE_DATA ?= data/smoke
SMOKE_GOALS ?= all
smoke: ## the same pipeline shrunk (a few thousand rows, tiny models), under two minutes
	$(MAKE) $(SMOKE_GOALS) DATA=$(SMOKE_DATA) MEMBERS=2 TEACHER_ARCH=res:4x1-8x1 TEACHER_EPOCHS=1 EPOCHS=3 STUDENT_ARCH=mlp:32 \
	  TEACHER_strong="--members 2 --arch res:4x1-8x1,conv:8-16/2 --epochs 1 --erase 0.5 $(RECIPE)" \
	  PREPARE_ARGS="--train-rows 3000 --val-rows 500 --test-rows 1000" \
	  BENCH_ARGS="--warmup-count 5 --warmup-s 0 --min-count 20 --min-s 0.02 --trials 3 --batches 1,256"

setup: $(INSTALLED) $(FASHION) ## create .venv (CPU torch without a GPU) and install the dataset

# the suite on TEST_WORKERS processes (pytest-xdist), each test file on one of them so that a module's
# fixtures are built once; TEST_WORKERS=0 runs it in this process (docs/design.md, "Tests")
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: setup lint ## the linter, then the test suite (unit, formats, stages, faults, end to end: what CI runs)
	$(PYTEST) --durations=15

test-fast: setup lint ## the linter, then the tests that run no command line in a subprocess (not marked slow)
	$(PYTEST) -m "not slow"

lint: setup ## ruff check . (the rules: pyproject.toml [tool.ruff]; zero findings)
	$(VENV)/bin/ruff check .

prepare: $(PREPARED) ## prepared transfer set (data/prepared/<ds>.h5)
teacher: $(TEACHER_ONNX) ## teacher ensemble ONNX (data/teachers/<ds>[-<recipe>]/ensemble.onnx)
cache: $(CACHE) ## soft-target cache (data/cache/<ds>.h5)
student: $(KD).ckpt $(HARD).ckpt ## distilled and hard-label students (data/students/)
export: $(KD).onnx $(HARD).onnx $(RAW).onnx ## student ONNX files, fp32 and int8 (and the kd student on raw uint8 pixels)
bench: $(BENCH).md ## edge benchmark report (data/bench/<ds>.{json,md,csv} and two .png plots)
bench-fidelity: $(BENCH).fidelity.json ## benchmark vs bare timeit, int8 vs teacher, fp32 vs Identity floor

# ---- set-up ----
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls CUDA.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	@$(PY) -c "import torch, onnxruntime; print('torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
	touch $@

$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

# ---- parameter stamps: rewritten (at parse time, so `make -n` sees it too) only when the arguments change ----
# Not for goals that build nothing under $(DATA) themselves: `make smoke T=4` would otherwise stamp
# T=4 onto the full-size students in data/ (its sub-make stamps $(SMOKE_DATA)), and `make help` or
# `make test` must not touch them either.
NO_STAMP_GOALS := help smoke clean-smoke lint test test-fast setup
ifneq ($(filter-out $(NO_STAMP_GOALS),$(or $(MAKECMDGOALS),$(.DEFAULT_GOAL))),)
$(foreach s,prepare jitter teacher cache hard kd export bench edge bench_edge,$(shell mkdir -p $(PARAMS) && \
  printf '%s\n' '$(ARGS_$(s))' | cmp -s - $(call stamp,$(s)) || printf '%s\n' '$(ARGS_$(s))' > $(call stamp,$(s))))
endif

# ---- stages ----
$(PREPARED): $(call code,prepare) $(call stamp,prepare) | $(INSTALLED) $(FASHION)
	$(DISTILL) prepare --out $@ $(ARGS_prepare)

$(TEACHER_ONNX): $(PREPARED) $(call code,teacher) $(call stamp,teacher) | $(INSTALLED)
	$(DISTILL) teacher --prepared $< --out $@ $(ARGS_teacher)

$(CACHE): $(TEACHER_ONNX) $(PREPARED) $(call code,cache) $(call stamp,cache) | $(INSTALLED)
	$(DISTILL) cache --teacher $< --transfer-set $(PREPARED) --out $@ $(ARGS_cache)

$(PREPARED_J): $(PREPARED) $(call code,jitter) $(call stamp,jitter) | $(INSTALLED)
	$(DISTILL) jitter --prepared $< --out $@ $(ARGS_jitter)

$(CACHE_J): $(TEACHER_ONNX) $(PREPARED_J) $(call code,cache) $(call stamp,cache) | $(INSTALLED)
	$(DISTILL) cache --teacher $< --transfer-set $(PREPARED_J) --out $@ $(ARGS_cache)

$(HARD).ckpt: $(CACHE) $(PREPARED) $(call code,student) $(call stamp,hard) | $(INSTALLED)
	$(DISTILL) student --cache $< --transfer-set $(PREPARED) --out $@ --metrics $(HARD).metrics.json $(ARGS_hard)

$(KD).ckpt: $(CACHE) $(PREPARED) $(call code,student) $(call stamp,kd) | $(INSTALLED)
	$(DISTILL) student --cache $< --transfer-set $(PREPARED) --out $@ --metrics $(KD).metrics.json $(ARGS_kd)

$(STU)/%.onnx: $(STU)/%.ckpt $(PREPARED) $(TEACHER_ONNX) $(call code,export) $(call stamp,export) | $(INSTALLED)
	$(DISTILL) export --checkpoint $< --transfer-set $(PREPARED) --out $@ --int8 $(STU)/$*.int8.onnx \
	  --report $(STU)/$*.export.json --teacher $(TEACHER_ONNX) --mobile-dir $(STU)/$*.mobile $(ARGS_export)

# The edge model: the same kd student taking raw uint8 pixels, normalisation folded into its first layer.
$(RAW).onnx: $(KD).ckpt $(PREPARED) $(TEACHER_ONNX) $(call code,export) $(call stamp,export) | $(INSTALLED)
	$(DISTILL) export --raw-input --checkpoint $< --transfer-set $(PREPARED) --out $@ --int8 $(RAW).int8.onnx \
	  --report $(RAW).export.json --teacher $(TEACHER_ONNX) --mobile-dir $(RAW).mobile $(ARGS_export)

# any student on raw uint8 pixels (the edge students of EDGE_ARCHS)
$(STU)/%.raw.onnx: $(STU)/%.ckpt $(PREPARED) $(TEACHER_ONNX) $(call code,export) $(call stamp,export) | $(INSTALLED)
	$(DISTILL) export --raw-input --checkpoint $< --transfer-set $(PREPARED) --out $@ --int8 $(STU)/$*.raw.int8.onnx \
	  --report $(STU)/$*.raw.export.json --teacher $(TEACHER_ONNX) --mobile-dir $(STU)/$*.raw.mobile $(ARGS_export)

$(BENCH).md: $(TEACHER_ONNX) $(KD).onnx $(HARD).onnx $(RAW).onnx $(KD).ckpt $(PREPARED) $(call code,bench) \
             $(call stamp,bench) | $(INSTALLED)
	$(DISTILL) bench --teacher $(TEACHER_ONNX) --candidate student-hard=$(HARD).onnx --candidate student-kd=$(KD).onnx \
	  --candidate student-kd-int8=$(KD).int8.onnx --candidate student-kd-int8-raw=$(RAW).int8.onnx \
	  --torch student-kd=$(KD).ckpt --prepared $(PREPARED) \
	  --out $(BENCH).json --markdown $@ --csv $(BENCH).csv \
	  --plot-accuracy $(BENCH).accuracy.png --plot-throughput $(BENCH).throughput.png $(ARGS_bench)

FIDELITY_ARGS ?=
# int8: the edge model (raw uint8 pixels in, normalisation folded, float logits out)
$(BENCH).fidelity.json: $(TEACHER_ONNX) $(KD).onnx $(RAW).onnx $(PREPARED) $(call code,bench) | $(INSTALLED)
	$(DISTILL) bench-fidelity --teacher $(TEACHER_ONNX) --student $(KD).onnx --student-int8 $(RAW).int8.onnx \
	  --prepared $(PREPARED) --out $@ $(FIDELITY_ARGS)

# ---- convolutional edge students: each arch of EDGE_ARCHS distilled like the kd student, exported on raw
# uint8 pixels (fp32 and int8), and benchmarked with the MLP students in one run ----
edge_name = $(NAME)-kd-$(subst /,s,$(subst :,-,$(1)))
EDGE_RAW = $(foreach a,$(EDGE_ARCHS),$(STU)/$(call edge_name,$(a)).raw.onnx)
BENCH_EDGE := $(DATA)/bench/$(NAME)-edge

define EDGE_RULES
$(STU)/$(call edge_name,$(1)).ckpt: $(CACHE) $(PREPARED) $(call code,student) $(call stamp,edge) | $(INSTALLED)
	$(DISTILL) student --cache $(CACHE) --transfer-set $(PREPARED) --out $$@ \
	  --metrics $(STU)/$(call edge_name,$(1)).metrics.json --arch $(1) $(ARGS_edge)
endef
$(foreach a,$(EDGE_ARCHS),$(eval $(call EDGE_RULES,$(a))))

student-edge: $(foreach a,$(EDGE_ARCHS),$(STU)/$(call edge_name,$(a)).ckpt) ## the CNN students of EDGE_ARCHS (data/students/)
export-edge: $(EDGE_RAW) ## their raw-pixel exports, fp32 and int8, with the export reports
bench-edge: $(BENCH_EDGE).md ## MLP and CNN students side by side: accuracy, latency, MACs, size, Pareto front

$(BENCH_EDGE).md: $(TEACHER_ONNX) $(KD).onnx $(HARD).onnx $(RAW).onnx $(EDGE_RAW) $(PREPARED) $(call code,bench) \
                  $(call stamp,bench_edge) | $(INSTALLED)
	$(DISTILL) bench --teacher $(TEACHER_ONNX) --candidate mlp-hard=$(HARD).onnx --candidate mlp-kd=$(KD).onnx \
	  --candidate mlp-kd-int8=$(KD).int8.onnx --candidate mlp-kd-raw=$(RAW).onnx --candidate mlp-kd-int8-raw=$(RAW).int8.onnx \
	  $(foreach a,$(EDGE_ARCHS),--candidate $(subst /,s,$(subst :,-,$(a)))-raw=$(STU)/$(call edge_name,$(a)).raw.onnx \
	    --candidate $(subst /,s,$(subst :,-,$(a)))-int8-raw=$(STU)/$(call edge_name,$(a)).raw.int8.onnx) \
	  --prepared $(PREPARED) --out $(BENCH_EDGE).json --markdown $@ --csv $(BENCH_EDGE).csv \
	  --plot-accuracy $(BENCH_EDGE).accuracy.png $(ARGS_bench_edge)

# ---- student sweeps and the paper's experiments (phony: each reruns, reusing students already trained) ----
EXP_IN := --cache $(CACHE) --transfer-set $(PREPARED)

bench-student: $(CACHE) $(PREPARED) $(TEACHER_ONNX) $(call views_cache,shift) | $(INSTALLED) ## student epoch: cache, views vs in-memory vs online (JSON)
	$(DISTILL) student bench $(EXP_IN) --teacher $(TEACHER_ONNX) --views-cache $(call views_cache,shift) \
	  --out $(DATA)/bench/$(NAME)-student.json $(BENCH_STUDENT_ARGS)

sweep: $(CACHE) $(PREPARED) $(TEACHER_ONNX) | $(INSTALLED) ## T x alpha x size x seed from one cache: CSV, Markdown, PNG
	$(DISTILL) student sweep $(EXP_IN) --teacher $(TEACHER_ONNX) --work-dir $(SWEEPS)/students --csv $(SWEEPS)/sweep.csv \
	  --epochs $(EPOCHS) --jobs $(JOBS) $(SWEEP_ARGS)

exp-small-transfer: $(CACHE) $(PREPARED) | $(INSTALLED) ## paper (1): 3% transfer set, hard vs soft, +-early stopping
	$(DISTILL) student experiment --name small-transfer $(EXP_IN) --work-dir $(SWEEPS)/students \
	  --markdown $(SWEEPS)/small-transfer.md --epochs $(EPOCHS) --jobs $(JOBS) $(EXP_ARGS)

exp-omitted-class: $(CACHE) $(PREPARED) | $(INSTALLED) ## paper (2): one class left out, bias correction before/after
	$(DISTILL) student experiment --name omitted-class $(EXP_IN) --work-dir $(SWEEPS)/students \
	  --markdown $(SWEEPS)/omitted-class.md --epochs $(EPOCHS) --jobs $(JOBS) $(EXP_ARGS)

exp-temperature: $(CACHE) $(PREPARED) $(TEACHER_ONNX) | $(INSTALLED) ## paper (3): which T wins per student size
	$(DISTILL) student sweep $(EXP_IN) --teacher $(TEACHER_ONNX) --work-dir $(SWEEPS)/students \
	  --csv $(SWEEPS)/temperature-size.csv --archs $(EXP_T_ARCHS) --alphas 0.5 --epochs $(EPOCHS) --jobs $(JOBS) $(EXP_T_ARGS)

experiments: exp-small-transfer exp-omitted-class exp-temperature ## the three experiments' tables

jitter: $(PREPARED_J) ## transfer set + JITTER_COPIES shifted copies of each train row (data/prepared/<ds>-jitter.h5)
cache-jitter: $(CACHE_J) ## the teacher's soft targets on the jittered transfer set (data/cache/<ds>-jitter.h5)

exp-hinton: $(CACHE_J) $(PREPARED_J) $(TEACHER_ONNX) | $(INSTALLED) ## 784-800-800-10, hard vs soft, from the jittered cache
	$(DISTILL) student sweep --cache $(CACHE_J) --transfer-set $(PREPARED_J) --teacher $(TEACHER_ONNX) \
	  --work-dir $(SWEEPS)/students-jitter --csv $(SWEEPS)/hinton-800-jitter.csv --archs mlp:800-800 \
	  --temperatures $(EXP_H_TEMPS) --alphas 0.5 --epochs $(EXP_H_EPOCHS) --memory-budget-mib 4096 --jobs $(JOBS) $(EXP_H_ARGS)

$(DATA)/cache/$(NAME)-views-%.h5: $(TEACHER_ONNX) $(PREPARED) $(call code,cache) $(call stamp,cache) | $(INSTALLED)
	$(DISTILL) cache --teacher $< --transfer-set $(PREPARED) --out $@ --views $(VIEWS_K) $(VIEW_ARGS_$*) $(ARGS_cache)

views-caches: $(foreach f,$(VIEW_FAMILIES),$(call views_cache,$(f))) ## VIEWS_K views of every row per view family (data/cache/<ds>-views-<family>.h5)

exp-views: views-caches $(PREPARED) $(TEACHER_ONNX) | $(INSTALLED) ## students from K' in EXP_V_USED views x family: table and plot
	$(foreach f,$(VIEW_FAMILIES),$(DISTILL) student sweep --cache $(call views_cache,$(f)) --transfer-set $(PREPARED) \
	  --teacher $(TEACHER_ONNX) --work-dir $(SWEEPS)/students-views-$(f) --csv $(SWEEPS)/views-$(f).csv --archs $(EXP_V_ARCHS) \
	  --views-used $(EXP_V_USED) --view-epochs $(EXP_V_EPOCHS) --temperatures $(EXP_V_TEMPS) --alphas 0.5 \
	  --memory-budget-mib 4096 --jobs $(JOBS) $(EXP_V_ARGS) &&) true
	$(PY) scripts/views_report.py $(foreach f,$(VIEW_FAMILIES),$(f)=$(SWEEPS)/views-$(f).json) \
	  --markdown $(SWEEPS)/views.md --plot $(SWEEPS)/views.png

clean-smoke: ## remove the smoke run's artifacts
	rm -rf $(SMOKE_DATA)

clean: ## remove every artifact under data/ (keeps .venv)
	find data -mindepth 1 -not -name .gitkeep -delete

# ---- cache benchmarks: JSON under data/bench/; synthetic inputs under data/bench/cache-work ----
.PHONY: bench-cache bench-cache-scale
CACHE_BENCH_ARGS ?=
CACHE_SCALE_ARGS ?=
bench-cache: | $(INSTALLED) ## cache stage: onnxruntime vs PyTorch eager rows/s, HDF5 I/O share (data/bench/cache.json)
	$(DISTILL) cache bench --work $(DATA)/bench/cache-work --out $(DATA)/bench/cache.json $(CACHE_BENCH_ARGS)

bench-cache-scale: | $(INSTALLED) ## cache stage: peak RSS and time at 10k/100k/1M synthetic rows (data/bench/cache-scale.json)
	$(DISTILL) cache bench-scale --work $(DATA)/bench/cache-work --out $(DATA)/bench/cache-scale.json $(CACHE_SCALE_ARGS)
