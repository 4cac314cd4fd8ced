"""The hf_classifier scorer and the Bradley–Terry reward model, with tiny classifiers built locally."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_core.config import Params, RewardModelParams, ScorerParams, TinyModelParams, params_from_dict, replace
from rlhf_core.errors import DataError
from rlhf_core.phases.reward_model import (
    bradley_terry_loss,
    build_reward_model,
    classifier_scores,
    label_index,
    pair_accuracy,
    pair_texts,
    read_preferences,
    split_pairs,
    train_bradley_terry,
)
from rlhf_core.phases.rewards import score_responses, vader_scores
from rlhf_core.phases.tasks import sentiment

WORDS = ["the", "movie", "was", "great", "terrible", "fine", "pizza", "and", "really", "."]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEXTS = ["the movie was great", "the pizza was really terrible .", "fine", "the movie was fine and great ."]


def word_level_bert(path: Path, seed: int, num_labels: int = 3) -> Path:
    """A 1-layer BERT classifier with a whitespace WordLevel tokenizer ([CLS] x [SEP]): not the policy's BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(seed)
    labels = LABELS if num_labels == 3 else {0: "reward"}
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gpt2_without_pad(path: Path, tiny_checkpoint: Path) -> Path:
    """A one-output GPT-2 classifier whose tokenizer has EOS but no pad token (like the hub's gpt2)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.pad_token = None
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64, num_labels=1,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_by_one(path: Path, texts: list[str]) -> torch.Tensor:
    """Logits of each text scored alone (no padding at all): the reference for batched scoring."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    accepted = inspect.signature(model.forward).parameters
    with torch.no_grad():
        rows = []
        for text in texts:
            encoded = {k: v for k, v in tokenizer(text, return_tensors="pt").items() if k in accepted}
            rows.append(model(**encoded).logits[0])
    return torch.stack(rows)


def _scorer(**fields) -> ScorerParams:
    return replace(ScorerParams(), name="rm", kind="hf_classifier", **fields)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return word_level_bert(tmp_path_factory.mktemp("bert") / "clf", seed=0)


# -- scoring ----------------------------------------------------------------------------------------

def test_batched_scores_equal_each_text_scored_alone(bert):
    expected = one_by_one(bert, TEXTS)
    for label, column in (("positive", 2), ("0", 0)):
        scores, members = classifier_scores(TEXTS, _scorer(model=(str(bert),), label=label, batch_size=3),
                                            torch.device("cpu"))
        assert scores == pytest.approx(expected[:, column].tolist(), abs=1e-5)
        assert len(members) == 1
    probabilities, _ = classifier_scores(TEXTS, _scorer(model=(str(bert),), label="neutral", output="probability"),
                                         torch.device("cpu"))
    assert probabilities == pytest.approx(expected.softmax(-1)[:, 1].tolist(), abs=1e-5)


def test_classifier_without_pad_token_pads_with_eos(tmp_path, tiny_checkpoint):
    path = gpt2_without_pad(tmp_path / "gpt2", tiny_checkpoint)
    expected = one_by_one(path, TEXTS)[:, 0]
    scores, _ = classifier_scores(TEXTS, _scorer(model=(str(path),), batch_size=4), torch.device("cpu"))
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    probabilities, _ = classifier_scores(TEXTS, _scorer(model=(str(path),), output="probability"), torch.device("cpu"))
    assert probabilities == pytest.approx(torch.sigmoid(expected).tolist(), abs=1e-6)


def test_label_must_be_chosen_for_a_multi_label_model(bert):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(bert)
    with pytest.raises(DataError, match=r"3 outputs \(negative, neutral, positive\); set label"):
        label_index(config, "", "scorer rm")
    with pytest.raises(DataError, match="'happy' is not one of the model's labels"):
        label_index(config, "happy", "scorer rm")
    with pytest.raises(DataError, match="label 7 is out of range"):
        label_index(config, "7", "scorer rm")
    assert label_index(config, "positive", "x") == 2


