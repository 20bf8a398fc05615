"""Optional dependencies, checked when a command starts rather than minutes into a run.

Each extra of ``pyproject.toml`` lists the modules a command or key needs. ``require`` looks them
up without importing them (``importlib.util.find_spec``) and raises one error that names the
command or key and the ``pip install`` line that fixes it.
"""

from __future__ import annotations

import importlib.util

# extra -> the importable modules it provides (pyproject.toml [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("matplotlib", "vaderSentiment"),
    "envs": ("openenv", "mcp"),
    "report": ("matplotlib",),
    "serve": ("fastapi", "uvicorn"),
    "vllm": ("vllm",),
    "wandb": ("wandb",),
}


class MissingExtra(RuntimeError):
    """A command or key needs an optional dependency that is not installed."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package missing, or an import hook that refuses it
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if not _importable(m)]


def require(extra: str, what: str) -> None:
    """Raise ``MissingExtra`` naming ``what`` (a command or config key) if ``extra`` is not
    installed."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(f"{what} needs {', '.join(gone)}: pip install 'rlhfkit[{extra}]'")
