"""Optional dependencies are checked when a command starts: hide the package, and the command
fails at once with one line naming the extra, before it writes anything (issue 21)."""

import importlib.abc
import sys

import pytest
from conftest import write_jsonl

from rlhfkit.cli import main


class _Hide(importlib.abc.MetaPathFinder):
    """An import hook that makes ``names`` (and their submodules) uninstalled for this process."""

    def __init__(self, names):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


@pytest.fixture
def hide(monkeypatch):
    def _hide(*names):
        for mod in list(sys.modules):
            if mod.split(".")[0] in names:
                monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setattr(sys, "meta_path", [_Hide(names), *sys.meta_path])

    return _hide


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_demo_without_the_demo_extra_stops_before_any_work(tmp_path, hide, capsys):
    hide("vaderSentiment")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 2
    _one_line_error(capsys, "rlhfkit demo", "vaderSentiment", "pip install 'rlhfkit[demo]'")
    assert not out.exists()


def test_serve_rm_without_the_serve_extra_stops_at_once(tmp_path, hide, capsys):
    hide("fastapi", "uvicorn")
    assert main(["serve-rm", str(tmp_path), "--port", "1"]) == 2
    _one_line_error(capsys, "rlhfkit serve-rm", "fastapi", "pip install 'rlhfkit[serve]'")


def test_pipeline_without_matplotlib_stops_before_sft(tmp_path, hide, capsys, tiny_lm):
    hide("matplotlib")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    out = tmp_path / "pipe"
    args = ["pipeline", f"base_model={tiny_lm}", f"output_dir={out}", f"sft.data.train_file={data}"]
    assert main(args) == 2
    _one_line_error(capsys, "rlhfkit pipeline", "matplotlib", "pip install 'rlhfkit[report]'")
    assert not out.exists()


def test_log_wandb_without_wandb_names_the_key(tmp_path, hide, capsys, tiny_lm):
    hide("wandb")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    out = tmp_path / "sft"
    args = ["sft", f"model.name_or_path={tiny_lm}", f"data.train_file={data}"]
    assert main([*args, f"train.output_dir={out}", "log.wandb=true"]) == 2
    _one_line_error(capsys, "log.wandb", "pip install 'rlhfkit[wandb]'")
    assert not out.exists()


def test_env_url_without_the_envs_extra_names_the_key(tmp_path, hide, capsys, tiny_lm):
    hide("openenv")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    out = tmp_path / "ppo"
    args = ["ppo", f"model.name_or_path={tiny_lm}", f"data.train_file={data}"]
    assert main([*args, f"run.output_dir={out}", "env.url=http://127.0.0.1:1"]) == 2
    _one_line_error(capsys, "env.url", "openenv", "pip install 'rlhfkit[envs]'")
    assert not (out / "checkpoints").exists()


def test_rollout_engine_vllm_without_vllm_names_the_key_and_the_extra(
    tmp_path, hide, capsys, tiny_lm
):
    hide("vllm")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    out = tmp_path / "ppo"
    args = ["ppo", f"model.name_or_path={tiny_lm}", f"data.train_file={data}"]
    assert main([*args, f"run.output_dir={out}", "rollout.engine=vllm"]) == 2
    _one_line_error(capsys, "rollout.engine: vllm", "vllm", "pip install 'rlhfkit[vllm]'")
    assert not out.exists()


def test_vllm_serve_without_vllm_stops_at_once(tmp_path, hide, capsys):
    hide("vllm")
    assert main(["vllm-serve", str(tmp_path), "--port", "1"]) == 2
    _one_line_error(capsys, "rlhfkit vllm-serve", "pip install 'rlhfkit[vllm]'")
