# Rehydra — build entry points. GNU make.

# Example plugins: directory names under examples/, which are also their
# cargo package names. Adding an example is adding one word here.
EXAMPLES := bank-account users faulty order inventory transfer

CARGO ?= cargo
WASM_TARGET := wasm32-wasip2
# Where cargo puts its output (it honours CARGO_TARGET_DIR too).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
WASM_OUT := $(TARGET_DIR)/$(WASM_TARGET)/release
# Where the built plugins are collected, named after their example.
PLUGIN_DIR := $(TARGET_DIR)/plugins

# Example plugins in JavaScript and Python: directory names under examples/.
# A JS example's main module is aggregate.js, a Python example's is app.py;
# each builds to $(PLUGIN_DIR)/<example>.wasm.
JS_EXAMPLES := bank-account-js transfer-js
PY_EXAMPLES := bank-account-py transfer-py
# Those of them that are process managers: built for the `process-manager`
# world, the others for `aggregate`.
PROCESS_EXAMPLES := transfer-js transfer-py
world-of = $(if $(filter $(1),$(PROCESS_EXAMPLES)),process-manager,aggregate)

.PHONY: all plugins test-plugins run test lint host js-plugins py-plugins sdk-test bench bench-release interop wasm-target system-packages
all: plugins host

# The Rust target the example plugins build for, added to the active
# toolchain when it is missing. rust-toolchain.toml lists it, but rustup adds
# a toolchain file's targets only when it installs the toolchain itself; on a
# machine where the pinned toolchain was already there, the target is not.
# A no-op (a fraction of a second) when the target is installed. Without
# rustup, the target must come with the toolchain: say so rather than let
# cargo fail with "can't find crate for `std`".
wasm-target:
	@if command -v rustup >/dev/null 2>&1; then \
	  rustup target list --installed | grep -qx '$(WASM_TARGET)' || { \
	    echo "  installing the Rust target $(WASM_TARGET) (rustup target add $(WASM_TARGET))"; \
	    rustup target add $(WASM_TARGET); }; \
	elif [ ! -d "$$(rustc --print target-libdir --target $(WASM_TARGET) 2>/dev/null)" ]; then \
	  echo "error: the Rust target $(WASM_TARGET) is not installed and there is no rustup to install it." >&2; \
	  echo "  Install rustup (https://rustup.rs) and run make again, or add $(WASM_TARGET) to your Rust toolchain." >&2; \
	  exit 1; \
	fi

# Build every example as a component and copy it to
# $(PLUGIN_DIR)/<example>.wasm. Cargo names the output after the crate, with
# `-` turned into `_`. Each copy is renamed into place, so that a host
# watching the directory never loads a half-written file.
plugins: wasm-target
	$(CARGO) build --release --target $(WASM_TARGET) $(addprefix -p ,$(EXAMPLES))
	@mkdir -p $(PLUGIN_DIR)
	@set -e; for ex in $(EXAMPLES); do \
	  crate=$$(echo "$$ex" | tr - _); \
	  cp "$(WASM_OUT)/$$crate.wasm" "$(PLUGIN_DIR)/$$ex.wasm.tmp"; \
	  mv -f "$(PLUGIN_DIR)/$$ex.wasm.tmp" "$(PLUGIN_DIR)/$$ex.wasm"; \
	  echo "  plugin $(PLUGIN_DIR)/$$ex.wasm ($$(wc -c < "$(PLUGIN_DIR)/$$ex.wasm") bytes)"; \
	done

plugins: js-plugins py-plugins

# The build tools come from the project's own files: componentize-js at the
# versions locked in guest-sdk/js/package-lock.json, componentize-py at the
# version in guest-sdk/python/requirements.txt, in a virtualenv under
# $(TARGET_DIR). Each is installed again only when its pin changes. (npm
# install --no-save rather than npm ci: the lock lacks a few optional
# per-platform packages that the registry could not supply when it was
# made, and npm ci refuses such a lock; --no-save installs from it and
# leaves it alone.)
JS_SDK := guest-sdk/js
JS_TOOLS := $(JS_SDK)/node_modules/.package-lock.json
PY_SDK := guest-sdk/python
PY_VENV := $(TARGET_DIR)/py-venv
PY_TOOLS := $(PY_VENV)/.installed
PYTHON ?= python3

