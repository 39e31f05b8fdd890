# Two commands on a fresh machine (see README):
#   make smoke   install into .venv, then run the embedded default sweep and write its report
#   make test    install into .venv, then run the whole test suite
#
# torch is pinned to the CPU wheel first: any looser spec can pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: install smoke test test-suite test-e2e clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,dashboard,tracking,cmaes,lmeval]"
	touch $(STAMP)

smoke: install
	$(BIN)/qlora-sweep run sweeps/smoke.yaml

# The e2e step (`ray up`/`ray submit`/`ray down` as a throwaway user over a loopback sshd; needs
# root, see README) runs after the rest of the suite: it is the slowest and needs the most set-up.
test: test-suite test-e2e

test-suite: install
	$(BIN)/python -m pytest tests --durations=30

test-e2e: install
	$(BIN)/python -m pytest tests -m e2e -p no:cacheprovider

clean:
	rm -rf $(VENV) results