def test_ensemble_mean_and_min_by_hand(tmp_path, bert):
    second = word_level_bert(tmp_path / "second", seed=1)
    first_scores = one_by_one(bert, TEXTS)[:, 2]
    second_scores = one_by_one(second, TEXTS)[:, 2]
    models = (str(bert), str(second))
    mean, members = classifier_scores(TEXTS, _scorer(model=models, label="positive"), torch.device("cpu"))
    low, _ = classifier_scores(TEXTS, _scorer(model=models, label="positive", ensemble="min"), torch.device("cpu"))
    assert members[0] == pytest.approx(first_scores.tolist(), abs=1e-5)
    assert members[1] == pytest.approx(second_scores.tolist(), abs=1e-5)
    assert mean == pytest.approx(((first_scores + second_scores) / 2).tolist(), abs=1e-5)
    assert low == pytest.approx(torch.minimum(first_scores, second_scores).tolist(), abs=1e-5)
    assert first_scores.tolist() != pytest.approx(second_scores.tolist(), abs=1e-3)  # the members disagree


def test_score_responses_reads_prompt_plus_response_and_keeps_member_columns(tmp_path, bert):
    second = word_level_bert(tmp_path / "second", seed=1)
    prompts, responses = ["the movie was", "the pizza was"], [" great", " really terrible ."]
    scorer = _scorer(model=(str(bert), str(second)), label="positive", ensemble="min", weight=2.0)
    columns, _ = score_responses([scorer], prompts=prompts, responses=responses, lengths=[1, 3], ended=[True, True],
                                 metadata=[{}, {}], missing_eos_penalty=0.0)
    full = [p + r for p, r in zip(prompts, responses)]
    expected = torch.minimum(one_by_one(bert, full)[:, 2], one_by_one(second, full)[:, 2])
    assert columns["rm"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert set(columns) == {"eos_penalty", "rm", "rm_member0", "rm_member1", "total"}
    assert columns["total"] == pytest.approx([2 * v for v in expected.tolist()], abs=1e-5)
    alone, _ = score_responses([replace(scorer, text="response")], prompts=prompts, responses=responses,
                               lengths=[1, 3], ended=[True, True], metadata=[{}, {}], missing_eos_penalty=0.0)
    expected_alone = torch.minimum(one_by_one(bert, responses)[:, 2], one_by_one(second, responses)[:, 2])
    assert alone["rm"] == pytest.approx(expected_alone.tolist(), abs=1e-5)


def test_a_checkpoint_without_a_trained_head_is_refused_unless_allowed(tmp_path, bert, tiny_checkpoint):
    """A sentence encoder (a BERT body saved without its classifier) or a plain causal LM loaded as a classifier
    gets a head that transformers initialises at random: a reward of noise.  Refused in one line naming the
    scorer and the model; allow_untrained_head: true accepts it; a trained classifier is accepted as before."""
    from transformers import AutoModel, AutoTokenizer

    encoder = tmp_path / "encoder"
    AutoModel.from_pretrained(bert).save_pretrained(encoder)  # BertModel: the body, no classifier weights
    AutoTokenizer.from_pretrained(bert).save_pretrained(encoder)
    for path, missing in ((encoder, "classifier.weight"), (tiny_checkpoint, "score.weight")):
        with pytest.raises(DataError) as info:
            classifier_scores(TEXTS, _scorer(model=(str(path),), label="0"), torch.device("cpu"))
        message = str(info.value)
        assert message.startswith(f"scorer rm: {str(path)!r} is not a trained classifier: its checkpoint lacks ")
        assert missing in message and message.endswith("set allow_untrained_head: true") and "\n" not in message
    scores, _ = classifier_scores(["the movie was great"], _scorer(model=(str(encoder),), label="0",
                                                                   allow_untrained_head=True), torch.device("cpu"))
    assert len(scores) == 1 and math.isfinite(scores[0])
    classifier_scores(TEXTS, _scorer(model=(str(bert),), label="positive"), torch.device("cpu"))  # trained: accepted
    assert params_from_dict({"score": {"scorers": [{"name": "rm", "kind": "hf_classifier", "model": ["x"],
                                                    "allow_untrained_head": True}]}}).score.scorers[0].allow_untrained_head


def test_missing_classifier_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^model .*nope.: no such directory \(a local path, so the Hub is not tried\)$"):
        classifier_scores(["x"], _scorer(model=(str(tmp_path / "nope"),)), torch.device("cpu"))


def test_hf_classifier_params_are_validated():
    with pytest.raises(Exception, match=r"score.scorers\[0\] \(rm\).model is empty"):
        params_from_dict({"score": {"scorers": [{"name": "rm", "kind": "hf_classifier"}]}})
    params = params_from_dict({"score": {"scorers": [
        {"name": "rm", "kind": "hf_classifier", "model": ["a", "b"], "ensemble": "min"}]}})
    assert params.score.scorers[0].model == ("a", "b")
    with pytest.raises(Exception, match=r"score.scorers\[0\].model\[0\] = 1: must be a string"):
        params_from_dict({"score": {"scorers": [{"name": "rm", "kind": "hf_classifier", "model": [1]}]}})


# -- Bradley–Terry ----------------------------------------------------------------------------------

def test_bradley_terry_loss_by_hand():
    # −(log σ(1) + log σ(0)) / 2 = (0.313262 + 0.693147) / 2
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2, abs=1e-6)


