"""The demo's task: write a review. Gold judge: VADER sentiment (a lexicon scorer that ships inside
the `vaderSentiment` PyPI package), independent of the learned reward model.

A tiny grammar generates reviews of mixed sentiment; the base model learns the language from
them, SFT teaches the instruction format, and RLHF should move the policy towards positive
reviews as judged by VADER, through a reward model that only ever saw noisy pairwise labels.
"""

from __future__ import annotations

import math
import random

SUBJECTS = [
    "movie", "film", "book", "show", "album", "game", "play", "series", "novel", "song", "comic",
    "podcast", "opera", "musical",
]  # fmt: skip
# subjects of the held-out prompts: in no SFT, preference or PPO prompt (the base model read
# reviews of them in its pre-training text, so it knows the words)
HELD_OUT_SUBJECTS = ["podcast", "opera", "musical"]
TEMPLATES = [
    "write a review of the {s} :",
    "write a short review of the {s} :",
    "review the {s} :",
    "what did you think of the {s} ? :",
]
ASPECT_TEMPLATES = ["write a review of the {s} and its {a} :", "tell me about the {a} of the {s} :"]
ASPECTS = [
    "plot",
    "acting",
    "music",
    "story",
    "ending",
    "cast",
    "pacing",
    "dialogue",
    "writing",
    "characters",
]
POSITIVE = [
    "great",
    "wonderful",
    "excellent",
    "amazing",
    "good",
    "nice",
    "fun",
    "beautiful",
    "brilliant",
    "lovely",
    "perfect",
    "superb",
]
NEGATIVE = [
    "bad",
    "terrible",
    "awful",
    "boring",
    "poor",
    "horrible",
    "dull",
    "weak",
    "ugly",
    "disappointing",
    "bland",
    "messy",
]
NEUTRAL = ["long", "short", "loud", "quiet", "old", "new", "simple", "slow", "fast"]
INTENSIFIERS = ["very", "really", "quite", "so"]
POS_VERBS, NEG_VERBS, NEU_VERBS = (
    ["loved", "liked", "enjoyed"],
    ["hated", "disliked"],
    ["watched", "read", "saw"],
)
GLUE = [
    "the",
    "was",
    "were",
    "and",
    "but",
    "i",
    "it",
    "overall",
    "would",
    "not",
    "recommend",
    ".",
    "write",
    "a",
    "review",
    "of",
    ":",
    "this",
    "is",
]
PROMPT_WORDS = ["short", "what", "did", "you", "think", "?", "tell", "me", "about", "its"]


def vocabulary() -> list[str]:
    return sorted(
        set(
            SUBJECTS
            + ASPECTS
            + POSITIVE
            + NEGATIVE
            + NEUTRAL
            + INTENSIFIERS
            + POS_VERBS
            + NEG_VERBS
            + NEU_VERBS
            + GLUE
            + PROMPT_WORDS
        )
    )


def _adj(rng: random.Random, p_pos: float) -> str:
    u = rng.random()
    words = POSITIVE if u < p_pos * 0.85 else (NEUTRAL if u < p_pos * 0.85 + 0.15 else NEGATIVE)
    adj = rng.choice(words)
    return f"{rng.choice(INTENSIFIERS)} {adj}" if rng.random() < 0.3 else adj


def _sentence(rng: random.Random, subject: str, p_pos: float) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"the {subject} was {_adj(rng, p_pos)} ."
    if kind == 1:
        a, b = rng.sample(ASPECTS, 2)
        joint = "and" if rng.random() < 0.7 else "but"
        return f"the {a} was {_adj(rng, p_pos)} {joint} the {b} was {_adj(rng, p_pos)} ."
    if kind == 2:
        u = rng.random()
        verb = rng.choice(
            POS_VERBS if u < p_pos * 0.8 else (NEU_VERBS if u < p_pos * 0.8 + 0.2 else NEG_VERBS)
        )
        return f"i {verb} the {rng.choice(ASPECTS)} ."
    if kind == 3:
        return f"overall it was {_adj(rng, p_pos)} ."
    return "i would recommend it ." if rng.random() < p_pos else "i would not recommend it ."


def review(rng: random.Random, subject: str, aspect: str | None = None) -> str:
    """A review of 2-3 sentences; its sentiment leaning is drawn per review. With an aspect, the
    first sentence is about it."""
    p_pos = rng.random()
    parts = [f"the {aspect} was {_adj(rng, p_pos)} ."] if aspect else []
    parts += [_sentence(rng, subject, p_pos) for _ in range(rng.randint(2, 3) - len(parts))]
    return " ".join(parts)


def prompts(subjects: list[str]) -> list[tuple[str, str, str | None]]:
    """Every distinct (prompt, subject, aspect) of the templates over ``subjects``."""
    out = [(t.format(s=s), s, None) for s in subjects for t in TEMPLATES]
    out += [(t.format(s=s, a=a), s, a) for s in subjects for a in ASPECTS for t in ASPECT_TEMPLATES]
    return out


def train_prompts() -> list[tuple[str, str, str | None]]:
    return prompts([s for s in SUBJECTS if s not in HELD_OUT_SUBJECTS])


def held_out_prompts() -> list[tuple[str, str, str | None]]:
    return prompts(HELD_OUT_SUBJECTS)


def gold_judge():
    """(prompts, responses) -> VADER compound sentiment in [-1, 1] per response."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def judge(prompts: list[str], responses: list[str]) -> list[float]:
        return [analyzer.polarity_scores(r)["compound"] for r in responses]

    return judge


def noisy_ranking(golds: list[float], temperature: float, rng: random.Random) -> list[int]:
    """A rater-like noisy ranking, best first: sort gold / T + Gumbel noise (Plackett-Luce).

    For two responses this is exactly Bradley-Terry: P(a above b) = sigmoid((gold_a - gold_b) / T),
    because the difference of two Gumbel variables is logistic.
    """
    noisy = [g / temperature - math.log(-math.log(rng.random() or 1e-300)) for g in golds]
    return sorted(range(len(golds)), key=lambda i: -noisy[i])
