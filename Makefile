# Each target does its own set-up: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install tritonserver test test-long test-fast test-measured test-loaded lint demo bench clean check-extras

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Triton Inference Server with its python backend, for the test that serves `convcache triton --backend python`'s
# repository with a real tritonserver: PyPI's nvidia-pytriton (its wheel carries the binary) in a venv of its own,
# because it pins numpy<2, which Triton's python-backend stub also needs in the interpreter that runs model.py
# (with onnxruntime). About 450 MB in .tools/; without it (no registry) that test skips and says why.
# The stub embeds the system's libpython3.X: its venv is made from the system's own python3 (on Debian,
# /usr/bin/python3), so that the runtime and the standard library it loads are one release.
TRITON := .tools/tritonserver
TRITON_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
$(TRITON)/.stamp: | $(STAMP)
	rm -rf $(TRITON) && $(TRITON_PYTHON) -m venv $(TRITON)/env
	$(TRITON)/env/bin/pip install -q 'nvidia-pytriton==0.7.0' 'numpy<2' onnxruntime
	touch $@

tritonserver: $(TRITON)/.stamp

# the whole suite (see the README for how long it takes); a machine that cannot fetch tritonserver still tests
test: $(STAMP)
	-$(MAKE) --no-print-directory tritonserver
	$(PY) -m pytest -q -m "not long"

# the checks that take minutes (scikit-learn's whole check_estimator on the Keras head, as users construct it)
test-long: $(STAMP)
	$(PY) -m pytest -q -m long

# the whole suite with its peak memory (the sum of RSS over pytest and every process it starts, sampled from
# /proc) and wall time, into test-peak.json; test-loaded does the same while `stress-ng --cpu 2` (Debian's
# stress-ng) keeps both cores busy: the figures in the README's "Tests" section
test-measured: $(STAMP)
	-$(MAKE) --no-print-directory tritonserver
	python3 .ci/peak_rss.py --json test-peak.json -- $(PY) -m pytest -q -p no:cacheprovider -m "not long" --durations=25

test-loaded: $(STAMP)
	command -v stress-ng >/dev/null || { echo "stress-ng is not installed (apt-get install stress-ng)"; exit 2; }
	-$(MAKE) --no-print-directory tritonserver
	stress-ng --cpu 2 --quiet & load=$$!; \
	python3 .ci/peak_rss.py --json test-peak-loaded.json -- $(PY) -m pytest -q -p no:cacheprovider -m "not long" --durations=25; \
	code=$$?; \
	kill $$load; wait $$load; exit $$code

# the everyday tier: every test without a tier marker (no TensorFlow training, no cluster, no S3 server, no
# server process; the markers are in the test files, see tests/conftest.py)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not (slow or tf or dask or s3 or serve or long)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m convcache.pipeline.demo --out demo-out

clean:
	rm -rf demo-out .pytest_cache

# Each inference extra in a fresh venv: it installs, imports, and `convcache info --runtime` finds one
# ONNX Runtime build with the providers that extra promises (a few minutes; not part of `make test`).
check-extras:
	for extra in cpu openvino gpu; do \
	  rm -rf /tmp/convcache-extra-$$extra && python3 -m venv /tmp/convcache-extra-$$extra && \
	  /tmp/convcache-extra-$$extra/bin/pip install -q ".[$$extra]" && \
	  /tmp/convcache-extra-$$extra/bin/convcache info --runtime && \
	  /tmp/convcache-extra-$$extra/bin/python -c "import onnxruntime as o, sys; p = o.get_available_providers(); \
	    want = {'cpu': 'CPUExecutionProvider', 'openvino': 'CPUExecutionProvider', 'gpu': 'CUDAExecutionProvider'}['$$extra']; \
	    sys.exit(0 if want in p else 'missing ' + want)" || exit 1; \
	done
	/tmp/convcache-extra-openvino/bin/python -c "import openvino; print('openvino', openvino.__version__)"
