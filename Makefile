# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench lint soak image-test powercut host-dev-packages fresh-check clean config-docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m kiosk demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

config-docs: $(VENV)/.installed  # docs/config.md, examples/kiosk.toml, docs/kiosk.schema.json
	$(PY) -m kiosk.config_docs

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check kiosk drivers tests bench
	$(VENV)/bin/mypy kiosk

soak: $(VENV)/.installed
	KIOSK_SOAK_TRANSACTIONS=2000 $(PY) -m pytest -q -s tests/test_campaign.py

# The venv compiles evdev: as root on a new machine, install its compiler and headers first.
image-test: host-dev-packages $(VENV)/.installed
	bash image-build/image-test.sh

# Power cuts in the booted image (root): 20 cuts spread over every point of a sale, then the
# money checked (tests/powercut/rig.py). Boots a copy of the image `make image-test` built (it
# runs first when there is none), with this checkout's kiosk layer written over the copy.
# KIOSK_POWERCUT_CUTS=N: another count; KIOSK_POWERCUT_SEED=S replays a run.
powercut: host-dev-packages $(VENV)/.installed
	bash tools/host-packages.sh install image-build image-boot
	test -f image-build/out/kiosk-test.img || bash image-build/image-test.sh
	$(PY) -m tests.powercut --cuts $${KIOSK_POWERCUT_CUTS:-20} --refresh

host-dev-packages:
	bash tools/host-packages.sh install dev

# The set-up paths (.ci/run's install step, make demo, make test) on a clean Debian root; root.
fresh-check:
	bash tools/fresh-check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
