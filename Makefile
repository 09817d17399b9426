# VinBigData / VinDr-CXR ensemble pipeline. `make help` lists the targets.
# Variables: DATA (a folder in Kaggle's resized-PNG layout), NAME (names fold/run/submission files),
# N_FOLDS, SEED, MODEL + VARIANT (one member), SET, FORCE. The demo uses the embedded synthetic benchmark in data/demo.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
CXR     := $(VENV)/bin/cxr
STAMP   := $(VENV)/.installed
DATA    ?= data/demo
NAME    ?= demo
# NAME names folds/NAME.csv, runs/NAME/, submissions/NAME.csv and reports/NAME/: one plain name
# (cxr.args.PLAIN_NAME_RE), so nothing is written outside those folders and no name splits in two
ifneq ($(shell printf '%s' '$(subst ','_,$(NAME))' | grep -xE '[A-Za-z0-9_][A-Za-z0-9_.-]*'),$(if $(NAME),$(NAME),-))
$(error NAME='$(NAME)' is not a plain name: letters, digits, '_', '-', '.', not starting with '.' or '-' (no '/', '..' or spaces))
endif
# A lower-case variable on the command line is a profile key written the ultralytics way (make train epochs=2):
# make would ignore it silently, so it stops here and names SET
LOWER_VARS := $(shell printf '%s\n' $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))) | grep '^[a-z]')
ifneq ($(LOWER_VARS),)
$(error $(firstword $(LOWER_VARS))=$($(firstword $(LOWER_VARS))) is not a make variable: profile settings go in SET, e.g. SET="$(foreach v,$(LOWER_VARS),$(v)=$($(v)))" (make config MODEL=... SET=... shows the result))
endif
# N_FOLDS: folds of a NEW fold file (default: 3 for the synthetic demo data, to fit 2 CPU cores, else 5; cxr
# folds decides from the data, never from NAME). Every target reads the fold ids from the fold file itself.
N_FOLDS ?=
SEED    ?= 42
FOLDS   := folds/$(NAME).csv
RUN     := runs/$(NAME)
MODEL   ?= yolo
FOLD    ?= 0
# VARIANT=s640: a named variant of MODEL with its own settings and folder runs/NAME/MODEL@VARIANT (models/members.py);
# MODELS="yolo yolo@s640 demo:detectron" fuses members, the last one borrowed from run demo (same fold file)
VARIANT ?=
ifneq ($(VARIANT),)
ifneq ($(shell printf '%s' '$(subst ','_,$(VARIANT))' | grep -xE '[A-Za-z0-9_][A-Za-z0-9_.-]*'),$(VARIANT))
$(error VARIANT='$(VARIANT)' is not a plain name: letters, digits, '_', '-', '.', not starting with '.' or '-')
endif
endif
MEMBER  = $(MODEL)$(if $(VARIANT),@$(VARIANT))
# FORCE=1: folds made with other settings than asked are redone (without it such a fold stops make, naming the keys)
FORCE   ?=
# PROFILE follows DATA: the demo profiles (128 px, minutes on a CPU) are for the synthetic demo data only;
# any other DATA gets the full profiles (GPU; they stop with one line on a machine without CUDA) unless
# PROFILE is given
PROFILE ?= $(if $(filter data/demo,$(patsubst %/,%,$(DATA))),demo,full)
# (before the fold file exists, as under make -n: the count make folds would write)
FOLD_IDS = $(if $(wildcard $(FOLDS)),$(shell python3 -c 'import csv, sys; \
  print(*sorted({int(r["fold"]) for r in csv.DictReader(open(sys.argv[1]))}))' $(FOLDS)),$(shell \
  seq 0 $$(($(or $(N_FOLDS),$(if $(wildcard $(DATA)/synth.yaml),3,5)) - 1))))
