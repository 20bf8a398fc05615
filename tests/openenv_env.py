"""An environment written on ``openenv-core``, as OpenEnv's own template writes one: Pydantic
action and observation, ``reset`` / ``step`` / ``state``. The model is asked to say "good"; each
turn's reward is the number of "good"s in it, and the episode ends after two turns."""

from fastmcp import FastMCP  # openenv-core's own MCP server dependency
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.mcp_environment import MCPEnvironment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field


class WordAction(Action):
    message: str = Field(..., description="the model's turn")


class WordObservation(Observation):
    text: str = Field(default="", description="what the environment says")


class WordGame(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self._state = State(episode_id="word-game", step_count=0)

    def reset(self, seed=None, episode_id=None, **kwargs) -> WordObservation:
        self._state = State(episode_id=episode_id or "word-game", step_count=0)
        return WordObservation(text="say good", done=False, reward=0.0)

    def step(self, action: WordAction, timeout_s=None, **kwargs) -> WordObservation:
        self._state.step_count += 1
        goods = action.message.split().count("good")
        done = self._state.step_count >= 2
        return WordObservation(text="say good", done=done, reward=float(goods))

    @property
    def state(self) -> State:
        return self._state


class TwoFields(Action):
    a: str
    b: str


class NoTextAction(Environment):
    """An environment whose action has two text fields: no single one carries the model's text."""

    def reset(self, **kwargs) -> WordObservation:
        return WordObservation()

    def step(self, action: TwoFields, **kwargs) -> WordObservation:
        return WordObservation(done=True)

    @property
    def state(self) -> State:
        return State()


class CalcEnv(MCPEnvironment):
    """An OpenEnv environment whose tools are served over MCP (OpenEnv's MCPEnvironment, with a
    FastMCP server as its docs show): ``add`` is its tool."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # one FastMCP server per instance

    def __init__(self):
        mcp = FastMCP("calc")

        @mcp.tool
        def add(a: int, b: int) -> int:
            """Add two numbers."""
            return a + b

        super().__init__(mcp)
        self._state = State(episode_id="calc", step_count=0)

    def reset(self, seed=None, episode_id=None, **kwargs) -> Observation:
        return Observation(done=False, reward=0.0)

    def _step_impl(self, action, timeout_s=None, **kwargs) -> Observation:
        return Observation(done=True, reward=0.0)

    @property
    def state(self) -> State:
        return self._state


class SlowGame(WordGame):
    """The word game with a step that takes 1.5 s: past a short ``env.timeout``."""

    def step(self, action: WordAction, timeout_s=None, **kwargs) -> WordObservation:
        import time

        time.sleep(1.5)
        return super().step(action)


class BrokenGame(WordGame):
    """A step that answers what is not an observation (a plain dict, as a buggy environment
    might): the server cannot send it as one."""

    def step(self, action: WordAction, timeout_s=None, **kwargs):
        return {"text": "say good", "reward": "lots"}
