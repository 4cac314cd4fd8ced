"""Real instruct models' prompts and tokenizer quirks, on locally built models with those quirks
(``rlhf_core.tooling.local_models``): a chat template with a system turn, pad == eos, no pad, several end ids,
BOS required."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, evaluate_all

from rlhf_core.config import ChatParams, load_params
from rlhf_core.errors import DataError
from rlhf_core.model.chat import encode_prompt, encode_prompts, parse_conversation, stop_token_ids
from rlhf_core.model.loading import checkpoint_stop_ids
from rlhf_core.tooling.local_models import write_local_model

VOCAB = 4096  # the quirks do not need the real vocabulary; the e2e test has it
AUTO = ChatParams()


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """SmolLM2-like: ChatML, EOS <|im_end|>, pad == EOS, generation stops on <|im_end|> or <|endoftext|>."""
    return write_local_model(tmp_path_factory.mktemp("chatml") / "model", "chatml-49k-tiny", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """Llama-3-like: no pad, BOS added by the tokenizer, EOS <|eot_id|>, generation stops on two ids."""
    return write_local_model(tmp_path_factory.mktemp("llama3") / "model", "llama3-128k-tiny", vocab_size=VOCAB)


def raw_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_a_prompt_is_rendered_with_the_chat_template_and_a_system_turn(chatml_dir):
    tokenizer = raw_tokenizer(chatml_dir)
    ids = encode_prompt(tokenizer, "The food was", chat=ChatParams(system_prompt="Be kind."))
    assert tokenizer.decode(ids) == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nThe food was"
                                     "<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(encode_prompt(tokenizer, "The food was", chat=AUTO)).startswith("<|im_start|>user\n")
    assert tokenizer.decode(encode_prompt(tokenizer, "The food was", chat=ChatParams(template="off"))) == "The food was"


def test_template_on_needs_a_template_and_conversations_need_one(tiny_checkpoint):
    tokenizer = raw_tokenizer(tiny_checkpoint)  # the from-scratch tokenizer: no chat template
    assert encode_prompt(tokenizer, "abc", chat=AUTO) == tokenizer("abc", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="chat.template = 'on': the policy's tokenizer has no chat template"):
        encode_prompt(tokenizer, "abc", chat=ChatParams(template="on"))
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(DataError, match="a conversation of several turns"):
        encode_prompt(tokenizer, "c", chat=AUTO, messages=turns)


def test_conversations_keep_their_turns_and_own_system_prompt(chatml_dir):
    tokenizer = raw_tokenizer(chatml_dir)
    stored = json.dumps([{"role": "system", "content": "Terse."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "A long question"}])
    (ids,) = encode_prompts(tokenizer, ["A long"], chat=ChatParams(system_prompt="Be kind."), messages=[stored])
    assert tokenizer.decode(ids) == ("<|im_start|>system\nTerse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                     "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nA long<|im_end|>\n"
                                     "<|im_start|>assistant\n")  # the prompt (as prepare truncated it) is the last turn


def test_parse_conversation_drops_trailing_answers_and_refuses_what_is_not_one():
    whole = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert parse_conversation(whole, "row 0") == [{"role": "user", "content": "q"}]
    with pytest.raises(DataError, match="row 3: message 0 is not a {role, content} dict with role one of"):
        parse_conversation([{"role": "bot", "content": "q"}], "row 3")
    with pytest.raises(DataError, match="row 4: has no user turn to answer"):
        parse_conversation([{"role": "system", "content": "s"}], "row 4")
    with pytest.raises(DataError, match="row 5: is not a JSON list of messages"):
        parse_conversation("not json", "row 5")


def test_bos_is_put_first_once_when_the_tokenizer_wants_it(llama3_dir):
    tokenizer = raw_tokenizer(llama3_dir)
    bos = tokenizer.bos_token_id
    raw = encode_prompt(tokenizer, "The food was", chat=ChatParams(template="off"))
    assert raw[0] == bos and raw[1:] == tokenizer("The food was", add_special_tokens=False)["input_ids"]
    templated = encode_prompt(tokenizer, "The food was", chat=AUTO)  # the template writes BOS itself
    assert templated.count(bos) == 1 and templated[0] == bos
    assert tokenizer.decode(templated).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_every_end_id_is_collected(chatml_dir, llama3_dir):
    chatml = raw_tokenizer(chatml_dir)
    im_end, endoftext = chatml.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert checkpoint_stop_ids(chatml_dir, chatml) == [im_end, endoftext]  # the tokenizer's EOS first
    llama = raw_tokenizer(llama3_dir)
    eot, end_of_text = llama.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert checkpoint_stop_ids(llama3_dir, llama) == [eot, end_of_text]
    assert stop_token_ids(llama, 7, [eot, 9]) == [eot, 7, 9]


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_pad_becomes_a_spare_special_token_without_growing_the_vocabulary(style, chatml_dir, llama3_dir):
    """pad == eos (chatml) and no pad (llama3): pad becomes a reserved special token, distinct from every end id."""
    from rlhf_core.model.loading import load_tokenizer

    path = chatml_dir if style == "chatml" else llama3_dir
    stops = checkpoint_stop_ids(path, raw_tokenizer(path))
    tokenizer = load_tokenizer(str(path), eos_values=json.loads((path / "generation_config.json").read_text())[
        "eos_token_id"])
    assert len(tokenizer) == VOCAB
    assert tokenizer.pad_token == "<|reserved_special_token_0|>" and tokenizer.pad_token_id not in stops
    assert tokenizer.padding_side == "left"


def test_without_a_spare_token_a_pad_is_added_and_said(tmp_path):
    from rlhf_core.model.loading import PAD_TOKEN, load_tokenizer
    from rlhf_core.tooling.local_models import build_tokenizer

    texts = ["the food was good", "the service was slow"] * 20
    tokenizer = build_tokenizer("chatml", 300, texts, bpe_size=300, reserved=False)
    tokenizer.save_pretrained(tmp_path)
    said = []
    ends = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    loaded = load_tokenizer(str(tmp_path), eos_values=[ends], log=said.append)  # <|im_start|> is in the template
    assert loaded.pad_token == PAD_TOKEN and len(loaded) == len(tokenizer) + 1
    assert len(said) == 1 and f"added {PAD_TOKEN} (the embeddings grow by one row)" in said[0]


def test_generation_stops_at_any_end_id(chatml_dir):
    """A model that always says <|endoftext|> (the second end id): each response is that one token."""
    from rlhf_core.model.loading import load_causal_lm, load_tokenizer
    from rlhf_core.phases.rollout import generate_samples

    tokenizer = load_tokenizer(str(chatml_dir))
    stops = checkpoint_stop_ids(chatml_dir, tokenizer)
    model = load_causal_lm(str(chatml_dir), torch.device("cpu"))

    def always_endoftext(module, inputs, logits):
        logits = logits.clone()
        logits[..., stops[1]] += 100.0
        return logits

    model.lm_head.register_forward_hook(always_endoftext)
    prompts = encode_prompts(tokenizer, ["The food was", "Service"], chat=AUTO)
    common = dict(samples_per_prompt=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5, batch_size=4, seed=0,
                  device=torch.device("cpu"))
    samples = generate_samples(model, tokenizer, prompts, stop_ids=stops, **common)
    assert all(s.response_ids == [stops[1]] and s.ended_with_eos for s in samples)
    eos_only = generate_samples(model, tokenizer, prompts, **common)  # the tokenizer's EOS alone: never ends
    assert all(len(s.response_ids) == 5 and not s.ended_with_eos for s in eos_only)


def test_prompt_column_of_conversations(tmp_path):
    from rlhf_core.phases.data import prepare_prompts, prompt_column

    frame = pd.DataFrame({"messages": [
        [{"role": "user", "content": "Review the cafe"}, {"role": "assistant", "content": "Great"}],
        [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Review the cafe"}],
        [{"role": "user", "content": "Review the cafe"}],  # the same conversation as row 0 without its answer
        [{"role": "user", "content": "Review the bar"}],
    ]})
    records = prompt_column(frame, "messages", "prepare.path x")
    assert [r["prompt"] for r in records] == ["Review the cafe", "Review the cafe", "Review the cafe", "Review the bar"]
    sets = prepare_prompts(records, max_chars=200, too_long="drop", eval_fraction=0.3, seed=0)
    assert sets.stats["duplicates_removed"] == 1  # rows 0 and 2; row 1 differs by its system turn
    mixed = pd.DataFrame({"p": [[{"role": "user", "content": "a"}], "b"]})
    with pytest.raises(DataError, match="column 'p' row 1 is text while other rows are conversations"):
        prompt_column(mixed, "p", "prepare.path x")


def test_instruct_model_through_the_stages(tmp_path, chatml_dir, monkeypatch):
    """prepare (a messages column) → sft (snapshot) → rollout → score → advantages → optimize → evaluate on a
    ChatML model with pad == eos and two end ids: the snapshot keeps the vocabulary and the end ids, the
    policy sees the rendered template, scorers see the plain prompt, and the checkpoint loads with
    transformers.pipeline from another directory."""
    from rlhf_core.phases.tasks import sentiment
    from stages import advantages, optimize, prepare, rollout, score, sft

    work = tmp_path / "work"
    work.mkdir()
    messages = [[{"role": "user", "content": r["prompt"]}] for r in sentiment.prompts(40, seed=3)]
    pd.DataFrame({"messages": messages}).to_json(work / "chats.jsonl", orient="records", lines=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prepare"].update(source="file", path="chats.jsonl", prompt_field="messages")
    raw["chat"].update(system_prompt="You write restaurant reviews.")
    raw["sft"].update(model=str(chatml_dir), epochs=0, num_builtin_demonstrations=40)
    raw["rollout"].update(prompts_per_round=4, samples_per_prompt=2, max_new_tokens=6)
    raw["optim"].update(epochs=1, minibatch_size=8, micro_batch_size=4)
    raw["evaluate"].update(num_prompts=2, samples_per_prompt=1, max_new_tokens=6, num_perplexity_texts=4)
    raw["rounds"] = {"r1": {"from": "sft"}}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(work)
    params = load_params("params.yaml")
    no_round, round_one = argparse.Namespace(), argparse.Namespace(round="r1")

    prepare.main(params, no_round)
    sft.main(params, no_round)
    snapshot_config = json.loads((work / "models/sft/generation_config.json").read_text())
    tokenizer = raw_tokenizer(work / "models/sft")
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert snapshot_config["eos_token_id"] == stops and len(tokenizer) == VOCAB
    assert tokenizer.pad_token_id not in stops
    for stage in (rollout, score, advantages, optimize):
        stage.main(params, round_one)
    table = pd.read_parquet(work / "rollouts/r1/rollouts.parquet")
    first = table.iloc[0]
    assert "<|im_start|>" not in first["prompt"]  # scorers read the plain prompt
    assert tokenizer.decode(first["prompt_ids"]).startswith(
        "<|im_start|>system\nYou write restaurant reviews.<|im_end|>\n<|im_start|>user\n" + first["prompt"])
    ends = [ids[-1] for ids, ended in zip(table["response_ids"], table["ended_with_eos"]) if ended]
    assert all(end in stops for end in ends)
    evaluate_all(params)
    assert set(json.loads((work / "metrics/eval.json").read_text())) == {"sft", "r1"}

    from transformers import pipeline

    monkeypatch.chdir(tmp_path)
    generator = pipeline("text-generation", model=str(work / "models/r1"), device="cpu")
    out = generator([{"role": "user", "content": "The food was"}], max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