# GPUs: DEVICE=1 picks the card of train/predict/oof, DEVICE=0,1,2,3 trains one job on those 4 cards (gpus: 4),
# DEVICE=cpu runs on the CPU on purpose (full profiles need a GPU otherwise). DEVICES=0,1,2,3 (the cards) or GPUS=N, with GPUS_PER_JOB
# cards per job (default 1; G > 1 sets the profile's gpus: G) and RAY_ADDRESS=host:port (an existing Ray cluster):
# oof, all-oof and pipeline run every model x fold job through models/scheduler.py (Ray), a job on each free set
# of cards, never two on one.
DEVICE  ?=
DEVICES ?=
GPUS    ?=
GPUS_PER_JOB ?=
RAY_ADDRESS  ?=
# TORCH_CUDA=12.6: make install takes torch's CUDA 12.6 build (drivers R525+, P100/V100) instead of PyPI's CUDA 13.0
# one (drivers R580+, compute capability 7.5+); tools/check_driver.py checks the machine's driver and cards first
TORCH_CUDA ?=
# RETRIES=N: further attempts of a scheduler job whose node or Ray worker died (default 2)
RETRIES ?=
SCHEDULE = $(or $(DEVICES),$(GPUS),$(RAY_ADDRESS))
# SET="epochs=5 imgsz=512" overrides profile fields (python -m models ... --set)
SET     ?=
# FOLD_FUSION="iou_thr=0.4 conf_type=max": WBF settings of the folds' test merge (default cxr.wbf.FOLD_MERGE)
FOLD_FUSION ?=
comma := ,
DEVICE_CARDS = $(filter-out cpu,$(DEVICE))
DEVICE_N = $(words $(subst $(comma), ,$(DEVICE_CARDS)))
# one --set list (a second --set would replace the first): SET, then what DEVICE implies
SETS = $(strip $(SET) $(if $(filter cpu,$(DEVICE)),device=cpu,$(if $(filter-out 0 1,$(DEVICE_N)),gpus=$(DEVICE_N))))
# a SET word with shell syntax in it (a YAML flow value, written without spaces: train_args={"mixup":0.1},
# opts=[MODEL.RPN.NMS_THRESH,"0.6"]) reaches python as written: single-quoted for the recipe's shell
SHELL_CHARS := { } [ ] " * ? ; & < > | ! ~
QUOTE_WORDS = $(foreach w,$(1),$(if $(strip $(foreach c,$(SHELL_CHARS),$(findstring $(c),$(w)))),'$(w)',$(w)))
SET_ARGS = $(call QUOTE_WORDS,$(SETS))
# $(call ADAPTER,verb[,cards]): one verb of MODEL's adapter
ADAPTER = $(if $(2),CUDA_VISIBLE_DEVICES=$(2) )$(PY) -m models $(MODEL) $(1) --data $(DATA) --folds $(FOLDS) \
  --profile $(PROFILE) --run-dir $(RUN)$(if $(VARIANT), --variant $(VARIANT))$(if $(SETS), --set $(SET_ARGS))
# $(SCHEDULER) MODEL...: every fold of these models as Ray jobs, then merge (runs/NAME/jobs.csv, runs/NAME/logs/)
SCHEDULER = $(strip $(PY) -m models.scheduler --data $(DATA) --folds $(FOLDS) --profile $(PROFILE) --run-dir $(RUN) \
  $(if $(SETS),--set $(SET_ARGS)) $(if $(FOLD_FUSION),--fold-fusion $(FOLD_FUSION)) $(if $(DEVICES),--devices $(DEVICES)) \
  $(if $(GPUS),--gpus $(GPUS)) $(if $(GPUS_PER_JOB),--gpus-per-job $(GPUS_PER_JOB)) \
  $(if $(RAY_ADDRESS),--address $(RAY_ADDRESS)) $(if $(RETRIES),--retries $(RETRIES)) $(if $(FORCE),--force) --models)
# Run the tests in a network namespace with only loopback (torchrun needs it) where the kernel
# allows: proof that nothing downloads. Elsewhere they run as they are.
OFFLINE := $(shell unshare -n ip link set lo up 2>/dev/null && echo yes)

