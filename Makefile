# The two commands the README names. Both create or refresh .venv first (a no-op when
# pyproject.toml and scripts/install.sh are unchanged since the last install).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install run serve test

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
