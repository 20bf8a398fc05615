"""Command line: ``rlhfkit sft|rm|ppo|pipeline|demo --config X.yaml key.sub=value ...``."""

from __future__ import annotations

import argparse
import sys

from rlhfkit.config import ConfigError, RMConfig, SFTConfig, help_text, load_config

STAGES = {
    "sft": (SFTConfig, "supervised fine-tuning on {prompt, completion} / {messages} data"),
    "rm": (RMConfig, "reward model on {prompt, chosen, rejected} pairs or ranked lists"),
}


def _run(stage: str, cfg) -> None:
    if stage == "sft":
        from rlhfkit.stages.sft import run_sft

        print(run_sft(cfg))
    elif stage == "rm":
        from rlhfkit.stages.rm import run_rm

        print(run_rm(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit",
        description="RLHF for Hugging Face causal LMs: SFT -> reward model -> PPO.",
        epilog="Overrides: key.sub=value after the options, e.g. train.lr=1e-5 model.lora.enabled=true",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, desc) in STAGES.items():
        p = sub.add_parser(name, help=desc, description=desc)
        p.add_argument("--config", help="YAML config file (see configs/)")
        p.add_argument(
            "--help-config",
            action="store_true",
            help="list every config key with its default and help",
        )
        p.add_argument(
            "overrides", nargs="*", help="key.sub=value overrides applied after the file"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls = STAGES[args.command][0]
    if args.help_config:
        print(help_text(cls))
        return 0
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"rlhfkit {args.command}: config error: {e}", file=sys.stderr)
        return 2
    from rlhfkit.data.readers import DataError

    try:
        _run(args.command, cfg)
    except DataError as e:
        print(f"rlhfkit {args.command}: data error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
