# Two commands on a fresh machine:  `make demo` (install + run the main job), `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo test lint format constraints

# constraints.txt: the versions CI tested, so that a site installs those (`make constraints`
# writes it from this venv; torch and its CUDA wheels are left to the line above it)
install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# x86-64 machines carry these wheels on disk; elsewhere pip resolves pyproject's range.
	if [ "$$(uname -m)" = x86_64 ]; then $(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1; fi
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,int8]'

constraints:
	{ echo "# The versions CI tested (make install uses them). Regenerate: make constraints"; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -v -i -E '^(torch|torchvision|triton|nvidia-|pip==)'; \
	} > constraints.txt

demo: install
	$(BIN)/rollscan demo

test: install
	$(BIN)/pytest

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
