# Logit-free feature KD: `make demo` (whole pipeline on Fashion-MNIST), `make test`.
# Every target takes the same variables, e.g.
#   make distill CONFIG=configs/cifar10.yaml TEACHER=resnet34 STUDENT=resnet9 METHOD=ours SEEDS="0 1 2"
#   make profile DATASET=fashion_mnist TEACHER=resnet34 ARGS="profile.k=4 teacher.width=0.5"
PY       ?= .venv/bin/python
CONFIG   ?= configs/default.yaml
DATASET  ?=
DATA_ROOT ?=
TEACHER  ?=
STUDENT  ?=
METHOD   ?=
SEEDS    ?=
ARGS     ?=
ARTIFACTS ?= artifacts

COMMON = --config $(CONFIG) --artifacts $(ARTIFACTS) \
  $(if $(DATASET),--dataset $(DATASET)) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
  $(if $(TEACHER),--teacher $(TEACHER))
STUDENT_ARGS = $(if $(STUDENT),--student $(STUDENT)) $(if $(SEEDS),--seeds "$(SEEDS)")
DEMO_METHODS ?= ce kd fitnet ours

.PHONY: setup test demo teacher profile layers distill report bench clean-demo help

help:
	@sed -n '1,5p' Makefile; echo; echo "targets: setup test demo teacher profile layers distill report bench"

setup:
	@bash .ci/setup.sh

test: setup
	$(PY) -m pytest -q tests

teacher: setup
	$(PY) stage1_profile_teacher.py $(COMMON) --train-only $(ARGS)

layers: setup
	$(PY) stage1_profile_teacher.py $(COMMON) --list-layers $(ARGS)

profile: setup
	$(PY) stage1_profile_teacher.py $(COMMON) $(ARGS)

distill: setup
	$(PY) stage2_distill.py $(COMMON) $(STUDENT_ARGS) $(if $(METHOD),--method $(METHOD)) $(ARGS)

report: setup
	$(PY) stage3_evaluate.py --artifacts $(ARTIFACTS) $(if $(DATASET),--dataset $(DATASET)) $(REPORT_ARGS)

# The whole pipeline end to end on Fashion-MNIST at CPU size (configs/demo.yaml).
demo: CONFIG = configs/demo.yaml
demo: setup
	$(PY) stage1_profile_teacher.py $(COMMON) $(ARGS)
	for m in $(DEMO_METHODS); do \
	  $(PY) stage2_distill.py $(COMMON) $(STUDENT_ARGS) --method $$m $(ARGS) || exit 1; \
	done
	$(PY) stage3_evaluate.py --artifacts $(ARTIFACTS) --dataset fashion_mnist --methods $(DEMO_METHODS) --out $(ARTIFACTS)/reports/demo

bench: setup
	$(PY) bench/bench_epoch.py
