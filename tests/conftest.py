"""Shared fixtures: a tiny tokenizer and model built locally (no hub access)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rlhf_core.config import replace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the stage scripts (stages/) are imported by tests as a package
    sys.path.insert(0, str(REPO))

# The CPU kernels the launcher pins for every stage (cpu_isa: avx2, the default), set here before anything
# imports torch: a test compares what it computes in process with stages the launcher runs in subprocesses,
# and both must use the same kernels.  ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA given in the environment win
# (another float path), for the in-process side.
from rlhf_core.runtime.launch import PINNED_CPU_ISA, cpu_has_avx2  # noqa: E402  (imports nothing heavy)

if cpu_has_avx2():
    for _name, _value in PINNED_CPU_ISA.items():
        os.environ.setdefault(_name, _value)


TEST_THREADS = int(os.environ.get("RLHF_TEST_THREADS", "1"))


def _use_test_threads() -> None:
    import torch

    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session", autouse=True)
def session_torch_threads():
    """The thread count of session fixtures too (the tiny checkpoint), whichever test builds them first."""
    _use_test_threads()


@pytest.fixture(autouse=True)
def torch_threads():
    """Tiny models on a 2-core machine: intra-op threads only contend and run ~10x slower; use one.

    Set before and after every test: a stage run in process sets params.cpu_threads (2 by default) and
    would leave it for the tests that follow, so a test's float path would depend on what ran before it.

    RLHF_TEST_THREADS=N runs the tests with N intra-op threads instead: another float path (the order of
    reductions changes), to check that no test hinges on particular float bits.  ATEN_CPU_CAPABILITY
    (default, avx2, avx512) does the same for the SIMD kernels, stage subprocesses included.  Stages keep
    params.cpu_threads of the params they are given."""
    _use_test_threads()
    yield
    _use_test_threads()


@pytest.fixture(scope="session")
def tiny_params():
    from rlhf_core.config import Params, SFTParams, TinyModelParams

    tiny = TinyModelParams(vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           max_positions=96)
    return replace(Params(), sft=replace(SFTParams(), tiny=tiny, epochs=4, batch_size=32, lr=1e-2))


def trained_checkpoint(directory: Path, params) -> Path:
    """A Llama of ``params.sft.tiny``'s shape + byte-level BPE tokenizer, briefly trained on sentiment
    demonstrations, saved to ``directory``."""
    import torch

    from rlhf_core.model.device import seed_everything
    from rlhf_core.phases.sft import build_reference, encode_demonstrations, train_sft
    from rlhf_core.phases.tasks import sentiment

    seed_everything(0)
    rows = sentiment.demonstrations(800, seed=0)
    model, tokenizer = build_reference(params, rows, torch.device("cpu"))
    encoded = encode_demonstrations(tokenizer, rows, 48, chat=params.chat)
    train_sft(model, tokenizer, encoded, params, torch.device("cpu"), seed=0, log=lambda *_: None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_params) -> Path:
    """A tiny Llama (4 heads of 16) + byte-level BPE tokenizer, briefly trained, saved to disk."""
    return trained_checkpoint(tmp_path_factory.mktemp("tiny") / "sft", tiny_params)


def evaluate_all(params) -> None:
    """What `dvc repro` runs after the rounds, in process: evaluate_sft, evaluate@<round> for each round, and
    eval_summary (metrics/eval.json, summary.json, the plot table, samples/eval.jsonl)."""
    import argparse

    from stages import eval_summary, evaluate

    for name in ["sft", *params.rounds]:
        evaluate.main(params, argparse.Namespace(checkpoint=name))
    eval_summary.main(params, argparse.Namespace())


@pytest.fixture(autouse=True)
def vllm_marked_tests_need_vllm(request):
    """A test marked ``vllm`` runs the real engine: where vLLM is missing it fails, it is never skipped (CI runs
    them in the vLLM environment: README, vLLM)."""
    if request.node.get_closest_marker("vllm") is not None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            pytest.fail("this test runs the real vLLM engine, and vllm is not installed in this environment "
                        "(install the vLLM environment: README, vLLM)", pytrace=False)


@pytest.fixture(scope="session")
def vllm_params(tiny_params):
    """The tiny shape with head_dim 32 (hidden 64, 2 heads): vLLM's CPU attention serves head sizes 32–512 only."""
    from rlhf_core.config import TinyModelParams

    return replace(tiny_params, sft=replace(tiny_params.sft, tiny=TinyModelParams(
        vocab_size=400, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=96)))


@pytest.fixture(scope="session")
def vllm_checkpoint(tmp_path_factory, vllm_params) -> Path:
    """A tiny Llama (2 heads of 32, tied embeddings) + tokenizer, briefly trained, saved to disk."""
    return trained_checkpoint(tmp_path_factory.mktemp("vllm-tiny") / "sft", vllm_params)
