"""Unit tests of rlhf_core.phases.data and the built-in sentiment task."""

from __future__ import annotations

import collections
import json

import pandas as pd
import pytest

from rlhf_core.errors import ConfigError, DataError
from rlhf_core.io import read_hf_dataset, read_table_file, text_column
from rlhf_core.phases.data import prepare_prompts, split_heldout
from rlhf_core.phases.tasks import get_task, sentiment


def _records(n):
    return [{"prompt": f"prompt number {i}"} for i in range(n)]


# -- prepare_prompts --------------------------------------------------------------------------------

def test_dedup_first_occurrence_wins_and_is_counted():
    records = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": " a ", "answer": "3"},
               {"prompt": "a", "answer": "4"}, {"prompt": "   ", "answer": "5"}, {"prompt": "c", "answer": "6"}]
    sets = prepare_prompts(records, max_chars=100, too_long="drop", eval_fraction=0.34, seed=0)
    both = pd.concat([sets.train, sets.eval])
    assert sorted(both["prompt"]) == ["a", "b", "c"]
    assert dict(zip(both["prompt"], both["answer"])) == {"a": "1", "b": "2", "c": "6"}
    assert sets.stats["prompts_read"] == 6
    assert sets.stats["duplicates_removed"] == 2
    assert sets.stats["empty_dropped"] == 1
    assert sets.stats["too_long"] == 0
    assert sets.stats["train_prompts"] + sets.stats["eval_prompts"] == 3
    assert sets.stats["train_prompts"] == len(sets.train) and sets.stats["eval_prompts"] == len(sets.eval)


def test_long_prompts_dropped():
    records = [{"prompt": "short one"}, {"prompt": "x" * 11}, {"prompt": "short two"}, {"prompt": "y" * 30},
               {"prompt": "exactly10!"}]
    sets = prepare_prompts(records, max_chars=10, too_long="drop", eval_fraction=0.3, seed=0)
    prompts = sorted(pd.concat([sets.train, sets.eval])["prompt"])
    assert prompts == ["exactly10!", "short one", "short two"]
    assert sets.stats["too_long"] == 2
    assert sets.stats["too_long_action"] == "drop"
    assert sets.stats["train_prompts"] + sets.stats["eval_prompts"] == 3
    # every prompt read is accounted for
    assert sets.stats["prompts_read"] == 5 == sets.stats["empty_dropped"] + sets.stats["duplicates_removed"] + \
        sets.stats["too_long"] + sets.stats["train_prompts"] + sets.stats["eval_prompts"]


def test_long_prompts_truncated():
    records = [{"prompt": "short one"}, {"prompt": "abcdefghijKLM"}, {"prompt": "y" * 30}]
    sets = prepare_prompts(records, max_chars=10, too_long="truncate", eval_fraction=0.3, seed=0)
    prompts = sorted(pd.concat([sets.train, sets.eval])["prompt"])
    assert prompts == ["abcdefghij", "short one", "y" * 10]
    assert sets.stats["too_long"] == 2
    assert sets.stats["too_long_action"] == "truncate"
    assert sets.stats["train_prompts"] + sets.stats["eval_prompts"] == 3


def test_truncation_duplicates_keep_the_first_record():
    # Two prompts that become equal after truncation: the first occurrence must win, as for plain duplicates.
    records = [{"prompt": "same start AAA", "answer": "first"}, {"prompt": "other", "answer": "o"},
               {"prompt": "same start BBB", "answer": "second"}]
    sets = prepare_prompts(records, max_chars=10, too_long="truncate", eval_fraction=0.4, seed=0)
    both = pd.concat([sets.train, sets.eval])
    assert sorted(both["prompt"]) == ["other", "same start"]
    assert dict(zip(both["prompt"], both["answer"]))["same start"] == "first"


def test_truncation_duplicates_are_counted_in_stats():
    # Every prompt read is accounted for: read = empty + duplicates + kept (truncated prompts are kept).
    records = [{"prompt": "same start AAA"}, {"prompt": "other"}, {"prompt": "same start BBB"}]
    sets = prepare_prompts(records, max_chars=10, too_long="truncate", eval_fraction=0.4, seed=0)
    stats = sets.stats
    assert stats["train_prompts"] + stats["eval_prompts"] == 2
    assert stats["prompts_read"] == stats["empty_dropped"] + stats["duplicates_removed"] + \
        stats["train_prompts"] + stats["eval_prompts"]


