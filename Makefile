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
MEMBERS ?= 3
TEACHER_ARCH ?= cnn:32-64-128
TEACHER_EPOCHS ?= 8
TEACHER_ARGS ?=
TEMPS ?= 1,2,4,8,20
CACHE_ARGS ?=
STUDENT_ARCH ?= mlp:128
T ?= 4
ALPHA ?= 0.5
EPOCHS ?= 30
STUDENT_ARGS ?=
EXPORT_ARGS ?=
BENCH_ARGS ?=

# ---- artifacts ----
PREPARED := $(DATA)/prepared/$(DS).h5
TEACHER := $(DATA)/teachers/$(DS)/ensemble.onnx
CACHE := $(DATA)/cache/$(DS).h5
STU := $(DATA)/students
HARD := $(STU)/$(DS)-hard
KD := $(STU)/$(DS)-kd
BENCH := $(DATA)/bench/$(DS)
PARAMS := $(DATA)/params

ARGS_prepare := --source $(SOURCE) $(PREPARE_ARGS)
ARGS_teacher := --members $(MEMBERS) --arch $(TEACHER_ARCH) --epochs $(TEACHER_EPOCHS) $(TEACHER_ARGS)
ARGS_cache := --temperatures $(TEMPS) $(CACHE_ARGS)
ARGS_hard := --arch $(STUDENT_ARCH) --alpha 0 --temperature $(T) --epochs $(EPOCHS) $(STUDENT_ARGS)
ARGS_kd := --arch $(STUDENT_ARCH) --alpha $(ALPHA) --temperature $(T) --epochs $(EPOCHS) $(STUDENT_ARGS)
ARGS_export := $(EXPORT_ARGS)
ARGS_bench := $(BENCH_ARGS)
stamp = $(PARAMS)/$(1).args

.PHONY: help all smoke setup test prepare teacher cache student export bench clean clean-smoke

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_.-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-14s %s\n", $$1, $$2}'
	@echo "  parameters: DS DATA SOURCE MEMBERS TEACHER_ARCH TEACHER_EPOCHS TEMPS STUDENT_ARCH T ALPHA EPOCHS *_ARGS"

all: $(BENCH).md ## run the whole pipeline on the default data and print where the report is
	@echo "report: $(BENCH).md (JSON: $(BENCH).json, every timed run: $(BENCH).csv)"

SMOKE_DATA ?= data/smoke
smoke: ## the same pipeline shrunk (a few thousand rows, tiny models), under two minutes
	$(MAKE) all DATA=$(SMOKE_DATA) MEMBERS=2 TEACHER_ARCH=cnn:8-16-32 TEACHER_EPOCHS=1 EPOCHS=3 STUDENT_ARCH=mlp:32 \
	  PREPARE_ARGS="--train-rows 3000 --val-rows 500 --test-rows 1000" \
	  BENCH_ARGS="--warmup-count 5 --warmup-s 0 --min-count 20 --min-s 0.02 --trials 3"

setup: $(INSTALLED) $(FASHION) ## create .venv (CPU torch without a GPU) and install the dataset

test: setup ## run the test suite (unit, numeric, CLI and make smoke runs)
	$(PY) -m pytest -q

prepare: $(PREPARED) ## prepared transfer set (data/prepared/<ds>.h5)
teacher: $(TEACHER) ## teacher ensemble ONNX (data/teachers/<ds>/ensemble.onnx)
cache: $(CACHE) ## soft-target cache (data/cache/<ds>.h5)
student: $(KD).pt $(HARD).pt ## distilled and hard-label students (data/students/)
export: $(KD).onnx $(HARD).onnx ## student ONNX files, fp32 and int8
bench: $(BENCH).md ## edge benchmark report (data/bench/<ds>.{json,md,csv})

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
$(foreach s,prepare teacher cache hard kd export bench,$(shell mkdir -p $(PARAMS) && \
  printf '%s\n' '$(ARGS_$(s))' | cmp -s - $(PARAMS)/$(s).args || printf '%s\n' '$(ARGS_$(s))' > $(PARAMS)/$(s).args))

# ---- stages ----
$(PREPARED): stages/prepare.py $(call stamp,prepare) | $(INSTALLED) $(FASHION)
	$(DISTILL) prepare --out $@ $(ARGS_prepare)

$(TEACHER): $(PREPARED) stages/teacher.py stages/models.py $(call stamp,teacher) | $(INSTALLED)
	$(DISTILL) teacher --prepared $< --out $@ $(ARGS_teacher)

$(CACHE): $(TEACHER) $(PREPARED) stages/cache.py stages/kd.py $(call stamp,cache) | $(INSTALLED)
	$(DISTILL) cache --teacher $< --transfer-set $(PREPARED) --out $@ $(ARGS_cache)

$(HARD).pt: $(CACHE) $(PREPARED) stages/student.py stages/kd.py stages/models.py $(call stamp,hard) | $(INSTALLED)
	$(DISTILL) student --cache $< --transfer-set $(PREPARED) --out $@ --metrics $(HARD).metrics.json $(ARGS_hard)

$(KD).pt: $(CACHE) $(PREPARED) stages/student.py stages/kd.py stages/models.py $(call stamp,kd) | $(INSTALLED)
	$(DISTILL) student --cache $< --transfer-set $(PREPARED) --out $@ --metrics $(KD).metrics.json $(ARGS_kd)

$(STU)/%.onnx: $(STU)/%.pt $(PREPARED) stages/export.py pipeline/onnxio.py $(call stamp,export) | $(INSTALLED)
	$(DISTILL) export --checkpoint $< --transfer-set $(PREPARED) --out $@ --int8 $(STU)/$*.int8.onnx \
	  --report $(STU)/$*.export.json $(ARGS_export)

$(BENCH).md: $(TEACHER) $(KD).onnx $(HARD).onnx $(PREPARED) stages/bench.py stages/bench_worker.py \
             stages/benchstats.py $(call stamp,bench) | $(INSTALLED)
	$(DISTILL) bench --teacher $(TEACHER) --candidate student-hard=$(HARD).onnx --candidate student-kd=$(KD).onnx \
	  --candidate student-kd-int8=$(KD).int8.onnx --prepared $(PREPARED) \
	  --out $(BENCH).json --markdown $@ --csv $(BENCH).csv $(ARGS_bench)

clean-smoke: ## remove the smoke run's artifacts
	rm -rf $(SMOKE_DATA)

clean: ## remove every artifact under data/ (keeps .venv)
	find data -mindepth 1 -not -name .gitkeep -delete

# ---- cache benchmarks (issue 3): JSON under data/bench/; synthetic inputs under data/bench/cache-work ----
.PHONY: bench-cache bench-cache-scale
CACHE_BENCH_ARGS ?=
CACHE_SCALE_ARGS ?=
bench-cache: | $(INSTALLED) ## cache stage: onnxruntime vs PyTorch eager rows/s, HDF5 I/O share (data/bench/cache.json)
	$(DISTILL) cache bench --work $(DATA)/bench/cache-work --out $(DATA)/bench/cache.json $(CACHE_BENCH_ARGS)

bench-cache-scale: | $(INSTALLED) ## cache stage: peak RSS and time at 10k/100k/1M synthetic rows (data/bench/cache-scale.json)
	$(DISTILL) cache bench-scale --work $(DATA)/bench/cache-work --out $(DATA)/bench/cache-scale.json $(CACHE_SCALE_ARGS)