# Nothing downloads at run time: no weights, fonts or update checks.
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := false
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1

# detectron2 is not on PyPI: the sal-detectron2 redistribution's pure-Python wheel is tagged cp310;
# it runs on 3.10+ once renamed py3 (its compiled _C ops are not needed for Faster R-CNN).
D2_WHEEL := sal_detectron2-0.7.2-py3-none-any.whl

.PHONY: weights help install test test-heavy demo demo-data folds baseline evaluate data prepare clean train predict oof all-oof ensemble submission pipeline blend predict-images config tensorboard runs

TARGETS = $(shell grep -oE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | cut -d: -f1)

help: ## list the targets and the variables
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/\$$(\([A-Z_]*\))/\1/g' | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'
	@echo "Variables (now):"
	@printf '  %-17s %s\n' \
	  "DATA=$(DATA)" "data folder in Kaggle's resized-PNG layout (make data writes one)" \
	  "NAME=$(NAME)" "names folds/NAME.csv, runs/NAME/, submissions/NAME.csv, reports/NAME/" \
	  "PROFILE=$(PROFILE)" "model profile: demo on data/demo, full (GPU) on any other DATA" \
	  "MODEL=$(MODEL)" "one of: $(DETECTORS) $(CLASSIFIERS) (train, predict, oof)" \
	  "VARIANT=$(VARIANT)" "a named variant of MODEL: runs/NAME/MODEL@VARIANT, its own settings (SET)" \
	  "FOLD=$(FOLD)" "the fold of train / predict" \
	  "N_FOLDS=$(N_FOLDS)" "folds of a new fold file (default: 3 on the demo data, else 5); SEED=$(SEED)" \
	  "SET=" "profile overrides: SET=\"epochs=5 imgsz=512\" (a member keeps them: member.yaml)" \
	  "FORCE=" "FORCE=1: redo the folds made with other settings (else make stops, naming the keys)" \
	  "MODELS=" "members of the ensemble: yolo yolo@s640 demo:detectron (default all detectors); EXCLUDE=, EXTRA=name=path" \
	  "DEVICE=" "card(s) of train / predict / oof: 1, or 0,1,2,3 (one job, 4 cards), or cpu" \
	  "DEVICES=, GPUS=" "cards for the Ray scheduler (oof, all-oof, pipeline); GPUS_PER_JOB=, RAY_ADDRESS=" \
	  "TORCH_CUDA=" "make install: 12.6 for drivers older than R580 or P100/V100 cards (default: PyPI's CUDA 13.0 build)" \
	  "RETRIES=" "scheduler: further attempts of a job whose node or Ray worker died (default 2)" \
	  "FOLD_FUSION=" "WBF of the folds' test tables at merge: FOLD_FUSION=\"iou_thr=0.4 conf_type=max\"" \
	  "SRC=, OUT=" "folders of data, prepare, predict-images; SIZE=1024, EXACT=1 (full JPEG 2000 decode)" \
	  "LABELS=, SAMPLE=" "make data: a labels CSV (train.csv or PhysioNet test labels), SAMPLE=N images only" \
	  "THRESHOLD=, META=" "predict-images: lowest score drawn (0.3), a meta.csv of original sizes; LABELS= ground truth drawn beside" \
	  "SUBS=, WEIGHTS=" "make blend: submissions and their weights; GROUPS=, GATE=, BLEND=yaml, BLEND_ARGS=, LABELS=" \
	  "RUNS_ARGS=" "make runs: --sort COLUMN, --json, --diff RUN_A RUN_B" \
	  "PORT=" "make tensorboard: its port on 127.0.0.1 (6006)" \
	  "PYTEST_ARGS=" "make test: extra pytest arguments, e.g. PYTEST_ARGS=\"-k scheduler\""

