"""The `suzak` command: one entry point, one subcommand per job.

    suzak train                      # the embedded default: tiny model, synthetic CLEVR, SFT -> GRPO -> eval
    suzak train --config configs/qwen25vl_7b_clevr.yaml grpo.num_generations=4
    suzak serve --config configs/qwen25vl_7b_clevr.yaml
    suzak eval superclevr --model Qwen/Qwen2.5-VL-3B-Instruct --data data/superclevr
    suzak data synth clevr --n 100 --split B --out data/clevr_b
    suzak model tiny --out models/tiny
    suzak model tiny --family qwen3vl --out models/tiny-qwen3vl
    suzak doctor

Only argparse, pydantic and yaml are imported at start; each subcommand imports its heavy modules itself,
so `suzak --help` answers at once and a bad config fails before torch loads. The jobs of the other parts
(train, serve, eval) are found through the `suzak.jobs` entry points of pyproject.toml: the core never
imports trainer/, vllm_server/ or evaluator/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from suzak.errors import SuzakError
from suzak.log import setup_logging


def _load_dotenv() -> None:
    """Secrets (HF_TOKEN, WANDB_API_KEY) may come from ./.env; the environment wins. Values are never printed."""
    env_file = Path(".env")
    if not env_file.is_file():
        return
    for line in env_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.removeprefix("export ").strip()
        if key and key not in os.environ and value.strip():
            os.environ[key] = value.strip().strip('"').strip("'")


def _job(name: str):
    """The function registered for a job under the `suzak.jobs` entry points (loaded only when it runs).

    An installed suzak has them in its metadata; a checkout used through PYTHONPATH without installing (the
    device procedure, bench/README.md) reads the same table from its pyproject.toml.
    """
    from importlib.metadata import EntryPoint, entry_points

    found = list(entry_points(group="suzak.jobs", name=name))
    if not found:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        project = tomllib.loads(pyproject.read_text()).get("project", {}) if pyproject.is_file() else {}
        table = project.get("entry-points", {}).get("suzak.jobs", {})
        found = [EntryPoint(name, table[name], "suzak.jobs")] if name in table else []
    if not found:
        raise SuzakError(f"the '{name}' job is not installed: reinstall suzak (./install.sh, or pip install -e .)")
    return found[0].load()


def _config_args(p: argparse.ArgumentParser, default: str = "the embedded tiny recipe") -> None:
    p.add_argument("--config", "-c", help=f"YAML config in configs/ (default: {default})")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.num_generations=4 model.max_pixels=200704")


def _resolve_config(args: argparse.Namespace, extra: list[str] | None = None):
    from suzak.config import load_config

    path = args.config
    if path is None and args.command in ("train", "config"):
        # The embedded default recipe ships beside the package (configs/ at the repo root).
        default = Path(__file__).resolve().parents[1] / "configs" / "tiny_clevr.yaml"
        path = default if default.is_file() else None
    return load_config(path, list(args.overrides) + list(extra or []))


def cmd_train(args: argparse.Namespace) -> int:
    extra = [f"out_dir={args.out}"] if args.out else []
    if args.no_resume:
        extra.append("checkpoint.resume=false")
    cfg = _resolve_config(args, extra)
    _job("train")(cfg, stages=args.stages.split(","))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    extra = [f"model.name_or_path={args.model}"] if args.model else []
    cfg = _resolve_config(args, extra)
    _job("serve")(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _resolve_config(args)
    return _job("eval")(args, cfg)


def cmd_data(args: argparse.Namespace) -> int:
    from suzak.synth.writers import write_dataset

    kw = {}
    if args.kind == "clevr":
        kw.update(min_objects=args.min_objects, max_objects=args.max_objects)
    if args.image_size:
        kw["image_size"] = _image_size(args.image_size)
    fmt = args.format or ("hf")
    out = write_dataset(args.kind, args.n, args.seed, Path(args.out), fmt, split=args.split,
                        preview=Path(args.preview) if args.preview else None, workers=args.workers, **kw)
    print(f"wrote {args.n} {args.kind} samples ({fmt}) to {out}")
    return 0


def _image_size(text: str) -> tuple[int, int]:
    """'480x320' -> (480, 320); anything else is a SuzakError saying what is expected."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        w, h = (int(x) for x in parts)
    except ValueError:
        raise SuzakError(f"--image-size {text!r} must look like WIDTHxHEIGHT in pixels, e.g. 480x320") from None
    if w < 28 or h < 28:
        raise SuzakError(f"--image-size {text!r}: width and height must be at least 28 pixels")
    return w, h


