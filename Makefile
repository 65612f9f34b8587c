# Logit-free feature KD: `make demo` (whole pipeline on Fashion-MNIST), `make test`.
# Every target takes the same variables, e.g.
#   make distill CONFIG=configs/cifar10.yaml TEACHER=resnet34 STUDENT=resnet9 METHOD=ours SEEDS="0 1 2"
#   make profile DATASET=fashion_mnist TEACHER=resnet34 ARGS="profile.k=4 teacher.width=0.5"
#   make distill CONFIG=configs/cifar100.yaml METHOD=ours NPROC=4   (one run on 4 GPUs: torchrun + DDP)
#   make distill CONFIG=configs/demo.yaml TEACHER="resnet34 vgg19" METHOD=ours   (several teachers, one student)
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
NPROC    ?= 1

COMMON = --config $(CONFIG) --artifacts $(ARTIFACTS) \
  $(if $(DATASET),--dataset $(DATASET)) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
  $(if $(TEACHER),--teacher "$(TEACHER)")
STUDENT_ARGS = $(if $(STUDENT),--student $(STUDENT)) $(if $(SEEDS),--seeds "$(SEEDS)")
DEMO_METHODS ?= ce kd fitnet ours

.PHONY: setup setup-test test test-fast lint demo teacher profile layers distill study report export bench bench-speed bench-syncs bench-sizes bench-export bench-profile bench-quality bench-stream bench-multi gpu-check help

help:
	@sed -n '1,6p' Makefile; echo; echo "targets: setup setup-test test test-fast lint demo teacher profile layers distill study report export bench bench-speed bench-syncs bench-sizes bench-export bench-profile bench-quality bench-stream bench-multi gpu-check"

setup:
	@bash .ci/setup.sh

setup-test:
	@bash .ci/setup.sh --test

test: setup-test
	$(PY) -m pytest -q tests

# the quick subset: everything but the tests that start the stage scripts (marker `stages`)
test-fast: setup-test
	$(PY) -m pytest -q -m "not stages" tests

lint: setup-test
	.venv/bin/ruff check .

teacher: setup
	$(PY) stage1_profile_teacher.py $(COMMON) --train-only $(ARGS)

layers: setup
	$(PY) stage1_profile_teacher.py $(COMMON) --list-layers $(ARGS)

profile: setup
	$(PY) stage1_profile_teacher.py $(COMMON) $(ARGS)

# NPROC > 1: torchrun starts NPROC ranks of one run (DDP; train.batch_size stays the global batch).
STAGE2 = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC),$(PY))
distill: setup
	$(STAGE2) stage2_distill.py $(COMMON) $(STUDENT_ARGS) $(if $(METHOD),--method $(METHOD)) $(ARGS)

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

# The layer-selection study (README "Layer-selection study"): every arm of the plan (the CE
# student, ours and its controls, each teacher layer alone, ours' teacher layers into other
# student layers) is one stage-2 run per seed, the same command as `make distill` with the arm's
# overrides; then stage 3 writes the study report.
# The plan's options go in STUDY_ARGS, e.g. STUDY_ARGS='--layers "3 7 11" --random-draws 5 --student-draws 0'.
STUDY_ARGS ?=
study: setup
	@plan="$$($(PY) -m common.study plan $(COMMON) $(STUDENT_ARGS) $(STUDY_ARGS) $(ARGS))" || exit 1; \
	printf '%s\n' "$$plan" | while read -r arm overrides; do \
	  echo "== study arm $$arm: $$overrides"; \
	  $(STAGE2) stage2_distill.py $(COMMON) $(STUDENT_ARGS) $(ARGS) $$overrides < /dev/null || exit 1; \
	done
	$(PY) stage3_evaluate.py --study $(COMMON) $(STUDENT_ARGS) $(STUDY_ARGS) -- $(filter-out --quiet,$(ARGS))

# Each finished student as ONNX (opset 18) + TorchScript with its head, checked against PyTorch on
# test images and timed on this CPU (export.yaml per run); stage 3 adds the table. Shared CPU: EXPORT_ARGS="--threads 1".
EXPORT_ARGS ?=
export: setup
	$(PY) -m common.export --artifacts $(ARTIFACTS) $(if $(DATASET),--dataset $(DATASET)) $(EXPORT_ARGS)

bench: setup
	$(PY) bench/bench_epoch.py
	$(PY) bench/bench_syncs.py

# Host syncs per training step in steady state, ce, and ours and crd from the cache (issue 19's goal: <= 0.1).
bench-syncs: setup
	$(PY) bench/bench_syncs.py

# Issue 9's ratios (run on a quiet machine): extraction with HDF5 writes vs pure inference; an
# `ours` epoch from the cache vs `ce` at CIFAR size; the training loop vs a plain torchvision-style loop.
bench-speed: setup
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_epoch.py --size cifar --no-live
	$(PY) bench/bench_train_loop.py --other-layout
	$(PY) bench/bench_train_loop.py --size cifar

# The disk cost of each artifact for every model of the paper's grid at CIFAR-100 and Tiny ImageNet shapes.
bench-sizes: setup
	$(PY) bench/bench_artifact_sizes.py

# Stage 1 at CIFAR-100 scale (generated pickles): peak RSS and bytes written per step. The
# full-width teacher takes about an hour on 2 CPU cores; BENCH_WIDTHS="0.25" is minutes.
BENCH_WIDTHS ?= 0.25 1.0
bench-profile: setup
	$(PY) bench/bench_profile_scale.py --widths $(BENCH_WIDTHS) --n-train 50000 --classes 100

# S/I/E/Q of one layer against its floor (one float32 N x D by D x N matmul), D = 512 to 65 536.
bench-quality: setup
	$(PY) bench/bench_quality.py

# Streamed datasets (issue 21) on generated ImageNet-layout JPEGs: the loader's 2 workers against one
# process, peak RSS of stage 1 and a stage-2 epoch at N and 2N images, stage 1 on tv:resnet50 at 224 px
# (100 classes) and the 1 000-class ImageNet figure by arithmetic. About 20 min on 2 CPU cores.
bench-stream: setup
	nice $(PY) bench/bench_stream.py

# A cached epoch from two teachers (2 + 2 layers) against each teacher alone with 4 (goal <= 1.1x), interleaved.
bench-multi: setup
	$(PY) bench/bench_multi_teacher.py --repeats 5 --passes 3

# The four registry students at full width on CIFAR-100 shapes: export, check, latency table.
bench-export: setup
	$(PY) bench/bench_export.py --threads 1

# One GPU, at most 8 minutes: the `cuda` tests (tests/test_cuda.py) and the speed figures of issue 19,
# in one summary naming the GPU, driver and torch: $(ARTIFACTS)/gpu_check/gpu_check.{md,json}.
# GPU_CHECK_ARGS="--device cpu --tiny" runs the same script at toy sizes on a machine without one.
GPU_CHECK_ARGS ?=
gpu-check: setup-test
	$(PY) bench/gpu_check.py --out $(ARTIFACTS)/gpu_check $(GPU_CHECK_ARGS)