def test_split_sizes_and_disjointness():
    sets = prepare_prompts(_records(50), max_chars=100, too_long="drop", eval_fraction=0.2, seed=3)
    assert len(sets.eval) == 10 and len(sets.train) == 40
    train, held = set(sets.train["prompt"]), set(sets.eval["prompt"])
    assert not train & held
    assert train | held == {r["prompt"] for r in _records(50)}
    assert list(sets.train.columns) == ["prompt"]


@pytest.mark.parametrize("n, fraction, n_eval", [(2, 0.01, 1), (3, 0.99, 2), (10, 0.25, 2), (10, 0.26, 3)])
def test_split_sizes_are_clamped_and_rounded(n, fraction, n_eval):
    sets = prepare_prompts(_records(n), max_chars=100, too_long="drop", eval_fraction=fraction, seed=0)
    assert len(sets.eval) == n_eval and len(sets.train) == n - n_eval


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    def split(seed):
        sets = prepare_prompts(_records(40), max_chars=100, too_long="drop", eval_fraction=0.25, seed=seed)
        return list(sets.train["prompt"]), list(sets.eval["prompt"])

    assert split(5) == split(5)
    assert split(5) != split(6)
    assert set(split(5)[1]) != set(split(6)[1])


@pytest.mark.parametrize("records", [
    [{"prompt": "only one"}],
    [{"prompt": "dup"}, {"prompt": "dup"}, {"prompt": "  "}],
    [{"prompt": "x" * 50}, {"prompt": "ok"}],
    [],
])
def test_too_few_prompts_raises(records):
    with pytest.raises(DataError, match="need at least 2"):
        prepare_prompts(records, max_chars=10, too_long="drop", eval_fraction=0.5, seed=0)


# -- tables -----------------------------------------------------------------------------------------

EXPECTED = pd.DataFrame({"prompt": ["Hello there", "NA"], "answer": ["1", "2"]})


def test_read_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in EXPECTED.to_dict("records")) + "\n")
    frame = read_table_file(path)
    assert frame["prompt"].tolist() == ["Hello there", "NA"]
    assert text_column(frame, "prompt", "here") == ["Hello there", "NA"]


def test_read_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(EXPECTED.to_dict("records")))
    assert read_table_file(path)["prompt"].tolist() == ["Hello there", "NA"]


def test_read_csv_keeps_na_text(tmp_path):
    path = tmp_path / "p.csv"
    EXPECTED.to_csv(path, index=False)
    frame = read_table_file(path)
    assert frame["prompt"].tolist() == ["Hello there", "NA"]  # "NA" stays text, not NaN
    assert text_column(frame, "prompt", "here") == ["Hello there", "NA"]


def test_read_parquet_table(tmp_path):
    path = tmp_path / "p.parquet"
    EXPECTED.to_parquet(path, index=False)
    pd.testing.assert_frame_equal(read_table_file(path), EXPECTED)


def test_read_table_upper_case_suffix(tmp_path):
    path = tmp_path / "p.CSV"
    EXPECTED.to_csv(path, index=False)
    assert read_table_file(path)["prompt"].tolist() == ["Hello there", "NA"]


def test_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as info:
        read_table_file(path)
    assert "'.txt'" in str(info.value) and str(path) in str(info.value)


def test_missing_file_raises(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError) as info:
        read_table_file(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_malformed_jsonl_raises_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json}\n")
    with pytest.raises(DataError, match="cannot be read as jsonl"):
        read_table_file(path)


def test_text_column_missing_column_names_it():
    frame = pd.DataFrame({"text": ["a"], "label": [1]})
    with pytest.raises(DataError) as info:
        text_column(frame, "prompt", "prepare.path x.csv")
    message = str(info.value)
    assert "'prompt'" in message and "prepare.path x.csv" in message and "text, label" in message


def test_text_column_non_text_value_raises():
    frame = pd.DataFrame({"prompt": ["a", None, "c"]})
    with pytest.raises(DataError, match="row 1"):
        text_column(frame, "prompt", "here")


