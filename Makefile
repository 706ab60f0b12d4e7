# Quick start: `make demo` (main job on embedded synthetic sites) and `make test` (the test suite).
# Both create/update .venv in the repo root by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Flower must never install runtime dependencies (it would pull a multi-GB CUDA torch) nor phone home.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test lint real-data real-data-prepare real-data-experiments real-data-seeds real-data-cv real-data-dp dp-table venv bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m simulations.demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Real public data (../shared/data/knee): prepare -> audit/clean -> split (+ a Mendeley hold-out as the external
# site) -> centralized `cpu` preset -> the same sites federated with `flwr run` -> comparison.
KNEE ?= ../shared/data/knee
REAL := runs/real
real-data-prepare: $(STAMP)
	$(BIN)/strnet data prepare --layout kaggle-folders --src $(KNEE)/os-collected-data-224 --site stage1 --out $(REAL)/stage1_raw.csv
	$(BIN)/strnet data prepare --layout mendeley --src $(KNEE)/knee-xray-osteoporosis-mendeley --site stage2 --out $(REAL)/stage2_raw.csv
	$(BIN)/strnet data audit $(REAL)/stage1_raw.csv $(REAL)/stage2_raw.csv --max-distance 2 --json $(REAL)/audit.json --clean $(REAL)/clean.csv
	$(BIN)/strnet data split $(REAL)/clean.csv --max-distance 2 --holdout stage2=0.25 --out $(REAL)/split.csv --per-site-dir $(REAL)/sites

real-data: real-data-prepare
	$(BIN)/strnet train --config cpu
	$(BIN)/python -m simulations.federate --config cpu --out $(REAL)/federated
	$(BIN)/strnet compare --experiment strnet-real --out $(REAL)/compare

# Every recipe variant and federated strategy behind the experiment table of docs/real-data.md (hours on 2 cores; not in CI).
# Then the round soup (docs/real-data.md, "Averaging the federation's rounds"): a federation keeping every round's
# weights, and averages of its rounds scored on validation.
# Choices are made on validation data: each run logs every site's own validation AUROC per epoch/round to
# MLflow, and `simulations.inference_variants` compares inference-time variants on the validation split.
EXP := runs/exp
# name:override,override (the cpu preset is the chosen "balanced + mirror" recipe); strategies run the previous
# recipe they were compared on (no balancing, no mirror averaging, batch statistics)
NO_MIRROR := model.test_time_mirror=false
VARIANTS := base:train.balance=none,$(NO_MIRROR) balance:$(NO_MIRROR) balance-mirror:train.balance=source_label \
	balance-site:train.monitor=site_auroc,$(NO_MIRROR) balance-site-mirror:train.monitor=site_auroc \
	ema:train.ema_decay=0.9 frozen-bn:model.norm=frozen,federation.batchnorm=batch lr-1e-4:train.lr=1e-4 \
	strong-aug:augment.max_rotation_deg=15,augment.max_translate=0.08,augment.scale_range=[0.8;1.2],augment.border_mask_max_frac=0.15
