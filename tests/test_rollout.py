import torch

from rlhf_core.model.batches import length_buckets
from rlhf_core.model.checkpoints import load_actor_critic
from rlhf_core.model.loading import load_causal_lm, load_tokenizer
from rlhf_core.phases.rollout import (
    generate_samples,
    record_token_stats,
    rollout_table,
    sample_prompt_indices,
    truncate_at_eos,
)

CPU = torch.device("cpu")
PROMPTS = ["The pizza was", "Honestly, the laptop seemed", "So far the movie is", "The room"]


def _generate(tiny_checkpoint, seed=7, samples_per_prompt=3, batch_size=5, max_new_tokens=12):
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    samples = generate_samples(model.policy, tokenizer, prompt_ids, samples_per_prompt=samples_per_prompt,
                               temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=seed, device=CPU)
    return tokenizer, model, samples


def test_truncate_at_eos_keeps_eos():
    assert truncate_at_eos([4, 5, 1, 0, 0], 1) == ([4, 5, 1], True)
    assert truncate_at_eos([4, 5, 6], 1) == ([4, 5, 6], False)


def test_truncate_at_any_of_several_end_ids():
    """Llama 3 ends a turn with <|eot_id|> or <|end_of_text|>: the first of either ends the response."""
    assert truncate_at_eos([4, 9, 5, 1, 9], [1, 9]) == ([4, 9], True)
    assert truncate_at_eos([4, 5, 1, 9], [9, 1]) == ([4, 5, 1], True)
    assert truncate_at_eos([4, 5, 6], [1, 9]) == ([4, 5, 6], False)


def test_length_buckets_group_similar_lengths():
    assert length_buckets([5, 1, 3, 1, 5], 2) == [[1, 3], [2, 0], [4]]


def test_sample_prompt_indices_seeded_and_distinct():
    first = sample_prompt_indices(100, 10, seed=3)
    assert first == sample_prompt_indices(100, 10, seed=3)
    assert first != sample_prompt_indices(100, 10, seed=4)
    assert len(set(first)) == 10


def test_generation_shapes_eos_and_determinism(tiny_checkpoint):
    tokenizer, _, samples = _generate(tiny_checkpoint)
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, s) for p in range(4) for s in range(3)]
    for sample in samples:
        assert 1 <= len(sample.response_ids) <= 12
        if sample.ended_with_eos:
            assert sample.response_ids[-1] == tokenizer.eos_token_id
            assert sample.response_ids.count(tokenizer.eos_token_id) == 1
        else:
            assert len(sample.response_ids) == 12
    assert any(s.ended_with_eos for s in samples)
    again = _generate(tiny_checkpoint)[2]
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]
    other_seed = _generate(tiny_checkpoint, seed=8)[2]
    assert [s.response_ids for s in other_seed] != [s.response_ids for s in samples]


def test_recorded_logprobs_match_a_recomputation_in_other_batches(tiny_checkpoint):
    """The same code path in rollout and training: regrouping the batch changes nothing (ratio = 1)."""
    tokenizer, model, samples = _generate(tiny_checkpoint)
    stats_small = record_token_stats(model, None, samples, pad_id=tokenizer.pad_token_id, temperature=0.7,
                                     batch_size=2, device=CPU, reference_is_policy=True)
    stats_big = record_token_stats(model, load_causal_lm(str(tiny_checkpoint), CPU), samples,
                                   pad_id=tokenizer.pad_token_id, temperature=0.7, batch_size=64, device=CPU)
    for small, big, ref in zip(stats_small["logprobs"], stats_big["logprobs"], stats_big["ref_logprobs"]):
        assert small.shape == big.shape
        assert abs(small - big).max() < 1e-5
        assert abs(big - ref).max() < 1e-5  # policy == reference before any update
    assert all(abs(v).max() == 0.0 for v in stats_big["values"])  # zero-initialised value head


