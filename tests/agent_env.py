"""Environments importable by name (``env=agent_env:make``) in the tests and in the distributed
tests' worker processes (the tests directory is on their path)."""


class Echo:
    """Answers every turn with "say good" (a user turn) and ends after ``turns`` model turns;
    its reward is the number of "good"s the model wrote, summed over the episode."""

    turns = 2

    def __init__(self):
        self.n = 0

    def reset(self, row):
        return row["prompt"]

    def step(self, text):
        self.n += 1
        return "say good", float(text.split().count("good")), self.n >= self.turns


def make():
    return Echo()


class FailsLater(Echo):
    """Raises in its step after the first iteration's episodes (a class-level counter)."""

    calls = 0

    def step(self, text):
        FailsLater.calls += 1
        if FailsLater.calls > 40:
            raise RuntimeError("the sandbox died")
        return super().step(text)


def make_failing():
    return FailsLater()


class NanReward(Echo):
    def step(self, text):
        return None, float("nan"), True


def make_nan():
    return NanReward()


class SkipsSome(Echo):
    """Fails to start every 5th episode it is made for (a class-level counter, the factory being
    called in order): with env.on_error: skip, some episodes of a group are dropped."""

    made = 0

    def __init__(self):
        super().__init__()
        SkipsSome.made += 1
        self.fails = SkipsSome.made % 5 == 0

    def reset(self, row):
        if self.fails:
            raise RuntimeError("the sandbox did not start")
        return super().reset(row)


def make_skips_some():
    return SkipsSome()


def hash_reward(prompts, responses):
    """A score that differs between samples of a prompt (groups are rarely flat)."""
    return [float(sum(map(ord, r)) % 7) for r in responses]


class Counts(Echo):
    """Reports a count of its own: how many "good"s the model wrote (``env/goods``)."""

    def __init__(self):
        super().__init__()
        self.counts = {"goods": 0}

    def step(self, text):
        self.counts["goods"] += text.split().count("good")
        return super().step(text)


def make_counts():
    return Counts()


class IncrementEnv:
    """A TRL-style environment, written as TRL's docs show one (``GRPOTrainer(
    environment_factory=IncrementEnv)``): a no-argument constructor, ``reset(**kwargs)``, and
    public methods with type hints and docstrings as its tools."""

    def __init__(self):
        self.counter = 0
        self.resets = 0

    def reset(self, **kwargs) -> str | None:
        self.counter = 0
        self.resets += 1
        return "the counter starts at 0"

    def increment(self, a: int) -> int:
        """
        Increment the counter by a value.

        Args:
            a: the value to increment by

        Returns:
            The counter after the increment.
        """
        self.counter += a
        return self.counter


def counter_reward(prompts, responses, environments):
    """TRL's reward functions read the environment instances: 1 per reset seen, + the counter."""
    return [float(env.resets + env.counter) for env in environments]


class Undocumented:
    """A TRL-style class whose tool has no docstring."""

    def reset(self):
        return None

    def poke(self, x: int) -> int:
        return x


def counter_free(prompts, responses, final_response):
    """1 when the model's final turn holds no tool call (it answered), else 0."""
    return [float("<tool_call>" not in r) for r in final_response]
