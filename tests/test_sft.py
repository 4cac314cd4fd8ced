import math

import torch

from rlhf_core.config import ChatParams
from rlhf_core.model.batches import collate
from rlhf_core.phases.sft import encode_demonstrations, perplexity, sequence_nll, train_sft

CPU = torch.device("cpu")


class _Tokenizer:
    """Characters as tokens: enough to check truncation and masking by hand."""

    eos_token_id = 1
    pad_token_id = 0
    bos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_encode_demonstrations_appends_eos_and_truncates():
    encoded = encode_demonstrations(_Tokenizer(), [{"prompt": "abcdef", "response": "xyz"}], max_length=6, chat=ChatParams())
    prompt, response = encoded[0]
    assert prompt == [ord(c) for c in "def"]  # prompt keeps its last max_length // 2 tokens
    assert response == [ord("x"), ord("y"), ord("z")]  # the EOS did not fit in 6 tokens
    prompt, response = encode_demonstrations(_Tokenizer(), [{"prompt": "ab", "response": "x"}], max_length=6, chat=ChatParams())[0]
    assert response == [ord("x"), 1]


def test_completion_only_mask_counts_response_tokens_only(tiny_checkpoint):
    from rlhf_core.model.loading import load_causal_lm

    model = load_causal_lm(str(tiny_checkpoint), CPU)
    batch = collate([[10, 11, 12], [13]], [[14, 15], [16, 17, 18]], pad_id=0)
    _, all_tokens = sequence_nll(model, batch, completion_only=False)
    _, response_tokens = sequence_nll(model, batch, completion_only=True)
    assert all_tokens.item() == (3 + 2 - 1) + (1 + 3 - 1)
    assert response_tokens.item() == 2 + 3


def test_training_lowers_heldout_perplexity(tiny_params):
    from rlhf_core.model.device import seed_everything
    from rlhf_core.phases.sft import build_reference
    from rlhf_core.phases.tasks import sentiment
    from rlhf_core.runtime import stage_times

    seed_everything(0)
    rows = sentiment.demonstrations(200, seed=1)
    model, tokenizer = build_reference(tiny_params, rows, CPU)
    heldout = encode_demonstrations(tokenizer, sentiment.demonstrations(30, seed=2), 48, chat=tiny_params.chat)
    before = perplexity(model, tokenizer, heldout, CPU)
    stage_times.reset_work()
    metrics = train_sft(model, tokenizer, encode_demonstrations(tokenizer, rows, 48, chat=tiny_params.chat), tiny_params, CPU, seed=0,
                        log=lambda *_: None)
    after = perplexity(model, tokenizer, heldout, CPU)
    assert math.isfinite(metrics["train_loss"])
    assert after < 0.5 * before, (before, after)
    assert metrics["steps"] == math.ceil(200 / tiny_params.sft.batch_size) * tiny_params.sft.epochs
    assert set(stage_times.work_rates()) == {"sft_steps_per_s"}  # the stage's steps/s measure (benchmarks read it)
    assert stage_times._WORK["sft_steps"][0] == metrics["steps"]


def test_micro_batches_give_the_gradient_of_one_pass(tiny_checkpoint):
    """sft.micro_batch_size splits a step's rows (grouped by length) without changing its gradient."""
    from rlhf_core.model.loading import load_causal_lm, load_tokenizer
    from rlhf_core.phases.sft import accumulate_gradients, trained_tokens
    from rlhf_core.phases.tasks import sentiment

    model = load_causal_lm(str(tiny_checkpoint), CPU)
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    rows = encode_demonstrations(tokenizer, sentiment.demonstrations(24, seed=3), 48, chat=ChatParams())
    for completion_only in (False, True):
        batch = collate([p for p, _ in rows], [r for _, r in rows], tokenizer.pad_token_id)
        one_pass_nll, one_pass_tokens = sequence_nll(model, batch, completion_only)
        assert one_pass_tokens.item() == sum(trained_tokens(p, r, completion_only) for p, r in rows)
        model.zero_grad()
        (one_pass_nll / one_pass_tokens).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        nll, tokens = accumulate_gradients(model, rows, 5, tokenizer.pad_token_id, completion_only, CPU)
        assert tokens == one_pass_tokens.item() and abs(nll - one_pass_nll.item()) < 1e-3
        for grad, want in zip((p.grad for p in model.parameters()), expected):
            assert torch.allclose(grad, want, atol=1e-6, rtol=1e-4)
