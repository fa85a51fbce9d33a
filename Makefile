# tltool: the two commands a new user needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch pair that installs offline on the project machines; override for other platforms,
# e.g. `make install TORCH_SPEC="torch torchvision --index-url ..." CONSTRAINTS=` (constraints.txt
# pins the tested pair, so drop it or pass your own file when you choose another build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-stamp
TL := $(BIN)/tltool
DEMO_ROOT ?= runs

.PHONY: install demo test test-all test-slow lint bench transfer-table german-table amount-table digits-table \
	lite0-table adapt-table select-sharing clean config-doc catalog layout

# Downloads from a package registry can break off mid-file: each pip step is tried three times.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
RETRY := for try in 1 2 3; do
DONE := && ok=1 && break; echo "pip failed (try $$try of 3)"; [ $$try = 3 ] || sleep 10; done; \
	[ "$$ok" = 1 ]

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	@ok=0; $(RETRY) $(BIN)/pip install -q --retries 10 $(PIP_C) $(TORCH_SPEC) $(DONE)
	@ok=0; $(RETRY) $(BIN)/pip install -q --retries 10 $(PIP_C) -e '.[dev]' $(DONE)
	touch $(STAMP)

install: $(STAMP)

# The whole credit-default transfer chain on the built-in credit_data set.
demo: install
	@start=$$(date +%s%N); \
	$(TL) pretrain configs/credit/pretrain.yaml --set output.root=$(DEMO_ROOT) && \
	$(TL) freeze-finetune configs/credit/finetune.yaml --set output.root=$(DEMO_ROOT) \
	    --set model.weights=$(DEMO_ROOT)/credit-pretrain/latest && \
	$(TL) evaluate $(DEMO_ROOT)/credit-finetune/latest && \
	$(TL) predict $(DEMO_ROOT)/credit-finetune/latest configs/credit/new_applicants.csv \
	    --id-column applicant_id --out $(DEMO_ROOT)/demo_predictions.csv && \
	end=$$(date +%s%N); \
	echo "demo finished in $$(( (end - start) / 1000000 )) ms; predictions in $(DEMO_ROOT)/demo_predictions.csv"

# The default suite (at most 8 minutes on 2 idle cores) leaves out the tests marked slow;
# test-all runs every test, test-slow only the slow ones. Each prints its wall time.
PYTEST_TIMED = start=$$(date +%s); $(BIN)/python -m pytest -q $(1); status=$$?; \
	end=$$(date +%s); echo "$(2) finished in $$((end - start)) s"; exit $$status

test: install
	@$(call PYTEST_TIMED,,make test)

test-all: install
	@$(call PYTEST_TIMED,-m "slow or not slow",make test-all)

test-slow: install
	@$(call PYTEST_TIMED,-m slow,make test-slow)

lint: install
	$(BIN)/ruff check tltool tests benchmarks tools

# The house's shape (issue 19's goals): import cycles, private names across modules, file,
# function and parameter-list sizes, and which modules name the run-folder files.
layout:
	$(PY) tools/layout.py

# Every route and `tltool select` on the same labelled rows, 5 seeds (docs/SELECT.md).
transfer-table: install
	$(BIN)/python benchmarks/select_table.py --case credit --out docs/TRANSFER.md

german-table: install
	$(BIN)/python benchmarks/select_table.py --case german --out docs/TRANSFER_GERMAN.md

amount-table: install
	$(BIN)/python benchmarks/select_table.py --case amount --out docs/TRANSFER_AMOUNT.md

lite0-table: install
	$(BIN)/python benchmarks/select_table.py --case lite0 --out docs/TRANSFER_LITE0.md

# Wall time of select with shared work, without it, and of separate commands.
select-sharing: install
	$(BIN)/python benchmarks/select_sharing.py --case lite0

clean:
	rm -rf $(VENV) runs .pytest_cache

# Regenerate the key table of docs/CONFIG.md from the schema (a test checks it is current).
# Regenerate tltool/catalog.json (the static backbone list `tltool backbones` prints; a test
# checks it is current).
catalog: install
	$(BIN)/python -m tltool.catalog

config-doc: install
	{ sed '/^## Every key/q' docs/CONFIG.md; echo; $(TL) config --reference; } > docs/CONFIG.md.tmp
	mv docs/CONFIG.md.tmp docs/CONFIG.md

# Image transfer: MNIST-5k -> digits (docs/TRANSFER_DIGITS.md).
digits-table: install
	$(BIN)/python benchmarks/select_table.py --case digits --out docs/TRANSFER_DIGITS.md

adapt-table: install
	$(BIN)/python benchmarks/adapt_table.py --out docs/ADAPT.md

# Speed: tltool's engine against a plain reference loop, side by side (docs/SPEED.md).
bench: install
	$(BIN)/python benchmarks/speed.py --out docs/SPEED.md
