"""Run several `suzak train` recipes side by side on one machine, then tabulate their held-out accuracy.

    python -m bench.recipe_sweep --out /tmp/sweep --threads 3 \
        --run 'cold=sft.max_steps=120 grpo.steps=300 eval.every_steps=50' \
        --run 'hot=sft.max_steps=120 grpo.steps=300 grpo.optim.lr=3e-4 grpo.beta=0.04'
    python -m bench.recipe_sweep --table /tmp/sweep/recipe_sweep.json     # the Markdown table of a saved record

Each run is `python -m suzak train --out OUT/NAME <overrides>` with its own CPU thread
budget (OMP_NUM_THREADS), because runs that share a host without one starve each other's CPU-side prompt
preparation (seen on the H100 host). A run's `model.name_or_path=tiny:vision_depth=4,vision_hidden=256` builds
that tiny variant first (under OUT/models). The record holds every run's summary.json, its held-out curve
(eval.every_steps) and its train-accuracy trace; it is printed as `RESULT {json}` and written to
$OUT/recipe_sweep.json when OUT is set (the device's return folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Several suzak train recipes side by side.")
    p.add_argument("--out", type=Path, default=Path("/tmp/recipe_sweep"))
    p.add_argument("--run", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="one recipe: a name, '=', then dotted overrides separated by spaces (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads per run")
    p.add_argument("--stagger", type=float, default=10, help="seconds between launches")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before unfinished runs are stopped")
    p.add_argument("--table", type=Path, help="only print the table of a saved record")
    return p.parse_args(argv)


def parse_run(spec: str) -> tuple[str, list[str]]:
    name, sep, overrides = spec.partition("=")
    if not sep or not name.strip() or "/" in name:
        raise SystemExit(f"--run wants NAME=OVERRIDES (a name without '/'), got {spec!r}")
    return name.strip(), overrides.split()


def build_variants(runs: list[tuple[str, list[str]]], models: Path) -> list[tuple[str, list[str]]]:
    """Replace `model.name_or_path=tiny:k=v,...` by a tiny model built with those sizes (once per spec)."""
    from suzak.tiny import build_tiny_model

    built: dict[str, str] = {}
    resolved = []
    for name, overrides in runs:
        new = []
        for item in overrides:
            key, _, value = item.partition("=")
            if key == "model.name_or_path" and value.startswith("tiny:"):
                if value not in built:
                    sizes = {k: int(v) for k, v in (kv.split("=") for kv in value[5:].split(","))}
                    folder = models / value[5:].replace(",", "_").replace("=", "")
                    built[value] = str(build_tiny_model(folder, **sizes))
                item = f"{key}={built[value]}"
            new.append(item)
        resolved.append((name, new))
    return resolved


def launch(name: str, overrides: list[str], out: Path, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "suzak", "train", "--out", str(out / name),
           "logging.progress=false", *overrides]
    print(f"[sweep] {name}: {' '.join(cmd[3:])}", flush=True)
    with open(out / f"{name}.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[1])


def collect(name: str, overrides: list[str], folder: Path, returncode: int | None, seconds: float) -> dict:
    """One run's record: summary, held-out curve during GRPO and a coarse train-accuracy trace."""
    from trainer.report import read_jsonl

    summary_path = folder / "summary.json"
    metrics = read_jsonl(folder / "grpo_metrics.jsonl")
    curve = [{"step": m.get("step"), "A": m["eval/A"], "B": m["eval/B"]} for m in metrics if "eval/A" in m]
    return {"name": name, "overrides": overrides, "returncode": returncode, "wall_s": round(seconds, 1),
            "summary": json.loads(summary_path.read_text()) if summary_path.exists() else None,
            "eval_curve": curve, "train_accuracy_per_25_steps": means_per_25(metrics, "accuracy"),
            "zero_variance_groups_per_25_steps": means_per_25(metrics, "adv/frac_zero_std")}


def means_per_25(metrics: list[dict], key: str) -> list[float]:
    values = [m[key] for m in metrics if m.get(key) is not None]
    return [round(sum(values[i:i + 25]) / len(values[i:i + 25]), 3) for i in range(0, len(values), 25)]


def run_all(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    runs = build_variants([parse_run(s) for s in args.run], args.out / "models")
    started = time.time()
    procs = {}
    for name, overrides in runs:
        procs[name] = launch(name, overrides, args.out, args.threads)
        time.sleep(args.stagger)  # vLLM engines that profile memory at the same moment failed to start
    ended: dict[str, float] = {}
    while len(ended) < len(procs) and time.time() - started < args.timeout:
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.time() - started
                print(f"[sweep] {name}: exit {proc.returncode} after {ended[name]:.0f} s", flush=True)
        time.sleep(2)
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.terminate()
            print(f"[sweep] {name}: stopped at the timeout", flush=True)
    records = [collect(name, overrides, args.out / name, procs[name].returncode, ended.get(name, time.time() - started))
               for name, overrides in runs]
    return {"host_cpus": os.cpu_count(), "threads_per_run": args.threads, "runs": records}


def table(record: dict) -> str:
    rows = ["| run | SFT A / B | GRPO A / B | GRPO - SFT on B | held-out B during GRPO | seconds |",
            "| --- | --- | --- | --- | --- | --- |"]
    for run in record["runs"]:
        s = run["summary"] or {}
        sft, grpo = s.get("sft", {}), s.get("grpo", {})
        pct = lambda d: f"{100 * d['A']:.1f}% / {100 * d['B']:.1f}%" if d else "-"  # noqa: E731
        lift = f"{100 * (grpo['B'] - sft['B']):+.1f}" if sft and grpo else "-"
        curve = " ".join(f"{c['step']}:{100 * c['B']:.0f}" for c in run["eval_curve"]) or "-"
        rows.append(f"| {run['name']} | {pct(sft)} | {pct(grpo)} | {lift} | {curve} | {s.get('seconds', '-')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if not args.run:
        raise SystemExit("give at least one --run NAME=OVERRIDES")
    record = run_all(args)
    print(table(record), flush=True)
    from bench.common import emit_result

    emit_result(record, "recipe_sweep.json")
    return 0 if all(r["returncode"] == 0 for r in record["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
