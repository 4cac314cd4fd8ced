"""Environments for multi-turn rollouts: the interface, the checks that turn a broken one into one line, and
the built-in calculator.

An environment is any object with these four members (OpenEnv and verifiers have the same shape):

    reset(prompt_row: dict) -> list[dict]
        the conversation before the first policy turn: chat messages {"role": ..., "content": str}
        (a system prompt, the user's question); ``prompt_row`` is the prompt table's row.
    step(assistant_message: dict) -> (messages, reward, done) or (messages, reward, done, info)
        the environment's answer to one policy turn {"role": "assistant", "content": str}: the new messages
        (tool results as {"role": "tool", ...}, a user's reply), a float reward for the turn or None, whether
        the episode is over, and optionally ``info`` with the counts ``tool_calls`` and ``parse_errors``.
    tools: list[dict] | None
        JSON-schema function specs, rendered by the tokenizer's chat template (``apply_chat_template(tools=...)``).
    score(episode: dict) -> float
        the episode's final reward; ``episode`` has "messages" (the whole conversation), "turns",
        "tool_calls", "parse_errors", "turn_rewards" and "limit" (None, or the limit that ended it).

Nothing else of the library is visible to it: it never sees token ids (rlhf_core.phases.episodes owns them).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re

from rlhf_core.errors import DataError
from rlhf_core.phases.tasks.calculator import CALCULATOR_TOOL
from rlhf_core.phases.user_code import import_attribute

ROLES = ("system", "user", "assistant", "tool")


def _where(environment) -> str:
    return f"environment {type(environment).__name__}"


def check_messages(value, where: str) -> list[dict]:
    """A list of {"role": one of ROLES, "content": str} messages, or one line naming what is wrong."""
    if not isinstance(value, list):
        raise DataError(f"{where}: must return a list of messages, got {type(value).__name__}")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise DataError(f"{where}: message {index} must be a dict with role in {', '.join(ROLES)} and a string "
                            f"content, got {message!r:.120}")
    return value


def reset(environment, prompt_row: dict) -> list[dict]:
    """``environment.reset``, checked: an exception or a wrong type is one line."""
    where = f"{_where(environment)}.reset"
    try:
        messages = environment.reset(prompt_row)
    except Exception as exc:  # the user's code: any error is theirs, reported in one line
        raise DataError(f"{where} raised {type(exc).__name__}: {exc}") from None
    if not check_messages(messages, where):
        raise DataError(f"{where}: returned no message; the policy needs a conversation to answer")
    return messages


def step(environment, assistant_message: dict) -> tuple[list[dict], float | None, bool, dict]:
    """``environment.step``, checked: (new messages, reward or None, done, info with int counts)."""
    where = f"{_where(environment)}.step"
    try:
        result = environment.step(assistant_message)
    except Exception as exc:
        raise DataError(f"{where} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(result, tuple) or len(result) not in (3, 4):
        raise DataError(f"{where}: must return (messages, reward, done) or (messages, reward, done, info), got "
                        f"{result!r:.120}")
    messages, reward, done, info = (*result, {}) if len(result) == 3 else result
    check_messages(messages, where)
    if reward is not None and (not isinstance(reward, (int, float)) or isinstance(reward, bool)
                               or not math.isfinite(reward)):
        raise DataError(f"{where}: the reward must be a finite number or None, got {reward!r}")
    if not isinstance(done, bool):
        raise DataError(f"{where}: done must be true or false, got {done!r}")
    if not isinstance(info, dict) or any(not isinstance(info.get(k, 0), int) for k in ("tool_calls", "parse_errors")):
        raise DataError(f"{where}: info must be a dict whose tool_calls and parse_errors are integers, got {info!r:.120}")
    if not done and not messages:
        raise DataError(f"{where}: the episode goes on (done is false) but no new message came back for the policy")
    return messages, None if reward is None else float(reward), done, info


def score(environment, episode: dict) -> float:
    where = f"{_where(environment)}.score"
    try:
        value = environment.score(episode)
    except Exception as exc:
        raise DataError(f"{where} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise DataError(f"{where}: must return a finite number, got {value!r}")
    return float(value)


def tools_of(environment) -> list[dict] | None:
    tools = getattr(environment, "tools", None)
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{_where(environment)}.tools: must be a list of JSON-schema function specs or None")
    return tools or None


def load_environment_class(spec: str):
    """``module:Class`` (importable from the repository root or the environment), or one line saying why not."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise DataError(f"environment {spec!r}: must be module:Class")
    return import_attribute(spec, "environment", "class")