def test_builtin_sentiment_preferences_prefer_the_more_positive_response():
    rows = sentiment.preferences(300, seed=0)
    assert rows == sentiment.preferences(300, seed=0) and len(rows) == 300
    chosen = vader_scores([r["chosen"] for r in rows])
    rejected = vader_scores([r["rejected"] for r in rows])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(rows) > 0.9


def test_bradley_terry_reaches_090_heldout_pair_accuracy_on_builtin_preferences():
    tiny = TinyModelParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    spec = replace(RewardModelParams(), num_builtin_pairs=600, batch_size=32, lr=3e-3)
    torch.manual_seed(0)
    train_rows, heldout_rows = split_pairs(read_preferences(spec, "sentiment", seed=0), 0.2, seed=0)
    chosen, rejected = pair_texts(train_rows)
    model, tokenizer = build_reward_model(spec, tiny, chosen + rejected, torch.device("cpu"))
    assert len(tokenizer) == spec.reward_vocab_size  # its own tokenizer, not the policy's
    before = pair_accuracy(model, tokenizer, heldout_rows, spec.max_length)["pair_accuracy"]
    train_bradley_terry(model, tokenizer, train_rows, spec, seed=0, log=lambda *_: None)
    after = pair_accuracy(model, tokenizer, heldout_rows, spec.max_length)["pair_accuracy"]
    assert before < 0.75 and after >= 0.9, (before, after)