# An unknown target: one line with the closest known one, before any work
.DEFAULT:
	@python3 -c 'import difflib, sys; m = difflib.get_close_matches(sys.argv[1], sys.argv[2:], 1); \
	print(f"make: no target {sys.argv[1]!r}" + (f"; did you mean {m[0]!r}?" if m else "") + " (make help lists them)")' \
	  '$@' $(TARGETS) >&2; exit 2

install: $(STAMP) ## create .venv with the pinned stack (torch, ultralytics, detectron2, effdet, ...); no-op when done

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@python3 tools/check_driver.py $(if $(TORCH_CUDA),--cuda $(TORCH_CUDA))
	@test -x $(PY) || python3 -m venv $(VENV)
	$(if $(filter 12.6,$(TORCH_CUDA)),$(PY) -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1 \
	  --index-url https://download.pytorch.org/whl/cu126)
	$(PY) -m pip install -q --no-compile -r requirements.txt -c constraints.txt
	@mkdir -p $(VENV)/wheels
	@test -f $(VENV)/wheels/$(D2_WHEEL) || { \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
	    --abi none --platform any sal-detectron2==0.7.2 -d $(VENV)/wheels/tmp && \
	  mv $(VENV)/wheels/tmp/sal_detectron2-0.7.2-*.whl $(VENV)/wheels/$(D2_WHEEL); }
	$(PY) -m pip install -q --no-compile --no-deps $(VENV)/wheels/$(D2_WHEEL)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
# pip byte-compiles the venv's ~17,000 files one at a time; compileall on every core, leaving out the
# packages' own test suites (a fifth of the code, never imported), takes 16 s instead of 37 (2 cores). Two
# files of the pinned wheels are not Python 3.11 and are never imported (pip skips them too).
	$(PY) -m compileall -q -j 0 -x '/tests/|/(py312_intrinsics|ensemble_boxes_wbf_pytorch)\.py$$' $(VENV)/lib
	$(PY) -c "import models, ensemble_boxes, pydicom, cxr; [models.adapter(m) for m in models.names()]"
	@touch $@

weights: $(STAMP) ## download the full profiles' public checkpoints into weights/ and check sha256 (online machines only)
	$(PY) -m models.weights

# One pytest-xdist worker per core (at most 4); tests/conftest.py groups the tests into work units
# (a file, or the full profiles) and gives each worker's torch its share of the cores.
PYTEST := $(PY) -m pytest -n auto --maxprocesses 4 --dist loadgroup --no-loadscope-reorder

# $(call RUN_TESTS,marker expression)
RUN_TESTS = $(if $(OFFLINE),unshare -n sh -c 'ip link set lo up && exec $(PYTEST) -m "$(1)" $(PYTEST_ARGS)',$(PYTEST) -m "$(1)" $(PYTEST_ARGS))

test: install ## the test suite but the heavy tests (real-data tests read ../shared/data), offline where unshare works
	$(call RUN_TESTS,not heavy)

test-heavy: install ## the heavy tests: quality trainings and full profiles at their real size (CI runs them after make test)
	$(call RUN_TESTS,heavy)

demo-data: $(DATA)/train.csv ## generate the synthetic benchmark in data/demo (Kaggle layout, 128 px for CPU)

$(DATA)/train.csv: | $(STAMP)
	@if [ "$(DATA)" = data/demo ]; then $(CXR) synth --out $(DATA) --n-train 300 --n-test 100 --size 128 --seed 0; \
	else echo "$@ not found: DATA must be a folder in Kaggle's resized-PNG layout (see README)" >&2; exit 1; fi

$(FOLDS): $(DATA)/train.csv
	$(CXR) folds --labels $(DATA)/train.csv $(if $(N_FOLDS),--n-folds $(N_FOLDS)) --seed $(SEED) --out $@

folds: $(FOLDS) ## write folds/$(NAME).csv (grouped by image, stratified over the 15 classes)

$(RUN)/prior_boxes/oof.csv: $(FOLDS)
	$(CXR) baseline --labels $(DATA)/train.csv --train-sizes $(DATA)/train_meta.csv --folds $(FOLDS) --out $@

$(RUN)/prior_boxes/test.csv: $(DATA)/train.csv
	$(CXR) baseline --labels $(DATA)/train.csv --train-sizes $(DATA)/train_meta.csv --sizes $(DATA)/test_meta.csv --out $@

baseline: $(RUN)/prior_boxes/oof.csv $(RUN)/prior_boxes/test.csv ## prior-box floor: OOF and test predictions
	$(CXR) submission --predictions $(RUN)/prior_boxes/test.csv --sample $(DATA)/sample_submission.csv \
	  --sizes $(DATA)/test_meta.csv --out submissions/$(NAME)_prior_boxes.csv

# the settings decide freshness, not only the files' times: before make reuses a member's folds, `check` compares
# each trained fold's saved config and inputs with what is asked, and stops naming the keys (FORCE=1 clears them)
CHECK = $(call ADAPTER,check)$(if $(FORCE), --force)

train: $(FOLDS) ## train MODEL on every fold but FOLD (resumes a killed run): make train MODEL=yolo FOLD=0
	@$(CHECK) --fold $(FOLD)
	$(call ADAPTER,train,$(DEVICE_CARDS)) --fold $(FOLD)

predict: $(FOLDS) ## OOF + test predictions of MODEL's FOLD model (shared format, original pixels)
	$(call ADAPTER,predict,$(DEVICE_CARDS)) --fold $(FOLD)

$(RUN)/$(MEMBER)/fold%/oof.csv: $(FOLDS)
	$(call ADAPTER,train,$(DEVICE_CARDS)) --fold $*
	$(call ADAPTER,predict,$(DEVICE_CARDS)) --fold $*

$(RUN)/$(MEMBER)/oof.csv: $(foreach k,$(FOLD_IDS),$(RUN)/$(MEMBER)/fold$(k)/oof.csv)
	$(call ADAPTER,merge)$(if $(FOLD_FUSION), --fold-fusion $(FOLD_FUSION))

oof: $(FOLDS) ## every fold of MODEL [VARIANT], then merge (OOF table + folds' test WBF); make -j safe; DEVICES=0,1: a job per card
ifneq ($(SCHEDULE),)
	$(SCHEDULER) $(MEMBER)
else
	@$(CHECK)
	@$(MAKE) --no-print-directory $(RUN)/$(MEMBER)/oof.csv
endif

# The ensemble's model set: MODELS (default: every detector in models/__init__.py) less EXCLUDE, plus EXTRA
# folders of models trained elsewhere (oof.csv + test.csv, prediction or Kaggle submission format, named after
# the folder or NAME=PATH); EXCLUDE=classifier turns the gate off. A member is FAMILY, FAMILY@VARIANT or
# RUN:FAMILY[@VARIANT] (borrowed from runs/RUN, never trained here); a classifier member in MODELS is the gate's
# (MODELS="yolo demo:classifier"). Each set keeps its own tuned parameters (runs/NAME/ensemble/<set>/): a new
# set tunes, a finished one is skipped unless its inputs changed (a retrained member tunes again).
DETECTORS   := $(shell python3 -c 'import models; print(*models.names("detector"))')
CLASSIFIERS := $(shell python3 -c 'import models; print(*models.names("classifier"))')
ifneq ($(filter-out $(DETECTORS) $(CLASSIFIERS),$(MODEL)),)
$(error MODEL=$(MODEL) is not a model$(shell python3 -c 'import difflib, sys; m = difflib.get_close_matches(sys.argv[1], \
  sys.argv[2:], 1); print(f"; did you mean {m[0]}?" if m else "")' '$(MODEL)' $(DETECTORS) $(CLASSIFIERS)) (models: $(DETECTORS) $(CLASSIFIERS)))
endif
MODELS  ?= $(DETECTORS)
EXCLUDE ?=
EXTRA   ?=
ENSEMBLE_MODELS = $(filter-out $(EXCLUDE),$(MODELS))
# the gate: a classifier member named in MODELS (classifier@v, run:classifier), else the table's classifier
CLASSIFIER_MEMBERS = $(foreach c,$(CLASSIFIERS),$(filter $(c) $(c)@% %:$(c) %:$(c)@%,$(ENSEMBLE_MODELS)))
ENSEMBLE_CLASSIFIER = $(firstword $(CLASSIFIER_MEMBERS) $(filter-out $(EXCLUDE),$(CLASSIFIERS)))
# the members trained in this run (borrowed ones, RUN:..., were trained in theirs)
LOCAL_MEMBERS = $(foreach m,$(filter-out $(CLASSIFIER_MEMBERS),$(ENSEMBLE_MODELS)) $(ENSEMBLE_CLASSIFIER),$(if $(findstring :,$(m)),,$(m)))
ENSEMBLE_ARGS = --data $(DATA) --folds $(FOLDS) --run-dir $(RUN) --models "$(filter-out $(CLASSIFIER_MEMBERS),$(MODELS))" --exclude "$(EXCLUDE)" \
  --extra "$(EXTRA)" --classifier $(or $(ENSEMBLE_CLASSIFIER),none)

all-oof: $(FOLDS) ## OOF + test predictions of the ensemble's members and the classifier (MODELS, EXCLUDE choose)
ifneq ($(SCHEDULE),)
	$(if $(LOCAL_MEMBERS),$(SCHEDULER) $(LOCAL_MEMBERS))
else
	@for m in $(LOCAL_MEMBERS); do \
	  $(MAKE) --no-print-directory oof MODEL=$${m%%@*} VARIANT=$$([ "$${m#*@}" != "$$m" ] && echo "$${m#*@}") || exit 1; done
endif

ensemble: all-oof ## tune WBF + gate on OOF: make ensemble [MODELS="yolo effdet"] [EXCLUDE=effdet] [EXTRA=path/to/preds]
	$(PY) -m ensemble tune $(ENSEMBLE_ARGS)

submission: ensemble ## apply the tuned set to test: checked submissions/$(NAME).csv + reports/$(NAME)/ (same MODELS/EXCLUDE/EXTRA)
	$(PY) -m ensemble submit $(ENSEMBLE_ARGS) --name $(NAME)

runs: ## every run x member: settings, folds, OOF mAP pooled and fold mean, nested ensembles, test; + reports/index.html
	$(PY) -m ensemble runs --data $(DATA) $(RUNS_ARGS)

evaluate: ## print test mAP@0.4 of submissions/$(NAME).csv (DATA with test_labels.csv: synthetic or PhysioNet)
	$(CXR) evaluate --labels $(DATA)/test_labels.csv --submission submissions/$(NAME).csv

# Blend finished submissions from any source (ensemble/blend.py; ensemble/blend.yaml documents every setting).
# SUBS, WEIGHTS, GROUPS: one entry per submission; BLEND: a YAML instead of / under them; GATE: image_id + one
# probability column; LABELS: test labels for the score table (report only); BLEND_ARGS: any other flag.
blend: ## fuse submissions: make blend SUBS="a.csv b.csv" [WEIGHTS="2 1"] [GROUPS="m m"] [GATE=p.csv] NAME=x
	$(PY) -m ensemble blend --data $(DATA) $(if $(BLEND),--config $(BLEND)) $(if $(SUBS),--subs $(SUBS)) \
	  $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(GROUPS),--groups $(GROUPS)) $(if $(GATE),--gate $(GATE)) \
	  $(if $(LABELS),--labels $(LABELS)) $(BLEND_ARGS) --out submissions/$(NAME).csv --report-dir reports/$(NAME)

