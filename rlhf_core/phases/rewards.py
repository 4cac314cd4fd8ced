"""Reward scoring: the components of each response's reward, their normalisation, and the total.

Every scorer in ``score.scorers`` yields one raw value per response.  Each component is then
normalised (none; whitening over the round; or a running mean/std carried across rounds), clipped
to [−clip, clip] if asked, and weighted:

    total_i = Σ_k weight_k · clip(normalise_k(component_k,i)) − missing_eos_penalty · [no EOS in i]

Scorers (only hf_classifier needs torch and transformers, and imports them only when used):
    task        the built-in task's own reward (rlhf_core.phases.tasks: sentiment → VADER, arithmetic → exact match)
    vader       VADER's compound sentiment score of the response, in [−1, 1]
    length      −|tokens − target_length| / target_length   (0 at the target, lower either side)
    overlong    DAPO's soft overlong penalty: 0 up to max_new_tokens − buffer, then down linearly to −1 at the limit
    verifiable  1 if the response matches the prompt's reference answer (exact, numeric or regex), else 0
    python      a user function ``module:function`` called as f(prompts, responses, metadata)
    hf_classifier  an AutoModelForSequenceClassification (a reward model) reading prompt + response with
                its own tokenizer; several models form an ensemble (mean or min)
    environment the episode's score by its environment (multi-turn rollouts: environment.kind)

Any raw value that is NaN or inf, a wrong count, or a scorer that raises stops the stage with the
scorer's name and the offending row.
"""

from __future__ import annotations

import math

from rlhf_core.errors import DataError
from rlhf_core.phases.scoring import length_scores, overlong_scores, vader_scores, verifiable_scores  # noqa: F401  (the built-in scorers)
from rlhf_core.phases.user_code import import_attribute


