"""Shared fixtures: a tiny tokenizer and model built locally (no hub access)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the stage scripts (stages/) are imported by tests as a package
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on a 2-core machine: intra-op threads only contend and run ~10x slower; use one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_params():
    from rlhf_core.config import Params, TinyModelParams, SFTParams

    tiny = TinyModelParams(vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           max_positions=96)
    return replace(Params(), sft=replace(SFTParams(), tiny=tiny, epochs=4, batch_size=32, lr=1e-2))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_params) -> Path:
    """A tiny Llama + byte-level BPE tokenizer, briefly trained on sentiment demonstrations, saved to disk."""
    import torch

    from rlhf_core.models import seed_everything
    from rlhf_core.sft import build_reference, encode_demonstrations, train_sft
    from rlhf_core.tasks import sentiment

    seed_everything(0)
    rows = sentiment.demonstrations(800, seed=0)
    model, tokenizer = build_reference(tiny_params, rows, torch.device("cpu"))
    encoded = encode_demonstrations(tokenizer, rows, 48)
    train_sft(model, tokenizer, encoded, tiny_params, torch.device("cpu"), seed=0, log=lambda *_: None)
    path = tmp_path_factory.mktemp("tiny") / "sft"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
