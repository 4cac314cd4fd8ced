"""The built-in "calculator" task: products the tiny model cannot compute, and a calculator tool it can call.

Prompts are ``"What is 47 * 8?"``: a two-digit number times a one-digit one (10..99 × 3..9, 630 problems), with
the product as the record's ``answer``.  The policy runs in the built-in calculator environment
(``rlhf_core.phases.environments.Calculator``, ``environment.kind: auto`` selects it for this task): it may call
``calculator`` in the Hermes/Qwen format, ``<tool_call>{"name": "calculator", "arguments": {"expression":
"47 * 8"}}</tool_call>``, read the result, and answer.  The reward is exact match of its final answer.

Demonstrations are whole episodes (``messages``), and only some use the tool: with probability ``TOOL_FRACTION``
the demonstrator calls the calculator and copies its result; otherwise it answers at once from mental arithmetic,
right only ``GUESS_RIGHT`` of the time (else off by a plausible slip, ``slips``).  So the SFT snapshot knows the
tool-call format but calls it on about half of the questions, and its exact match is low; RL towards the
exact-match reward has room to make it call the tool every time and copy the result.

The from-scratch model gets a small ChatML template that renders the tools (``CHAT_TEMPLATE``): the names of the
functions on the system turn, so that a tool call costs few tokens of the tiny model's 128-token context.
Everything is drawn from a seeded ``random.Random``, so the same seed always gives the same corpus.
"""

from __future__ import annotations

import json
import random

HAS_ANSWERS = True
TOOL_FRACTION = 0.5  # share of demonstrations that call the calculator
GUESS_RIGHT = 0.1  # share of the demonstrator's direct answers that are right
# the calculator tool as the environment offers it (phases.environments.Calculator.tools), a JSON-schema function
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression of integers with + - * and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
PROBLEMS = tuple((a, b) for a in range(10, 100) for b in range(3, 10))

# ChatML; with tools, the first turn lists the functions' names: "<|im_start|>user\n[calculator] What is ...".
# It only appends: earlier turns render the same once later ones follow (what episodes need).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if loop.first and tools %}{% for tool in tools %}{{ '[' + tool['function']['name'] + '] ' }}{% endfor %}"
    "{% endif %}{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
END_OF_TURN = "<|im_end|>"
ADDED_TOKENS = ("<tool_call>", "</tool_call>")  # whole tokens, not special (as in Qwen2.5's vocabulary)
SPLIT_DIGITS = True  # one token per digit (as Qwen2.5 splits them): numbers are copied digit by digit


def question(a: int, b: int) -> str:
    return f"What is {a} * {b}?"


def tool_call(expression: str) -> str:
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + "</tool_call>"


def slips(a: int, b: int) -> list[int]:
    """Plausible wrong products: off by one in a factor (a·(b±1), (a±1)·b) or by ten."""
    right = a * b
    return [value for value in (right - a, right + a, right - b, right + b, right - 10, right + 10) if value > 0]


def prompts(count: int, seed: int) -> list[dict]:
    """``count`` records ``{"prompt": "What is 47 * 8?", "answer": "376"}`` (duplicates possible)."""
    rng = random.Random(f"calculator-prompts-{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.choice(PROBLEMS)
        rows.append({"prompt": question(a, b), "answer": str(a * b)})
    return rows


def demonstrations(count: int, seed: int) -> list[dict]:
    """``count`` episodes: (prompt, response: the final answer, messages: the conversation as JSON, tools: the
    calculator's function spec as JSON, answer, used_tool); see the module's docstring for the mix."""
    rng = random.Random(f"calculator-demos-{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.choice(PROBLEMS)
        opening = [{"role": "user", "content": question(a, b)}]  # as Calculator().reset writes it: no system turn
        used_tool = rng.random() < TOOL_FRACTION
        if used_tool:
            final = str(a * b)
            turns = [{"role": "assistant", "content": tool_call(f"{a} * {b}")}, {"role": "tool", "content": final},
                     {"role": "assistant", "content": final}]
        else:
            final = str(a * b if rng.random() < GUESS_RIGHT else rng.choice(slips(a, b)))
            turns = [{"role": "assistant", "content": final}]
        rows.append({"prompt": question(a, b), "response": final, "messages": json.dumps(opening + turns),
                     "tools": json.dumps([CALCULATOR_TOOL]), "answer": str(a * b), "used_tool": used_tool})
    return rows


def preferences(count: int, seed: int) -> list[dict]:
    """``count`` (prompt, chosen, rejected) pairs of final answers: the right product chosen, a slip rejected."""
    rng = random.Random(f"calculator-preferences-{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.choice(PROBLEMS)
        rows.append({"prompt": question(a, b), "chosen": str(a * b), "rejected": str(rng.choice(slips(a, b)))})
    return rows


def reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """Exact match of the final answer: 1.0 if ``response.strip() == answer``, else 0.0."""
    from rlhf_core.phases.tasks.arithmetic import exact_match_reward

    return exact_match_reward("calculator", responses, metadata)