def test_rollout_table_columns(tiny_checkpoint):
    tokenizer, model, samples = _generate(tiny_checkpoint)
    stats = record_token_stats(model, None, samples, pad_id=tokenizer.pad_token_id, temperature=1.0, batch_size=4,
                               device=CPU, reference_is_policy=True)
    table = rollout_table(PROMPTS, samples, stats, tokenizer)
    assert len(table) == 12
    assert (table["response_length"] == table["response_ids"].map(len)).all()
    assert (table["logprobs"].map(len) == table["response_length"]).all()
    assert table["prompt"].iloc[0] == PROMPTS[0]
    assert "<|endoftext|>" not in "".join(table["response"])


def _sample_with_record(tiny_checkpoint, record, **sampling):
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    model = load_actor_critic(str(tiny_checkpoint), "value_head", CPU)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    samples = generate_samples(model.policy, tokenizer, prompt_ids, samples_per_prompt=3, max_new_tokens=12,
                               batch_size=5, seed=7, device=CPU, record_sampler_logprobs=record, **sampling)
    return tokenizer, model, samples


def test_sampler_logprobs_are_the_trainers_to_float_precision_and_change_no_sample(tiny_checkpoint):
    """The HF engine as a check: the log-probs generate drew each token from equal the training forward's
    (temperature 0.7, no truncation) to float precision, and recording them changes no sampled token."""
    sampling = dict(temperature=0.7, top_p=1.0, top_k=0)
    tokenizer, model, recorded = _sample_with_record(tiny_checkpoint, True, **sampling)
    plain = _sample_with_record(tiny_checkpoint, False, **sampling)[2]
    assert [s.response_ids for s in recorded] == [s.response_ids for s in plain]
    assert all(s.sampler_logprobs is None for s in plain)
    stats = record_token_stats(model, None, recorded, pad_id=tokenizer.pad_token_id, temperature=0.7, batch_size=4,
                               device=CPU, reference_is_policy=True)
    for sample, trainer in zip(recorded, stats["logprobs"]):
        assert len(sample.sampler_logprobs) == len(sample.response_ids)
        assert abs(torch.tensor(sample.sampler_logprobs) - torch.from_numpy(trainer)).max() < 1e-4
    table = rollout_table(PROMPTS, recorded, stats, tokenizer)
    assert (table["sampler_logprobs"].map(len) == table["response_length"]).all()


def test_truncated_sampling_is_a_different_distribution_and_the_recorder_sees_it(tiny_checkpoint):
    """top_k 3: the sampler renormalises over three tokens, so log μ = log π − log Σ_top-3 π ≥ log π, the
    mismatch that rollout-trainer correction reweights."""
    sampling = dict(temperature=1.0, top_p=1.0, top_k=3)
    tokenizer, model, recorded = _sample_with_record(tiny_checkpoint, True, **sampling)
    assert [s.response_ids for s in recorded] == [s.response_ids for s in _sample_with_record(
        tiny_checkpoint, False, **sampling)[2]]
    stats = record_token_stats(model, None, recorded, pad_id=tokenizer.pad_token_id, temperature=1.0, batch_size=4,
                               device=CPU, reference_is_policy=True)
    gaps = torch.cat([torch.tensor(s.sampler_logprobs) - torch.from_numpy(t) for s, t in zip(recorded, stats["logprobs"])])
    assert (gaps >= -1e-5).all() and gaps.max() > 0.05


def test_a_checkpoints_own_sampling_defaults_do_not_reach_generate(tiny_checkpoint):
    """A checkpoint whose generation_config ships min_p, typical_p and a repetition penalty: generate would fill the
    rollout's settings that equal the library defaults from it and sample a truncated, penalised distribution (which
    the recorder, running before those warpers, would not even see).  The samples are those of a clean checkpoint."""
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    responses = {}
    for shipped in (False, True):
        policy = load_actor_critic(str(tiny_checkpoint), "value_head", CPU).policy
        if shipped:
            policy.generation_config.min_p = 0.3
            policy.generation_config.typical_p = 0.5
            policy.generation_config.repetition_penalty = 1.5
        responses[shipped] = [s.response_ids for s in generate_samples(
            policy, tokenizer, prompt_ids, samples_per_prompt=3, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=12, batch_size=5, seed=7, device=CPU)]
    assert responses[True] == responses[False]
    assert policy.generation_config.min_p == 0.3  # the checkpoint's own config is left as it was
