# Two set-up commands on a fresh clone: `make demo` and `make test`. Each creates .venv and installs the
# project into it when .venv is missing or pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_BASE := $(VENV)/.installed-base
STAMP_DEV := $(VENV)/.installed-dev
PYTEST_ARGS ?=
UNIT_WORKERS ?= 2

.PHONY: demo test lint format install clean-venv image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP_BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --progress-bar off -e '.[cpu]'
	touch $@

# The tests score pyiqa's metrics against pyiqa itself: pyiqa and openai-clip without their dependencies (the heavy
# ones are not needed to score; pyiqa is never a core dependency).
$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --progress-bar off -e '.[cpu,dev]'
	$(BIN)/pip install --quiet --progress-bar off --no-deps pyiqa==0.1.16 openai-clip==1.0.1
	touch $@ $(STAMP_BASE)

install: $(STAMP_DEV)

demo: $(STAMP_BASE)
	$(BIN)/restoray demo

test: $(STAMP_DEV)
	./.ci/ensure-chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# The integration tests one at a time (each sizes Ray, a cluster or a server to the whole machine); then the unit
	@# tests, single-threaded each, on $(UNIT_WORKERS) processes (pytest-xdist). Both halves run; the status is the first
	@# failure's; a half with nothing selected (exit 5, e.g. PYTEST_ARGS="-k ...") is not a failure.
	status=0; \
	OMP_NUM_THREADS=1 $(BIN)/pytest --durations=15 tests/integration $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] || status=$$rc; }; \
	OMP_NUM_THREADS=1 $(BIN)/pytest --durations=15 -n $(UNIT_WORKERS) tests/unit $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] || [ $$status -ne 0 ] || status=$$rc; }; \
	exit $$status

lint: $(STAMP_DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP_DEV)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# restoray's container image (infra/docker/Dockerfile) from the wheel; tags from restoray/templates/image.toml.
VARIANT ?= cpu
image: $(STAMP_BASE)
	rm -f dist/restoray-*.whl
	$(BIN)/pip wheel --quiet --no-deps -w dist .
	docker build -f infra/docker/Dockerfile \
		--build-arg BASE_IMAGE=$$($(BIN)/restoray infra image --base --variant $(VARIANT)) \
		--build-arg EXTRAS=$(if $(filter cuda,$(VARIANT)),gpu,cpu) \
		-t $$($(BIN)/restoray infra image --variant $(VARIANT)) .

clean-venv:
	rm -rf $(VENV)