# each recipe variant is one network over 30 epochs, as the variants were compared (the preset's ensemble of three
# and its epoch cap came after them)
ONE_NETWORK := --set model.members=1 --set train.epochs=30
STRATEGIES := fedavg fedprox fedavgm fedadam:federation.server_lr=0.001 fedbn
real-data-experiments: real-data-prepare
	for v in $(VARIANTS); do name=$${v%%:*}; sets=$$(echo $${v#*:} | tr ',;' ' ,'); \
	  $(BIN)/strnet train --config cpu --output-dir $(EXP)/$$name $(ONE_NETWORK) \
	    $$(for s in $$sets; do echo --set $$s; done) || exit 1; \
	  $(BIN)/python -m simulations.inference_variants --bundle $(EXP)/$$name/bundle --manifest $(REAL)/split.csv > $(EXP)/$$name/val_variants.txt || exit 1; done
	for s in $(STRATEGIES); do name=$${s%%:*}; extra=$$(echo $$s | grep -q : && echo --set $${s#*:}); \
	  $(BIN)/python -m simulations.inprocess --config cpu --layout sites --out $(EXP)/fed-$$name \
	    --set federation.strategy=$$name --set federation.batchnorm=batch --set train.balance=none \
	    --set $(NO_MIRROR) $$extra || exit 1; done
	$(BIN)/python -m simulations.experiment_table $(EXP)/* > $(EXP)/table.md
	cat $(EXP)/table.md
	$(BIN)/python -m simulations.inprocess --config cpu --set federation.keep_rounds=true --set tracking.enabled=false \
	  --out $(EXP)/round-soup
	$(BIN)/python -m simulations.round_soup $(EXP)/round-soup --manifest $(REAL)/split.csv \
	  --reference $(REAL)/centralized/bundle
	$(MAKE) real-data-seeds

# Cross-validation over the training patients (docs/real-data.md, "Cross-validated recipe choices"): the train and val knees
# cut into 5 folds by the split's own rule, each scored out of fold by one network trained on the rest (val rows
# stay val rows for the early stop and calibration); the test split and the hold-out are never read. ~30 min per
# recipe on 2 cores. Each variant is compared with the preset on the same folds, paired over radiographs.
CV := runs/cv
CV_RUN := $(BIN)/python -m simulations.cross_validate run --config cpu --manifest $(REAL)/split.csv --set model.members=1
# name:argument,argument (cross_validate run's own arguments); a whole-film variant (--films) reuses the preset's
# folds film by film and is compared per radiograph only (its rows are films, not knees)
CV_VARIANTS := smooth:--set=loss.label_smoothing=0.1 nobalance:--set=train.balance=none \
	film:--films,--folds-from=$(CV)/base joint:--set=preprocess.crop=joint train3:--set=model.trainable_stages=3 \
	imaget:--set=loss.t_score_image=0.3 imaget01:--set=loss.t_score_image=0.1 bilateral:--set=loss.bilateral=0.1 \
	bilateral1:--set=loss.bilateral=1 epochs24:--set=train.epochs=24 markers:--set=preprocess.mask_markers=true \
	seed43:--set=seed=43 seed44:--set=seed=44
real-data-cv: real-data-prepare
	$(CV_RUN) --out $(CV)/base
	$(BIN)/python -m simulations.cross_validate no-mirror $(CV)/base --out $(CV)/nomirror
	$(BIN)/python -m simulations.cross_validate compare $(CV)/base $(CV)/nomirror > $(CV)/nomirror/knees.json
	$(BIN)/python -m simulations.cross_validate tscore $(CV)/base --out $(CV)/tscore
	$(BIN)/python -m simulations.cross_validate markers $(CV)/base --out $(CV)/base-markers
	$(BIN)/python -m simulations.cross_validate compare $(CV)/base $(CV)/base-markers > $(CV)/base-markers/knees.json
	$(BIN)/python -m simulations.bilateral_drivers $(CV)/base --out $(CV)/base-drivers
	$(BIN)/python -m simulations.plain_baseline --folds-from $(CV)/base --out $(CV)/plain
	$(BIN)/python -m simulations.plain_baseline --folds-from $(CV)/base --films --out $(CV)/plain-films
	$(BIN)/python -m simulations.plain_baseline --folds-from $(CV)/base --input pipeline --out $(CV)/plain-pipeline
	$(BIN)/python -m simulations.cross_validate compare $(CV)/base $(CV)/plain > $(CV)/plain/knees.json
	$(BIN)/python -m simulations.cross_validate compare --films $(CV)/base $(CV)/plain-films > $(CV)/plain-films/films.json
	for v in $(CV_VARIANTS); do name=$${v%%:*}; args=$$(echo $${v#*:} | tr ',' ' '); \
	  $(CV_RUN) --out $(CV)/$$name $$args || exit 1; \
	  $(BIN)/python -m simulations.cross_validate compare --films $(CV)/base $(CV)/$$name > $(CV)/$$name/films.json || exit 1; \
	  $(BIN)/python -m simulations.cross_validate bilateral $(CV)/base $(CV)/$$name > $(CV)/$$name/bilateral.json || exit 1; \
	  case "$$args" in *--films*) ;; *) $(BIN)/python -m simulations.cross_validate compare $(CV)/base $(CV)/$$name \
	    > $(CV)/$$name/knees.json || exit 1;; esac; done
	$(BIN)/python -m simulations.cross_validate ensemble $(CV)/base $(CV)/seed43 --out $(CV)/ensemble2
	$(BIN)/python -m simulations.cross_validate compare $(CV)/base $(CV)/ensemble2 > $(CV)/ensemble2/knees.json
	$(BIN)/python -m simulations.cross_validate bilateral $(CV)/base $(CV)/seed43 $(CV)/ensemble2 > $(CV)/ensemble2/bilateral.json
	$(BIN)/python -m simulations.cross_validate ensemble $(CV)/base $(CV)/seed43 $(CV)/seed44 --out $(CV)/ensemble3
	$(BIN)/python -m simulations.cross_validate compare $(CV)/base $(CV)/ensemble3 > $(CV)/ensemble3/knees.json
	$(BIN)/python -m simulations.cross_validate bilateral $(CV)/base $(CV)/seed44 $(CV)/ensemble3 > $(CV)/ensemble3/bilateral.json

# How far one run of the chosen recipe can be trusted (docs/real-data.md, "Three seeds"): the centralized bundle is an
# ensemble of seeds 42-44, read as its three members; the federation (one network) runs again with seeds 43 and
# 44; then each mode's spread and ensemble (and the centralized weight soup) on the same knees (~30 min on 2 cores).
SEEDS := 43 44
real-data-seeds: real-data-prepare
	for s in $(SEEDS); do $(BIN)/python -m simulations.federate --config cpu --set seed=$$s \
	  --out $(EXP)/seeds/federated-$$s || exit 1; done
	$(BIN)/python -m simulations.seed_ensemble --soup $(REAL)/centralized/bundle --manifest $(REAL)/split.csv
	$(BIN)/python -m simulations.seed_ensemble $(REAL)/federated/bundle \
	  $(addprefix $(EXP)/seeds/federated-,$(addsuffix /bundle,$(SEEDS))) --manifest $(REAL)/split.csv

# DP-SGD (README, "Privacy"). dp-table: the demo's synthetic sites at ε 8/3/1 beside the non-private runs, both
# modes (about 25 min on 2 idle cores). real-data-dp: the cpu preset federated with ε = 8 at every site
# (δ = 1e-5), 5 rounds (a DP step is ~10x a plain one here), in this process, with each per-case model form
# (GroupNorm; the pretrained BatchNorm frozen). DP-SGD refuses FedBN (its model has no trainable BatchNorm) and
# the source x label balanced draws (its accounting assumes uniform Poisson sampling): FedAvg, class weight.
DP := privacy.dp.enabled=true privacy.dp.target_epsilon=8 train.balance=none federation.strategy=fedavg \
	federation.batchnorm=batch federation.rounds=5 model.members=1
dp-table: $(STAMP)
	$(BIN)/python -m simulations.dp_table --out runs/dp

real-data-dp: real-data-prepare
	for norm in group frozen; do $(BIN)/python -m simulations.inprocess --config cpu --layout sites \
	  --out $(REAL)/dp/federated-$$norm $(addprefix --set ,$(DP)) --set model.norm=$$norm || exit 1; done

# The paper recipe on one GPU (simulations/paper_gpu.py): the preprocessed real knees (uint8 JPEG q95) and the
# resolved paper-gpu preset in one file for the GPU machine, which then needs only torch, torchvision and numpy:
#   python -m simulations.paper_gpu run --data .gpu/paper-gpu.npz --out OUT     (there)
#   python -m simulations.paper_gpu report --results OUT                       (here)
.PHONY: paper-gpu-data
paper-gpu-data: $(STAMP)
	test -f $(REAL)/split.csv || $(MAKE) real-data-prepare
	$(BIN)/python -m simulations.paper_gpu export --config paper-gpu --out .gpu/paper-gpu.npz

# Speed against what the hardware allows (README, "Performance"): bench.json and bench.md (~10 min on 2 cores).
.PHONY: bench
bench: $(STAMP)
	$(BIN)/strnet bench --out runs/bench
