"""An environment importable by name (``env=agent_env:make``) in the distributed tests' worker
processes: it answers every turn with "say good" and ends after 2 model turns; its reward is
the number of "good"s the model wrote."""


class Echo:
    def __init__(self):
        self.n = 0

    def reset(self, row):
        return row["prompt"]

    def step(self, text):
        self.n += 1
        return "say good", float(text.split().count("good")), self.n >= 2


def make():
    return Echo()