def test_reward_model_from_a_causal_lm_directory(tiny_checkpoint):
    """base: <directory of a causal LM> (as `sft` is): its backbone gains a fresh one-output head."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    spec = replace(RewardModelParams(), base=str(tiny_checkpoint))
    model, tokenizer = build_reward_model(spec, TinyModelParams(), [], torch.device("cpu"))
    assert isinstance(model, LlamaForSequenceClassification) and model.config.num_labels == 1
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tiny_checkpoint))  # the policy's own tokenizer
    assert tokenizer.padding_side == "right" and model.config.pad_token_id == tokenizer.pad_token_id
    rows = sentiment.preferences(40, seed=1)
    train_bradley_terry(model, tokenizer, rows, replace(spec, batch_size=8), seed=0, log=lambda *_: None)
    assert 0.0 <= pair_accuracy(model, tokenizer, rows, 48)["pair_accuracy"] <= 1.0


def test_preferences_from_a_file(tmp_path):
    import pandas as pd

    pd.DataFrame({"q": ["a", "b", "c"], "good": [" yes", " fine", " same"], "bad": [" no", " meh", " same"]}).to_csv(
        tmp_path / "pairs.csv", index=False)
    spec = replace(RewardModelParams(), preferences="file", path=str(tmp_path / "pairs.csv"), prompt_field="q",
                   chosen_field="good", rejected_field="bad")
    assert read_preferences(spec, "sentiment", 0) == [{"prompt": "a", "chosen": " yes", "rejected": " no"},
                                                      {"prompt": "b", "chosen": " fine", "rejected": " meh"}]
    with pytest.raises(DataError, match="no column 'chosen'"):
        read_preferences(replace(spec, chosen_field="chosen"), "sentiment", 0)


def test_train_reward_stage_writes_a_model_the_scorer_can_use(tmp_path, monkeypatch):
    from stages import train_reward

    raw = {"sft": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
           "reward_models": {"bt": {"num_builtin_pairs": 300, "lr": 3e-3}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = params_from_dict(raw)
    train_reward.main(params, argparse.Namespace(name="bt"))
    metrics = json.loads((tmp_path / "metrics/reward_models/bt.json").read_text())
    assert metrics["heldout_pairs"] == 30 and 0.0 <= metrics["heldout_pair_accuracy"] <= 1.0
    assert (tmp_path / "reward_models/bt/model.safetensors").is_file()
    scores, _ = classifier_scores(["The pizza was great and lovely.", "The pizza was awful and dreadful."],
                                  _scorer(model=("reward_models/bt",)), torch.device("cpu"))
    assert scores[0] > scores[1]
    with pytest.raises(Exception, match=r"--name 'nope': not in params reward_models \(bt\)"):
        train_reward.main(params, argparse.Namespace(name="nope"))


def test_reward_models_params_render_and_reload():
    from rlhf_core.config.rendering import render_params_yaml

    params = params_from_dict({"reward_models": {"bt": {"epochs": 3}}})
    assert params.reward_models["bt"].epochs == 3
    again = params_from_dict(yaml.safe_load(render_params_yaml(params)))
    assert again.reward_models == params.reward_models
    assert params_from_dict(yaml.safe_load(render_params_yaml(Params()))).reward_models == {}
    with pytest.raises(Exception, match=r"reward_models.bt.epochs = 0: must be >= 1"):
        params_from_dict({"reward_models": {"bt": {"epochs": 0}}})


def test_a_chat_reward_model_reads_the_conversation_through_its_own_template(tmp_path, bert):
    """text: conversation renders [user: prompt, assistant: response] with the reward model's chat template
    (what Skywork-style reward models read), and scores it as that token sequence, unpadded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rlhf_core.tooling.local_models import build_tokenizer

    texts = ["the food was great", "the service was slow and cold"] * 10
    tokenizer = build_tokenizer("chatml", 1024, texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1,
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "chat_rm")
    tokenizer.save_pretrained(tmp_path / "chat_rm")

    pairs = [("Review the cafe", "The food was great"), ("Review the bar", "Slow and cold")]
    scores, _ = classifier_scores([], _scorer(model=(str(tmp_path / "chat_rm"),), text="conversation", batch_size=2),
                                  torch.device("cpu"), pairs=pairs)
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "chat_rm").eval()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "chat_rm")
    for (prompt, response), score in zip(pairs, scores):
        text = loaded.apply_chat_template([{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": response}], tokenize=False)
        assert text.startswith("<|im_start|>user\n" + prompt) and text.endswith(response + "<|im_end|>\n")
        ids = loaded(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert score == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    with pytest.raises(DataError, match=r"^scorer rm \(.*\): text = 'conversation' needs a reward model whose "
                                        "tokenizer has a chat template"):
        classifier_scores([], _scorer(model=(str(bert),), label="positive", text="conversation"), torch.device("cpu"),
                          pairs=pairs)