def python_scores(function: str, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """Call the user function ``module:function`` (importable from the repo root or the environment)."""
    scorer = import_attribute(function, "python scorer", "function")
    return list(scorer(prompts, responses, metadata))


def reward_components(columns, scorers, missing_eos_penalty: float) -> tuple[list[list[float]], list[float]]:
    """The components the total is made of, as [B, K] rows, and their weights: every scorer with a weight (weight 0
    only monitors) as its raw column of the scores table (``columns``: name → values), and, when there is one, the
    EOS penalty as its 0/−1 indicator weighted by missing_eos_penalty.  GDPO normalises each component within its
    group, which erases a component's scale, so a penalty's size has to live in its weight."""
    names = [scorer.name for scorer in scorers if scorer.weight != 0]
    weights = [scorer.weight for scorer in scorers if scorer.weight != 0]
    values = [list(columns[name]) for name in names]
    if missing_eos_penalty > 0:
        values.append([value / missing_eos_penalty for value in columns["eos_penalty"]])
        weights.append(missing_eos_penalty)
    return [list(row) for row in zip(*values)], weights


def missing_eos_penalties(ended_with_eos: list[bool], penalty: float) -> list[float]:
    """−penalty for each response that ran out of tokens before EOS, 0 otherwise."""
    return [0.0 if ended else -penalty for ended in ended_with_eos]


def merge_running(state: dict | None, values: list[float]) -> dict:
    """Running count/mean/M2 (Chan et al. parallel update) after adding ``values`` to ``state``.

        n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n
    """
    count_b = len(values)
    mean_b = sum(values) / count_b
    m2_b = sum((v - mean_b) ** 2 for v in values)
    if not state or state.get("count", 0) == 0:
        return {"count": count_b, "mean": mean_b, "m2": m2_b}
    count_a, mean_a, m2_a = state["count"], state["mean"], state["m2"]
    count = count_a + count_b
    delta = mean_b - mean_a
    return {"count": count, "mean": mean_a + delta * count_b / count,
            "m2": m2_a + m2_b + delta ** 2 * count_a * count_b / count}


def normalise(values: list[float], mode: str, state: dict | None, eps: float = 1e-8) -> tuple[list[float], dict | None]:
    """(x − μ) / sqrt(σ² + eps) with μ, σ² of this batch (batch) or of all rounds so far (running).

    Returns the normalised values and the new running state (None unless mode is running).
    """
    if mode == "none":
        return list(values), None
    if mode == "batch":
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        return [(v - mean) / math.sqrt(var + eps) for v in values], None
    new_state = merge_running(state, values)
    var = new_state["m2"] / new_state["count"]
    return [(v - new_state["mean"]) / math.sqrt(var + eps) for v in values], new_state


def hf_classifier_scores(scorer, prompts, responses, cpu_threads: int, trust_remote_code: bool
                         ) -> tuple[list[float], dict[str, list[float]]]:
    """The classifier (or ensemble) score of each text, and each member's column when there are several."""
    from rlhf_core.model.device import resolve_device
    from rlhf_core.phases.reward_model import classifier_scores

    texts = [p + r for p, r in zip(prompts, responses)] if scorer.text == "prompt_and_response" else list(responses)
    combined, members = classifier_scores(texts, scorer, resolve_device(scorer.device, cpu_threads), trust_remote_code,
                                          pairs=list(zip(prompts, responses)))
    extra = {f"{scorer.name}_member{k}": values for k, values in enumerate(members)} if len(members) > 1 else {}
    return combined, extra


def raw_component(scorer, prompts, responses, lengths, ended, metadata, task: str, cpu_threads: int = 1,
                  trust_remote_code: bool = False, max_new_tokens: int | None = None
                  ) -> tuple[list[float], dict[str, list[float]]]:
    """One scorer's raw value per response, and any extra columns it reports (ensemble members).
    ``max_new_tokens``: the length limit the responses were generated under (the overlong scorer's L_max)."""
    if scorer.kind == "task":
        from rlhf_core.phases.tasks import get_task

        return get_task(task).reward(prompts, responses, metadata), {}
    if scorer.kind == "vader":
        return vader_scores(responses), {}
    if scorer.kind == "length":
        return length_scores(lengths, scorer.target_length), {}
    if scorer.kind == "overlong":
        if max_new_tokens is None:
            raise ValueError(f"scorer {scorer.name}: the overlong penalty needs the generation's max_new_tokens")
        return overlong_scores(lengths, max_new_tokens, scorer.buffer), {}
    if scorer.kind == "verifiable":
        answers = [m.get("answer") for m in metadata]
        if any(a is None for a in answers):
            raise DataError(f"scorer {scorer.name}: the prompts have no reference answers (prepare.answer_field)")
        return verifiable_scores(responses, answers, scorer.match, scorer.tolerance), {}
    if scorer.kind == "hf_classifier":
        return hf_classifier_scores(scorer, prompts, responses, cpu_threads, trust_remote_code)
    if scorer.kind == "environment":
        if any("episode_reward" not in m for m in metadata):
            raise DataError(f"scorer {scorer.name}: the responses are not episodes (no environment ran them); "
                            "re-run the rollout with environment.kind set")
        return [float(m["episode_reward"]) for m in metadata], {}
    return python_scores(scorer.function, prompts, responses, metadata), {}


def row_metadata(table) -> list[dict]:
    """What scorers get beside each prompt and response, from a rollout table's columns: the reference ``answer``
    where the prompts have one, and for episodes the conversation (``messages``, a list of role/content dicts) and
    the environment's score (``episode_reward``, the ``environment`` scorer's value)."""
    import json

    rows = [{} for _ in range(len(table))]
    for column in ("answer", "messages", "episode_reward"):
        if column in table:
            for row, value in zip(rows, table[column].tolist()):
                row[column] = json.loads(value) if column == "messages" else value
    return rows


def is_real_number(value) -> bool:
    """An int or float (numpy's and torch's scalars included), not a bool or a string."""
    import numbers

    if isinstance(value, (bool, str, bytes)) or type(value).__name__ == "bool_":
        return False
    if isinstance(value, numbers.Real):
        return True
    return type(value).__module__ == "torch" and getattr(value, "ndim", None) == 0 and value.is_floating_point()


def score_responses(scorers, *, prompts: list[str], responses: list[str], lengths: list[int], ended: list[bool],
                    metadata: list[dict], missing_eos_penalty: float, task: str = "sentiment", state: dict | None = None,
                    cpu_threads: int = 1, trust_remote_code: bool = False, max_new_tokens: int | None = None,
                    where: str = "", normalise_components: bool = True) -> tuple[dict[str, list[float]], dict]:
    """Every component (raw, and normalised where asked), the EOS penalty and the total.  ``max_new_tokens``: the
    length limit of the generation (rollout's or evaluate's), for the overlong scorer.

    ``state`` holds each running normaliser ({name: {count, mean, m2}}); the updated state is
    returned for the next round.  With ``normalise_components=False`` (evaluation) the total is the
    weighted sum of the raw components, clipped.
    """
    state = dict(state or {})
    where = f"{where}: " if where else ""  # the stage's own error prefix already names stage and round
    columns: dict[str, list[float]] = {}
    total = missing_eos_penalties(ended, missing_eos_penalty)
    columns["eos_penalty"] = list(total)
    for scorer in scorers:
        try:
            raw, extra = raw_component(scorer, prompts, responses, lengths, ended, metadata, task, cpu_threads,
                                       trust_remote_code, max_new_tokens)
            raw = list(raw)
        except DataError:
            raise
        except Exception as exc:  # a user's scorer may raise anything; report it as data, in one line
            raise DataError(f"{where}scorer {scorer.name} raised {type(exc).__name__}: {exc}") from None
        if len(raw) != len(responses):
            raise DataError(f"{where}scorer {scorer.name} returned {len(raw)} values for {len(responses)} responses")
        for row, value in enumerate(raw):
            if not is_real_number(value):  # "0.5" or True would be read as a number and train on nothing
                raise DataError(f"{where}scorer {scorer.name} returned {value!r} ({type(value).__name__}) for row {row}; "
                                "a scorer returns one int or float per response")
        raw = [float(value) for value in raw]
        for row, value in enumerate(raw):
            if not math.isfinite(value):
                raise DataError(f"{where}scorer {scorer.name} returned {value} for row {row} ({responses[row][:60]!r})")
        columns[scorer.name] = raw
        columns.update(extra)
        values = raw
        if normalise_components and scorer.normalize != "none":
            values, running = normalise(raw, scorer.normalize, state.get(scorer.name))
            if running is not None:
                state[scorer.name] = running
            columns[f"{scorer.name}_normalized"] = values
        if scorer.clip is not None:
            values = [min(max(v, -scorer.clip), scorer.clip) for v in values]
        total = [t + scorer.weight * v for t, v in zip(total, values)]
    columns["total"] = total
    return columns, state