predict-images: $(STAMP) ## the tuned ensemble of NAME on new studies: make predict-images SRC=<folder> OUT=<folder> [THRESHOLD=0.3]
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make predict-images SRC=<DICOM/PNG/JPEG folder> OUT=<folder> [NAME=run] [THRESHOLD=0.3] [SIZE=px] [META=meta.csv]" >&2; exit 2; }
	$(PY) -m ensemble.predict_images --src $(SRC) --out $(OUT) --run-dir $(RUN) $(if $(SIZE),--size $(SIZE),--data $(DATA)) \
	  $(if $(wildcard $(FOLDS)),--folds $(FOLDS)) $(if $(THRESHOLD),--threshold $(THRESHOLD)) $(if $(META),--meta $(META)) \
	  $(if $(LABELS),--labels $(LABELS))

config: $(STAMP) ## print MODEL's resolved profile: every key, its value, type and meaning (PROFILE, the member's settings, SET apply)
	@$(PY) -m models $(MODEL) config --profile $(PROFILE) --run-dir $(RUN)$(if $(VARIANT), --variant $(VARIANT))$(if $(SET), --set $(call QUOTE_WORDS,$(SET)))

# Every fold's curves: metrics.csv's columns under one name for all models (<fold>/tensorboard) and the
# frameworks' own events (ultralytics, detectron2: <fold>/train); loopback only, PORT=6006
tensorboard: $(STAMP) ## training curves of every model and fold of NAME in TensorBoard (http://127.0.0.1:PORT)
	@test -d $(RUN) || { echo "$(RUN) not found: train something first (make train NAME=$(NAME))" >&2; exit 2; }
	$(VENV)/bin/tensorboard --logdir $(RUN) --host 127.0.0.1 --port $(or $(PORT),6006)

