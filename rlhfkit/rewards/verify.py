"""Answer checkers for RL with verifiable rewards: reward functions of the form
``fn(prompts, responses, answer, **columns) -> list[float]`` that read the row's gold ``answer``.

    rlhfkit.rewards.verify:math     1 if the final answer equals ``answer`` as mathematics
                                    (``math-verify``: 0.5 = 1/2 = \\frac{1}{2}, 1,000 = 1000)
    rlhfkit.rewards.verify:exact    1 if the final answer equals ``answer`` as a string (stripped)
    rlhfkit.rewards.verify:format   ``FORMAT_WEIGHT`` if the response ends in one \\boxed{...}

Where the answer is read (``math``): the content of the **last** ``\\boxed{...}`` if the response
has a box (a response that boxes several values is judged by the last one, as verl's and
DeepSeek's math rewards do); without a box, math-verify's own extraction reads the response as
TRL's accuracy reward lets it: LaTeX (``$\\frac{1}{3}$``, ``\\(k = 2\\)``) and then plain
expressions and numbers (``12, which is even``, ``$1,234.50``, ``#### 42``), the last one found.
``exact`` reads the last box or else the last number (one not glued to a word: ``AZYUK2A`` holds
none). A response with no answer, or one the checker cannot parse, scores 0 and is counted
(``reward/unparsed``), never crashes the run. So is an answer longer than ``MAX_ANSWER_CHARS``:
sympy can take minutes on a pathological expression. A box left open (a response cut off inside
its answer) is no answer.

The gold ``answer`` is read as if boxed (``3, 5`` is a set, ``1,000`` a thousand), unless it is
LaTeX with its own delimiters (``$...$``, ``\\(...\\)``, ``\\[...\\]``, ``\\boxed``).

With an environment (multi-turn episodes) the checkers score the model's **final turn** (the
``final_response`` column the episode loop provides), not the whole trajectory: a number in a
tool's output is not the model's answer.

Set ``reward_fn: rlhfkit.rewards.verify:math`` and give every prompt row an ``answer`` field; a
row without one is a data error naming the file, the line and the column when the data loads.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Sequence

MAX_ANSWER_CHARS = 100  # longer final answers score 0 (counted as unparsed)
FORMAT_WEIGHT = 0.1  # what `format` gives a response that ends in exactly one \boxed{...}

# a number not glued to a word before it (``AZYUK2A`` holds none), its thousands commas in groups
# of three (so the comma of "12, which is even" is not part of it)
_NUMBER = re.compile(r"(?<![A-Za-z_])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# a plain number, and an expression that only restates a sum, difference, product or power
# ("2 + 7", "4 \\times 5"): math-verify evaluates it, so without this rule "What is 2 + 7?" ->
# "The answer is 2 + 7." would grade as 9 (docs/real-models.md found it rewarded in training)
_PLAIN_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_OPERATION = re.compile(r"[\d)}]\s*(?:[-+*^×·]|\\times|\\cdot)\s*[\d({\\]")
# a gold answer that is LaTeX with its own delimiters is parsed as it is, any other one boxed
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")


class _Unparsed:
    """Responses whose answer could not be read, since the last ``pop_metrics`` (thread-safe:
    a reward server scores in a thread pool)."""

    def __init__(self) -> None:
        self.lock, self.bad, self.seen = threading.Lock(), 0, 0

    def add(self, bad: int, seen: int) -> None:
        with self.lock:
            self.bad += bad
            self.seen += seen

    def pop(self) -> dict[str, float]:
        with self.lock:
            out = {"reward/unparsed": self.bad / self.seen} if self.seen else {}
            self.bad = self.seen = 0
        return out


_unparsed = _Unparsed()


def _closing(text: str, i: int) -> int | None:
    """The index of the brace that closes the one opened just before ``i``, or None."""
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if
    there is none or it is not closed."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    end = _closing(text, starts[-1])
    return None if end is None else text[starts[-1] : end].strip()


def final_answer(text: str) -> str | None:
    """``exact``'s answer: the last boxed content, else the last number (thousands commas kept),
    else None. A box left open (a response cut off at the length limit inside its answer) is no
    answer: its digits so far are not read as one."""
    if _BOXED.search(text):
        return last_boxed(text)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


@functools.cache
def _extraction() -> list:
    """math-verify's extraction targets, as TRL's accuracy reward sets them: boxed LaTeX first,
    then any LaTeX, then plain expressions (the last match of the best kind wins)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _math_grade(text: str, gold: str) -> bool | None:
    """math-verify's verdict on a response against the gold answer, or None if either has no
    answer it can read. Its own timeouts use SIGALRM, which only the main thread may set:
    elsewhere they are off, and the length cap bounds the work instead."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" per call
    if _BOXED.search(text):  # the last box is the answer (math-verify would join every box)
        box = last_boxed(text)
        if box is None or len(box) > MAX_ANSWER_CHARS:
            return None
        text = f"\\boxed{{{box}}}"
    pred = parse(text, _extraction(), parsing_timeout=timeout)
    if not pred or len(pred[-1]) > MAX_ANSWER_CHARS:
        return None
    if _PLAIN_NUMBER.fullmatch(gold) and _OPERATION.search(pred[-1]):
        return False  # a number is asked for: an operation that evaluates to it is not one
    g = parse(gold if _DELIMITED.search(gold) else f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    if not g:
        return None
    return bool(verify(g, pred, timeout_seconds=timeout))


def _exact_grade(text: str, gold: str) -> bool | None:
    """The final answer equals the gold as a string, thousands commas dropped from numbers."""
    pred = final_answer(text)
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return None
    norm = lambda s: s.replace(",", "") if _NUMBER.fullmatch(s) else s  # noqa: E731
    return norm(pred) == norm(gold)


def _check(
    responses: Sequence[str],
    answer: Sequence,
    grade: Callable[[str, str], bool | None],
    final_response: Sequence[str] | None,
) -> list[float]:
    texts = responses if final_response is None else final_response  # an episode: its last turn
    if len(answer) != len(texts):
        raise ValueError(f"{len(answer)} answers for {len(texts)} responses")
    scores, bad = [], 0
    for text, gold in zip(texts, answer, strict=True):
        try:
            ok = grade(text, str(gold).strip())
        except Exception:  # a parser's failure is an unreadable answer, not a dead run
            ok = None
        bad += ok is None
        scores.append(float(bool(ok)))
    _unparsed.add(bad, len(texts))
    return scores


def answer_checker(grade: Callable[[str, str], bool | None], name: str, doc: str):
    """A reward function ``fn(prompts, responses, answer, final_response=None, **columns)`` that
    scores 1.0 where ``grade(text, gold)`` holds, else 0 (None: unreadable, counted). It reads
    ``final_response`` instead of ``responses`` when the rollout gives one (an episode's last
    model turn); it needs the column ``answer`` on every row."""

    def check(
        prompts: Sequence[str],
        responses: Sequence[str],
        answer: Sequence,
        final_response: Sequence[str] | None = None,
        **_,
    ) -> list[float]:
        return _check(responses, answer, grade, final_response)

    check.__name__ = check.__qualname__ = name
    check.__doc__ = doc
    check.columns = ("answer",)  # type: ignore[attr-defined]  (checked when the prompts load)
    check.pop_metrics = pop_metrics  # type: ignore[attr-defined]
    return check


def format(  # noqa: A001
    prompts: Sequence[str],
    responses: Sequence[str],
    final_response: Sequence[str] | None = None,
    **_,
) -> list[float]:
    """``FORMAT_WEIGHT`` if the response holds exactly one ``\\boxed{...}`` with an answer in
    it (a digit or a LaTeX command: not a placeholder such as ``\\boxed{N}``) and nothing after
    it but whitespace and punctuation, else 0: the format the math prompt asks for.

    The placeholder rule is a fixed reward hack: SmolLM2 trained with the first version learned to
    end every response in a literal ``\\boxed{N}`` (docs/rlvr.md, run 1)."""
    out = []
    for text in responses if final_response is None else final_response:
        boxes = list(_BOXED.finditer(text))
        end = _closing(text, boxes[0].end()) if len(boxes) == 1 else None
        ok = (
            end is not None
            and re.search(r"[\d\\]", text[boxes[0].end() : end]) is not None
            and re.fullmatch(r"[\s.$\\\])]*", text[end + 1 :]) is not None
        )
        out.append(FORMAT_WEIGHT if ok else 0.0)
    return out


def pop_metrics() -> dict[str, float]:
    """``reward/unparsed``: the share of responses since the last call whose answer no checker
    could read (rlhfkit logs it per iteration)."""
    return _unparsed.pop()


format.columns = ()  # type: ignore[attr-defined]  (it reads no column)

math = answer_checker(
    _math_grade,
    "math",
    "1.0 if the final answer equals the row's ``answer`` mathematically (math-verify), else 0.",
)
exact = answer_checker(
    _exact_grade,
    "exact",
    "1.0 if the final answer equals the row's ``answer`` as a string (both stripped, thousands "
    "commas dropped from numbers), else 0. For answers that are words or codes, not mathematics.",
)
