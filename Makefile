# steerl: `make sim` runs the main job, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= sim_panda_pick_cube
STEPS ?= 30000
DEMOS ?= demos/$(CONFIG)
RUN_DIR ?= runs/$(CONFIG)
# The CPU wheel of torch lies on the development machines' disk; elsewhere pip fetches this version.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install sim test proto bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# A training session on the PyBullet cell: 20 scripted demos (recorded once), then SAC/RLPD.
sim: install
	@test -d $(DEMOS) || $(PY) -m tools.cli record-demos --config $(CONFIG) -n 20 --out $(DEMOS)
	$(PY) -m tools.cli train --config $(CONFIG) --steps $(STEPS) --demos $(DEMOS) --run-dir $(RUN_DIR)

test: install
	$(PY) -m pytest -q

proto: install
	$(PY) -m grpc_tools.protoc -Itransport --python_out=transport transport/steerl.proto

bench: install
	$(PY) benchmarks/robot_link.py --json benchmarks/robot_link.json
	$(PY) benchmarks/replay.py --json benchmarks/replay.json
	$(PY) benchmarks/learner_throughput.py --json benchmarks/learner_throughput.json
	$(PY) benchmarks/cameras.py --json benchmarks/cameras.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
