# Set-up is shared by every target: CPU torch first (an unpinned torch pulls a multi-GB CUDA build).
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test bench lint install

$(VENV_STAMP): pyproject.toml
	test -d .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(VENV_STAMP)

install: $(VENV_STAMP)

lint: $(VENV_STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# two pytest workers, one test file each at a time (module fixtures run once): most tests
# are single-threaded subprocesses, so this halves the wall time on two cores
test: $(VENV_STAMP) lint
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -x -n 2 --dist loadfile --durations=15

demo: $(VENV_STAMP)
	OMP_NUM_THREADS=1 .venv/bin/compo heldout --config experiments/configs/demo.yaml --out runs/demo/reward --overwrite
	OMP_NUM_THREADS=1 .venv/bin/compo heldout --config experiments/configs/demo.yaml --out runs/demo/instruction --overwrite \
		--set env_kwargs.task_info=instruction --set 'references=[random, oracle]' \
		--set method_config.compositional.episodes_per_trial=1 --set eval.episodes=1
	@echo "demo tables and curves: runs/demo/reward/{table.md,curves.png} and runs/demo/instruction/{table.md,curves.png}"

bench: $(VENV_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.run
