# The two commands the README names. Both create or refresh .venv first (a no-op when
# pyproject.toml and scripts/install.sh are unchanged since the last install).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install run serve test gpu-bundle

install:
	@bash scripts/install.sh

run: install
	$(PY) scripts/train.py $(ARGS)

# The Tinker-compatible service: prints http://127.0.0.1:PORT once it accepts requests.
serve: install
	$(PY) scripts/serve.py $(ARGS)

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "FAILED: no tests were collected"; exit 1; fi; exit $$rc

# What scripts/gpu_check.py needs on a GPU machine that has torch, transformers and peft but
# cannot download: megatron-core's package, copied into .gpu/site (PYTHONPATH there).
gpu-bundle: install
	@rm -rf .gpu/site && mkdir -p .gpu/site
	@cp -r $$($(PY) -c "import megatron, os; print(os.path.dirname(megatron.__path__[0]))")/megatron .gpu/site/
	@find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
	@echo "wrote .gpu/site ($$(du -sh .gpu/site | cut -f1)): carry it and run PYTHONPATH=.gpu/site python3 scripts/gpu_check.py --out DIR"
