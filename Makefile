# Rehydra — build entry points. GNU make.

# Example plugins: directory names under examples/, which are also their
# cargo package names. Adding an example is adding one word here.
EXAMPLES := bank-account users faulty

CARGO ?= cargo
WASM_TARGET := wasm32-wasip2
# Where cargo puts its output (it honours CARGO_TARGET_DIR too).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
WASM_OUT := $(TARGET_DIR)/$(WASM_TARGET)/release
# Where the built plugins are collected, named after their example.
PLUGIN_DIR := $(TARGET_DIR)/plugins

.PHONY: all plugins test-plugins run test lint host
all: plugins host

# Build every example as a component and copy it to
# $(PLUGIN_DIR)/<example>.wasm. Cargo names the output after the crate, with
# `-` turned into `_`. Each copy is renamed into place, so that a host
# watching the directory never loads a half-written file.
plugins:
	$(CARGO) build --release --target $(WASM_TARGET) $(addprefix -p ,$(EXAMPLES))
	@mkdir -p $(PLUGIN_DIR)
	@set -e; for ex in $(EXAMPLES); do \
	  crate=$$(echo "$$ex" | tr - _); \
	  cp "$(WASM_OUT)/$$crate.wasm" "$(PLUGIN_DIR)/$$ex.wasm.tmp"; \
	  mv -f "$(PLUGIN_DIR)/$$ex.wasm.tmp" "$(PLUGIN_DIR)/$$ex.wasm"; \
	  echo "  plugin $(PLUGIN_DIR)/$$ex.wasm ($$(wc -c < "$(PLUGIN_DIR)/$$ex.wasm") bytes)"; \
	done

# Hostile plugin files for the sandbox tests, kept out of $(PLUGIN_DIR):
# `faulty` built with each feature that breaks it in another way.
TEST_PLUGIN_DIR := $(TARGET_DIR)/test-plugins
HOSTILE_VARIANTS := describe-traps other-world
test-plugins: plugins
	@mkdir -p $(TEST_PLUGIN_DIR)
	@set -e; for f in $(HOSTILE_VARIANTS); do \
	  $(CARGO) build --release --target $(WASM_TARGET) -p faulty --features $$f; \
	  cp "$(WASM_OUT)/faulty.wasm" "$(TEST_PLUGIN_DIR)/faulty-$$f.wasm"; \
	  echo "  test plugin $(TEST_PLUGIN_DIR)/faulty-$$f.wasm"; \
	done

# The host binary, in the one profile the tests use too.
host:
	$(CARGO) build -p rehydra

# Build everything, then run the host with the example plugins on the
# embedded store (./rehydra-data). Extra flags: make run ARGS='--http 0.0.0.0:8080'
run: plugins host
	$(TARGET_DIR)/debug/rehydra run --plugins $(PLUGIN_DIR) --store embedded://./rehydra-data $(ARGS)

# Every test: host unit tests (and the store conformance suite), the SDK's
# unit and doc tests, and the end-to-end tests against the built binary and
# plugins. Test binaries run one at a time: the machine has two cores and
# each end-to-end test starts its own host.
test: plugins test-plugins host
	$(CARGO) test -- --test-threads 2

# Formatting and lints, as CI checks them (the examples for their real target).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --target $(WASM_TARGET) $(addprefix -p ,$(EXAMPLES)) -- -D warnings