def test_read_hf_dataset_from_saved_directory(tmp_path):
    import datasets

    directory = tmp_path / "ds"
    datasets.Dataset.from_dict({"prompt": ["p1", "p2", "p3"], "answer": ["a", "b", "c"]}).save_to_disk(str(directory))
    frame = read_hf_dataset(str(directory), "", "train")
    assert frame["prompt"].tolist() == ["p1", "p2", "p3"]
    assert frame["answer"].tolist() == ["a", "b", "c"]
    assert text_column(frame, "prompt", "hf") == ["p1", "p2", "p3"]


def test_read_hf_dataset_unloadable_raises_data_error(tmp_path):
    missing = tmp_path / "no-such-dataset-dir"
    missing.mkdir()
    with pytest.raises(DataError) as info:
        read_hf_dataset(str(missing), "", "train")
    message = str(info.value)
    assert str(missing) in message and "\n" not in message


# -- sentiment task ---------------------------------------------------------------------------------

def test_get_task():
    assert get_task("sentiment") is sentiment
    with pytest.raises(ConfigError, match="task = .math.: not a built-in task"):
        get_task("math")


def test_sentiment_prompts_are_deterministic_per_seed():
    first = [record["prompt"] for record in sentiment.prompts(60, seed=3)]
    assert len(first) == 60 and all(isinstance(p, str) and p for p in first)
    assert first == [record["prompt"] for record in sentiment.prompts(60, seed=3)]
    assert first != [record["prompt"] for record in sentiment.prompts(60, seed=4)]
    assert all(p.split()[-1] in sentiment.VERBS for p in first)


def test_sentiment_demonstrations_are_deterministic_with_equal_label_shares():
    rows = sentiment.demonstrations(30, seed=1)
    assert rows == sentiment.demonstrations(30, seed=1)
    assert rows != sentiment.demonstrations(30, seed=2)
    assert collections.Counter(r["label"] for r in rows) == {"positive": 10, "negative": 10, "neutral": 10}
    for row in rows:
        assert set(row) == {"prompt", "response", "label"}
        assert row["response"].startswith(" ")
        tails = {"positive": sentiment.POSITIVE_TAILS, "negative": sentiment.NEGATIVE_TAILS,
                 "neutral": sentiment.NEUTRAL_TAILS}[row["label"]]
        assert any(row["response"].endswith(tail) for tail in tails)
    # the labels are shuffled, not in blocks
    assert [r["label"] for r in rows] != [sentiment.LABELS[i % 3] for i in range(30)]


# -- split_heldout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, fraction, n_heldout", [(20, 0.1, 2), (100, 0.05, 5), (2, 0.01, 1), (3, 0.9, 2)])
def test_split_heldout_sizes(n, fraction, n_heldout):
    rows = [{"i": i} for i in range(n)]
    train, heldout = split_heldout(rows, fraction, seed=0)
    assert len(heldout) == n_heldout and len(train) == n - n_heldout
    assert sorted(r["i"] for r in train + heldout) == list(range(n))


def test_split_heldout_is_seeded():
    rows = [{"i": i} for i in range(50)]
    assert split_heldout(rows, 0.2, seed=1) == split_heldout(rows, 0.2, seed=1)
    assert split_heldout(rows, 0.2, seed=1) != split_heldout(rows, 0.2, seed=2)


def test_truncation_cuts_at_a_word_boundary():
    from rlhf_core.phases.data import truncate_text

    assert truncate_text("I loved this movie so much", 10) == "I loved"
    assert truncate_text("same start AAA", 10) == "same start"
    assert truncate_text("abcdefghijKLM", 10) == "abcdefghij"
    assert truncate_text("short", 10) == "short"


def test_plain_text_demonstrations_split_into_prompt_and_response(tmp_path):
    from rlhf_core.config import Params, SFTParams, replace
    from rlhf_core.phases.data import read_demonstrations

    pd.DataFrame({"text": ["This film was a total joy from start to end.", "Bad.", "Dull plot, weak cast, long."]}).to_csv(
        tmp_path / "reviews.csv", index=False)
    sft = replace(SFTParams(), demonstrations="file", demo_path=str(tmp_path / "reviews.csv"), demo_prompt_field="",
                  demo_response_field="text", demo_prompt_chars=12)
    rows = read_demonstrations(replace(Params(), sft=sft))
    # "Bad." fits entirely in the prompt and leaves no response: dropped.
    assert rows == [{"prompt": "This film", "response": " was a total joy from start to end."},
                    {"prompt": "Dull plot,", "response": " weak cast, long."}]