$(JS_TOOLS): $(JS_SDK)/package.json $(JS_SDK)/package-lock.json
	@command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1 || { \
	  echo "error: the JavaScript example plugin needs Node.js 20.6+ with npm, and there is no node or npm on PATH." >&2; \
	  echo "  Install Node.js 20.6 or later with npm and run make again." >&2; exit 1; }
	cd $(JS_SDK) && npm install --no-save --no-audit --no-fund
	@touch $@

$(PY_TOOLS): $(PY_SDK)/requirements.txt
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { \
	  echo "error: the Python example plugin needs $(PYTHON) with venv (Python 3.10+; on Debian: apt-get install python3-venv)." >&2; exit 1; }
	$(PYTHON) -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install --quiet --disable-pip-version-check -r $(PY_SDK)/requirements.txt
	@touch $@

js-plugins: $(JS_EXAMPLES:%=$(PLUGIN_DIR)/%.wasm)
py-plugins: $(PY_EXAMPLES:%=$(PLUGIN_DIR)/%.wasm)

# Rebuild when any source file of the example changes.
.SECONDEXPANSION:

# componentize-js with every WASI feature off (see guest-sdk/js/build.mjs);
# the script writes beside the target and renames.
$(PLUGIN_DIR)/%.wasm: examples/%/aggregate.js $$(wildcard examples/$$*/*.js) $(JS_SDK)/rehydra.js $(JS_SDK)/printable.js $(JS_SDK)/build.mjs wit/aggregate.wit $(JS_TOOLS)
	node $(JS_SDK)/build.mjs $< $@ --world $(call world-of,$*)

# componentize-py with WASI stubbed out: the component imports only `log`.
$(PLUGIN_DIR)/%.wasm: examples/%/app.py $$(wildcard examples/$$*/*.py) $(PY_SDK)/rehydra.py $(PY_SDK)/rehydra_printable.py wit/aggregate.wit $(PY_TOOLS)
	@mkdir -p $(PLUGIN_DIR)
	$(PY_VENV)/bin/componentize-py -d wit -w $(call world-of,$*) componentize --stub-wasi \
	  -p $(PY_SDK) -p examples/$* app -o $@.tmp
	@mv -f $@.tmp $@
	@echo "  plugin $@ ($$(wc -c < $@) bytes)"

# The JavaScript and Python SDKs' own unit tests (Node and CPython, no
# component needed).
sdk-test:
	cd $(JS_SDK) && node --import ./test/register.mjs --test test/
	$(PYTHON) -m unittest discover -s $(PY_SDK)/tests

# Hostile plugin files for the sandbox tests, kept out of $(PLUGIN_DIR):
# `faulty` built with each feature that breaks it in another way.
TEST_PLUGIN_DIR := $(TARGET_DIR)/test-plugins
HOSTILE_VARIANTS := describe-traps other-world contract-0-1
# Later versions of bank-account, for the hot-reload and upgrade-check tests.
BANK_VERSIONS := withdrawal-fee schema-2 fold-bug apply-traps
# Later versions of transfer: a new version to hot-reload mid-flight, and one
# that traps on one event (parked).
TRANSFER_VERSIONS := v2 trap-on-13
test-plugins: plugins
	@mkdir -p $(TEST_PLUGIN_DIR)
	@set -e; for f in $(HOSTILE_VARIANTS); do \
	  $(CARGO) build --release --target $(WASM_TARGET) -p faulty --features $$f; \
	  cp "$(WASM_OUT)/faulty.wasm" "$(TEST_PLUGIN_DIR)/faulty-$$f.wasm"; \
	  echo "  test plugin $(TEST_PLUGIN_DIR)/faulty-$$f.wasm"; \
	done
	@set -e; for f in $(BANK_VERSIONS); do \
	  $(CARGO) build --release --target $(WASM_TARGET) -p bank-account --features $$f; \
	  cp "$(WASM_OUT)/bank_account.wasm" "$(TEST_PLUGIN_DIR)/bank-account-$$f.wasm"; \
	  echo "  test plugin $(TEST_PLUGIN_DIR)/bank-account-$$f.wasm"; \
	done
	@set -e; for f in $(TRANSFER_VERSIONS); do \
	  $(CARGO) build --release --target $(WASM_TARGET) -p transfer --features $$f; \
	  cp "$(WASM_OUT)/transfer.wasm" "$(TEST_PLUGIN_DIR)/transfer-$$f.wasm"; \
	  echo "  test plugin $(TEST_PLUGIN_DIR)/transfer-$$f.wasm"; \
	done

