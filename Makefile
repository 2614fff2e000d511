# Two set-up commands: `make demo` and `make test`. Both create .venv/ first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmdl-installed
# torch and torchvision are pinned so pip takes the builds this project is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# pip's index for torch and torchvision (empty: pip's default, PyPI). A CPU-only torch, without
# its CUDA libraries (the .venv shrinks from about 7.3 GB):
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
DEMO_WS ?= runs/demo

.PHONY: venv test demo bench gpu-check clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,export]'
	$(PY) -c "import torch, torchvision, faiss, sklearn, typer, rich, onnxruntime, matplotlib; print('environment ready: torch', torch.__version__)"
	touch $(STAMP)

test: venv
	$(PY) -m pytest

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash recipes/demo.sh $(DEMO_WS)

# Speed figures (printed, never asserted). The ablation is separate: benchmarks/ablation.py.
bench: venv
	$(PY) benchmarks/eval_bench.py
	$(PY) benchmarks/cluster_bench.py --sizes 100000
	$(PY) benchmarks/refine_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/export_bench.py

# Every GPU code path once, in minutes, as one table (README: "GPU check"); --cpu: toy size.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

clean-demo:
	rm -rf $(DEMO_WS)