pipeline: baseline submission ## folds -> every model's OOF -> ensemble + gate -> submission + report

# The demo's 12 fold jobs go through the scheduler, one slot per core (at most 4), each job on its own core: on 2
# cores 15:04 instead of 21:29 one fold after another (nproc without OMP_NUM_THREADS, which it would obey) (start-up and single-threaded steps overlap the other job's
# training). YOLO's figures stay the same to the last digit; effdet's and detectron2's move within their noise
# (one loader worker per job instead of two draws other augmentations). DEVICE, DEVICES, GPUS or RAY_ADDRESS given: those.
DEMO_SLOTS = $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; seq -s, 0 $$((n - 1)))

demo: install demo-data ## the whole pipeline on the synthetic benchmark (re-running skips finished work)
	@start=$$(date +%s); $(MAKE) --no-print-directory pipeline evaluate $(if $(or $(SCHEDULE),$(DEVICE)),,DEVICES=$(DEMO_SLOTS)) && \
	echo "demo finished in $$(( $$(date +%s) - start )) s: submissions/$(NAME).csv, reports/$(NAME)/index.html"

data: $(STAMP) ## Kaggle download or resized-PNG set -> checked DATA folder: make data SRC=... OUT=... SIZE=1024
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make data SRC=<Kaggle download or PNG set> OUT=<DATA folder> [SIZE=1024] [EXACT=1]" >&2; exit 2; }
	$(CXR) data --src $(SRC) --out $(OUT) --size $(or $(SIZE),1024) $(if $(LABELS),--labels $(LABELS)) $(if $(SAMPLE),--sample $(SAMPLE)) \
	  $(if $(EXACT),--exact)

prepare: $(STAMP) ## one folder: DICOM/PNG/JPEG -> OUT/<id>.png at SIZE px + meta.csv (+ failed.csv); resumes
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make prepare SRC=<image folder> OUT=<folder> [SIZE=1024] [EXACT=1]" >&2; exit 2; }
	$(CXR) prepare --src $(SRC) --out $(OUT) --size $(or $(SIZE),1024) $(if $(EXACT),--exact)

clean: ## remove generated data, runs, folds and submissions (keeps .venv)
	rm -rf data/demo runs folds/*.csv submissions/*.csv reports
