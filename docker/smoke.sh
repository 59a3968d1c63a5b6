#!/usr/bin/env bash
# Smoke test of the image on a machine with Docker and an NVIDIA GPU (not run in CI: no engine there).
#   bash docker/smoke.sh
# Builds the image, runs `suzak doctor`, starts the rollout server on the tiny model, runs 2 GRPO steps
# against it, and evaluates on synthetic CLEVR. Everything lands in ./runs/smoke; the stack is torn down at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export SUZAK_CONFIG=configs/tiny_clevr.yaml SUZAK_MODEL=tiny
mkdir -p runs outputs data models
cleanup() { docker compose --profile eval down --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== build"
docker compose build
echo "== doctor"
docker compose run --rm train suzak doctor --require-gpu
echo "== server (tiny model) + 2 GRPO steps"
docker compose up -d vllm_server
docker compose run --rm train suzak train --config configs/tiny_clevr.yaml --out runs/smoke \
    server.url=http://vllm_server:8000 sft.max_steps=5 grpo.steps=2 grpo.prompts_per_step=4 \
    grpo.num_generations=4 eval.synth_n=16
test -f runs/smoke/grpo/final/config.json
echo "== evaluator on synthetic CLEVR"
docker compose run --rm evaluator clevr-synth --server http://vllm_server:8000 --out runs/smoke/eval --limit 16
test -f runs/smoke/eval/summary.json
echo "smoke OK: runs/smoke"