# ---------------------------------------------------------------------------------------------------
# The built-in calculator environment

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate_arithmetic(expression: str) -> int:
    """An integer expression of + - * and parentheses, evaluated without eval; ValueError for anything else."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not integer arithmetic: {expression!r}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an expression: {expression!r}") from None
    return value(tree.body)


def parse_tool_calls(content: str) -> tuple[list[str], int]:
    """The calculator expressions of the ``<tool_call>{"name": "calculator", "arguments": {...}}</tool_call>``
    blocks in ``content`` (the Hermes / Qwen format), and how many blocks did not parse."""
    expressions, errors = [], 0
    for block in TOOL_CALL.findall(content):
        try:
            call = json.loads(block)
            if call.get("name") != "calculator" or not isinstance(call["arguments"]["expression"], str):
                raise ValueError(call)
            expressions.append(call["arguments"]["expression"])
        except (ValueError, KeyError, TypeError, AttributeError):
            errors += 1
    if "<tool_call>" in content and content.count("<tool_call>") > len(expressions) + errors:
        errors += content.count("<tool_call>") - len(expressions) - errors  # an unclosed block
    return expressions, errors


def final_answer(content: str) -> str | None:
    """The last integer in an answer, as text."""
    numbers = re.findall(r"-?\d+", TOOL_CALL.sub(" ", content))
    return numbers[-1] if numbers else None


class Calculator:
    """A question with an integer answer; the policy may call ``calculator`` any number of times, and its first
    turn without a tool call is its answer.  A call that does not parse is answered with an error message (an
    observation, counted in ``parse_errors``).  score: 1 for the exact answer, else 0."""

    tools = [CALCULATOR_TOOL]

    def __init__(self, system_prompt: str = ""):
        self.system_prompt = system_prompt
        self.answer: str | None = None
        self.given: str | None = None

    def reset(self, prompt_row: dict) -> list[dict]:
        self.answer, self.given = str(prompt_row["answer"]).strip(), None
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt_row["prompt"]}]

    def step(self, assistant_message: dict):
        expressions, errors = parse_tool_calls(assistant_message["content"])
        if not expressions and not errors:
            self.given = final_answer(assistant_message["content"])
            return [], float(self.given == self.answer), True, {"tool_calls": 0, "parse_errors": 0}
        results = []
        for expression in expressions:
            try:
                results.append(str(evaluate_arithmetic(expression)))
            except ValueError as exc:
                results.append(f"error: {exc}")
        results += ["error: the tool call did not parse; write <tool_call>{\"name\": \"calculator\", "
                    "\"arguments\": {\"expression\": \"...\"}}</tool_call>"] * errors
        return ([{"role": "tool", "content": result} for result in results], None, False,
                {"tool_calls": len(expressions), "parse_errors": errors})

    def score(self, episode: dict) -> float:
        return float(self.given is not None and self.given == self.answer)


def environment_factory(kind: str, class_path: str = "", kwargs: dict | None = None):
    """A function that makes one new environment (params.environment: kind calculator or python), checked by
    making one now: a missing class or a constructor that raises is one line before any model loads."""
    kwargs = dict(kwargs or {})
    if kind == "calculator":
        cls, name = Calculator, "calculator"
    elif kind == "python":
        cls, name = load_environment_class(class_path), class_path
    else:
        raise ValueError(f"environment_factory: kind {kind!r} has no environment")

    def make():
        try:
            return cls(**kwargs)
        except Exception as exc:  # the user's constructor: any error is theirs, in one line
            raise DataError(f"environment {name}: its constructor raised {type(exc).__name__}: {exc} "
                            f"(environment.kwargs: {kwargs})") from None

    make()
    return make