def cmd_model(args: argparse.Namespace) -> int:
    from suzak.tiny import build_tiny_model

    target = Path(args.out)
    if target.exists() and not target.is_dir():
        raise SuzakError(f"--out {target} is a file; the tiny model is a folder: give a new or existing folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise SuzakError(f"--out {target} is a folder holding other files; give an empty or new folder (or an "
                         "earlier tiny model's folder, which is rebuilt)")
    from suzak.families import get_family

    out = build_tiny_model(target, family=args.family, seed=args.seed)
    print(f"tiny {get_family(args.family).label} written to {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from suzak.doctor import run_doctor

    return run_doctor(json_out=args.json, require_gpu=args.require_gpu)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from suzak.config import explain

    if args.explain:
        print("\n".join(explain()))
        return 0
    cfg = _resolve_config(args)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="suzak",
                                     description="SFT + GRPO for Qwen2.5-VL visual reasoning (R1-V style).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run SFT -> GRPO -> eval (default: the embedded tiny pipeline)")
    _config_args(p)
    p.add_argument("--out", help="output folder (default: out_dir of the config)")
    p.add_argument("--stages", default="all", help="comma list of stages: all, model, data, sft, grpo, eval")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing from checkpoints")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="start the vLLM rollout server")
    _config_args(p, "the built-in defaults, `suzak config --explain`")
    p.add_argument("--model", help="model folder or hub id (overrides model.name_or_path)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="run a benchmark: superclevr, geoqa, clevr-synth, geo-synth")
    p.add_argument("benchmark", choices=["superclevr", "geoqa", "clevr-synth", "geo-synth"])
    p.add_argument("--model", help="model folder or hub id (a local server is started)")
    p.add_argument("--server", help="URL of a running rollout server")
    p.add_argument("--data", help="benchmark jsonl or its folder")
    p.add_argument("--out", help="output folder for predictions.jsonl, summary.json, report.html")
    p.add_argument("--rescore", help="score a saved predictions.jsonl again, with no model")
    p.add_argument("--scoring", choices=["r1v", "strict"], help="scoring rules (default r1v)")
    p.add_argument("--prompt", choices=["eval", "train"], help="prompt template (default: R1-V's eval prompt)")
    p.add_argument("--limit", type=int, help="evaluate at most this many problems")
    _config_args(p, "the built-in defaults, `suzak config --explain`")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="synthetic data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="generate CLEVR-style or geometry data")
    s.add_argument("kind", choices=["clevr", "geo"])
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=["hf", "superclevr", "geoqa"],
                   help="hf (save_to_disk), superclevr or geoqa (jsonl + images)")
    s.add_argument("--split", choices=["A", "B"], default="A", help="CLEVR CoGenT condition")
    s.add_argument("--min-objects", type=int, default=3)
    s.add_argument("--max-objects", type=int, default=10)
    s.add_argument("--image-size", help="WxH, e.g. 480x320")
    s.add_argument("--preview", help="also write a PNG grid of samples here")
    s.add_argument("--workers", type=int, default=0)
    s.set_defaults(func=cmd_data)

    p = sub.add_parser("model", help="models")
    msub = p.add_subparsers(dest="model_command", required=True)
    t = msub.add_parser("tiny", help="build a tiny random-init Qwen2.5-VL (or --family qwen3vl: Qwen3-VL)")
    t.add_argument("--out", required=True)
    t.add_argument("--family", choices=("qwen25vl", "qwen3vl"), default="qwen25vl")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_model)

    p = sub.add_parser("doctor",
                       help="check torch / CUDA / flash-attn / vLLM / transformers and diagnose known breakages")
    p.add_argument("--json", action="store_true")
    p.add_argument("--require-gpu", action="store_true", help="fail when no GPU is visible")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="print the resolved config, or --explain every key")
    _config_args(p)
    p.add_argument("--explain", action="store_true")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    _load_dotenv()
    setup_logging()
    parser = build_parser()
    # Dotted overrides may sit anywhere (`suzak eval superclevr --model M eval.limit=4`): argparse stops
    # collecting positionals at the first flag, so pick the stragglers up here.
    args, unknown = parser.parse_known_args(argv)
    stray = [u for u in unknown if "=" in u and not u.startswith("-")]
    if len(stray) != len(unknown) or (stray and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(u for u in unknown if u not in stray) or ' '.join(stray)}")
    if stray:
        args.overrides = list(args.overrides) + stray
    try:
        return int(args.func(args) or 0)
    except SuzakError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