# The gRPC interoperability client (tests/interop, examples/read-model-py):
# grpcio and grpcio-tools at the versions pinned in
# tests/interop/requirements.txt, in a virtualenv under $(TARGET_DIR)
# (installed again only when a pin changes), and Python stubs generated from
# proto/ into $(INTEROP_GEN) (again whenever a .proto changes).
INTEROP_VENV := $(TARGET_DIR)/interop-venv
INTEROP_TOOLS := $(INTEROP_VENV)/.installed
INTEROP_GEN := $(TARGET_DIR)/interop-gen
PROTOS := $(wildcard proto/rehydra/v1/*.proto)

$(INTEROP_TOOLS): tests/interop/requirements.txt
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
	@touch $@

$(INTEROP_GEN)/.generated: $(PROTOS) $(INTEROP_TOOLS)
	@rm -rf $(INTEROP_GEN) && mkdir -p $(INTEROP_GEN)
	$(INTEROP_VENV)/bin/python -m grpc_tools.protoc -Iproto \
	  --python_out=$(INTEROP_GEN) --grpc_python_out=$(INTEROP_GEN) $(PROTOS)
	@touch $@

interop: $(INTEROP_GEN)/.generated

# The host binary, in the one profile the tests use too.
host:
	$(CARGO) build -p rehydra

# Build everything, then run the host with the example plugins on the
# embedded store (./rehydra-data). Extra flags: make run ARGS='--http 0.0.0.0:8080'
run: plugins host
	$(TARGET_DIR)/debug/rehydra run --plugins $(PLUGIN_DIR) --store embedded://./rehydra-data $(ARGS)

# Debian packages the tests run for real (the PostgreSQL server), installed
# with apt-get when missing; see the script for what it checks.
system-packages:
	@scripts/ensure-system-packages

# Every test: host unit tests (and the store conformance suite), the SDK's
# unit and doc tests, and the end-to-end tests against the built binary and
# plugins. Test binaries run one at a time: the machine has two cores and
# each end-to-end test starts its own host.
test: system-packages plugins test-plugins host sdk-test interop
	$(CARGO) test -- --test-threads 2

# Formatting and lints, as CI checks them (the examples for their real target).
lint: wasm-target
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy -p rehydra-bench --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) $(addprefix -p ,$(EXAMPLES)) -- -D warnings

# The benchmark suite (bench/, see BENCHMARKS.md), in the same `dev` profile
# as everything else. Writes Markdown tables to $(TARGET_DIR)/bench/results.md
# and prints them (progress goes to stderr meanwhile; stdout is discarded
# because the cqrs-es peer's MemStore prints a line per load and store).
# Extra flags: make bench ARGS='--runs 5 --secs 3'
bench: plugins test-plugins host
	@scripts/ensure-system-packages --bench
	$(CARGO) build -p rehydra-bench
	@mkdir -p $(TARGET_DIR)/bench
	$(TARGET_DIR)/debug/rehydra-bench --out $(TARGET_DIR)/bench/results.md.tmp $(ARGS) > /dev/null
	@mv -f $(TARGET_DIR)/bench/results.md.tmp $(TARGET_DIR)/bench/results.md
	@cat $(TARGET_DIR)/bench/results.md

# The same suite with the host and the bench fully optimised (profile
# `bench-release`; a first build takes 15-20 minutes on two cores).
bench-release: plugins test-plugins
	@scripts/ensure-system-packages --bench
	$(CARGO) build --profile bench-release -p rehydra -p rehydra-bench
	@mkdir -p $(TARGET_DIR)/bench
	REHYDRA_BIN=$(TARGET_DIR)/bench-release/rehydra $(TARGET_DIR)/bench-release/rehydra-bench --out $(TARGET_DIR)/bench/results-release.md.tmp $(ARGS) > /dev/null
	@mv -f $(TARGET_DIR)/bench/results-release.md.tmp $(TARGET_DIR)/bench/results-release.md
	@cat $(TARGET_DIR)/bench/results-release.md
