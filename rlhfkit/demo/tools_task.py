"""The agent demo's task (``rlhfkit demo --task tools``): multiply two 2-digit numbers with a tool.

"what is 37 times 58 ?" -> the tiny model cannot multiply (and the held-out pairs were never
seen), so it must call ``multiply`` in the Hermes format, read the tool's answer, and give it:

    <|user|> what is 37 times 58 ? </s>
    <|assistant|> <tool_call> { "name" : "multiply" , "arguments" : { "a" : 37 , "b" : 58 } } </tool_call> </s>
    <|tool|> 2 1 4 6 </s>
    <|assistant|> the answer is 2 1 4 6 </s>

The reward (``check_answer``) reads only the model's final turn: a number copied from the tool's
answer counts, text inside the tool's turn does not. Everything is word-level for the demo's
tokenizer: numbers 0-99 are single tokens, the product is written digit by digit.
"""

from __future__ import annotations

import json
import random
import re

NUMBERS = [str(i) for i in range(100)]
JSON_WORDS = ['{', '}', ':', ',', '"name"', '"arguments"', '"a"', '"b"', '"multiply"']  # fmt: skip
TEMPLATE_WORDS = [
    "<|user|>", "<|assistant|>", "<|tool|>", "<tools>", "</tools>", "<tool_call>", "</tool_call>",
    "multiply", "(", ")", "a", "b", "error:",
]  # fmt: skip
PROMPT_WORDS = ["what", "is", "times", "?", "the", "answer", "compute", "multiplied", "by"]
TEMPLATES = ["what is {a} times {b} ?"]

# a word-level chat template that renders the tools' names and parameters (from their JSON
# schemas), and tool answers as their own turn; every turn ends with EOS
CHAT_TEMPLATE = (
    "<s> "
    "{% if tools %}<tools> {% for t in tools %}{{ t.function.name }} ( "
    "{% for p in t.function.parameters.properties %}{{ p }} {% endfor %}) {% endfor %}</tools> "
    "{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def vocabulary() -> list[str]:
    return sorted(set(NUMBERS + JSON_WORDS + TEMPLATE_WORDS + PROMPT_WORDS))


def multiply(a: int, b: int) -> str:
    """Multiply two whole numbers.

    Args:
        a: the first factor
        b: the second factor
    """
    return " ".join(str(int(a) * int(b)))  # digit by digit: the demo tokenizer's numbers


def tool_call(a: int, b: int) -> str:
    args = f'{{ "a" : {a} , "b" : {b} }}'
    return f'<tool_call> {{ "name" : "multiply" , "arguments" : {args} }} </tool_call>'


_NUMBER = re.compile(r"(?:\d\s?)+")


def answer_of(text: str) -> str | None:
    """The final turn's answer: the digits after "the answer is", spaces removed; None if the
    turn has no such answer."""
    m = re.search(r"the answer is\s+((?:\d\s*)+)", text)
    return None if m is None else re.sub(r"\s", "", m.group(1))


def check_answer(prompts, responses, final_response, answer) -> list[float]:
    """1 when the model's final turn answers the product, else 0. Reads only the final turn
    (the rollout's ``final_response`` column), never the tool's answer inside the episode."""
    return [float(answer_of(f) == str(a)) for f, a in zip(final_response, answer, strict=True)]


def split_pairs(seed: int, held_out: int = 200) -> tuple[list, list]:
    """All (a, b) with 10 <= a, b <= 99 and a 4-digit product, shuffled; the first
    ``held_out`` pairs are held out (never in SFT or RL data: disjoint pairs, the same numbers)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a * b >= 1000]
    random.Random(seed).shuffle(pairs)
    return pairs[held_out:], pairs[:held_out]


def prompt_row(rng: random.Random, a: int, b: int) -> dict:
    return {"prompt": rng.choice(TEMPLATES).format(a=a, b=b), "answer": a * b}


def sft_rows(rng: random.Random, pairs: list, n: int, p_tool: float) -> list[dict]:
    """SFT traces for ``n`` pairs. The first turn calls the tool with probability ``p_tool`` and
    guesses a wrong 4-digit number otherwise; every pair also gets the second turn of a trace that
    called the tool (the answer read from the tool's turn). So the SFT policy can use the tool's
    answer, but calls the tool only about ``p_tool`` of the time. Every row carries the tool's
    schema (``tools``), rendered by the chat template as in RL."""
    from transformers.utils import get_json_schema

    tools = [get_json_schema(multiply)]
    rows = []
    for a, b in rng.sample(pairs, n):
        user = [{"role": "user", "content": prompt_row(rng, a, b)["prompt"]}]
        call = tool_call(a, b)
        if rng.random() < p_tool:
            rows.append({"prompt": user, "completion": call})
        else:
            guess = rng.randrange(1000, 10000)
            guess = guess + 1 if guess == a * b else guess
            rows.append({"prompt": user, "completion": f"the answer is {' '.join(str(guess))}"})
        turn = user + [
            {"role": "assistant", "content": call},
            {"role": "tool", "content": multiply(a, b)},
        ]
        rows.append({"prompt": turn, "completion": f"the answer is {multiply(a, b)}"})
    return [{**r, "tools": tools} for r in rows]


def write_jsonl(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
