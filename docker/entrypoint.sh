#!/usr/bin/env bash
# Entrypoint of suzak's image: run `suzak doctor`, then exec the command (`suzak serve ...`, `suzak train ...`).
#
#   docker run --gpus all suzak:0.1.0 suzak train --config configs/qwen25vl_7b_clevr.yaml
#
# The doctor prints versions, GPUs and /dev/shm, and names the fix for known breakages (flash-attn built
# against another torch, a torch that vLLM does not pin, no GPU, a 64 MiB /dev/shm) before a long model load
# would hit them. Environment:
#   SUZAK_REQUIRE_GPU=1     a missing GPU is a failure, not a note (compose sets it for server and learner)
#   SUZAK_DOCTOR=strict     (default) stop when the doctor finds a problem
#   SUZAK_DOCTOR=warn       print the problems and start anyway
#   SUZAK_DOCTOR=off        skip the doctor (fastest start)
set -euo pipefail

if [[ $# -eq 0 ]]; then
    set -- suzak --help
fi

mode="${SUZAK_DOCTOR:-strict}"
case "$mode" in
    off) ;;
    strict | warn)
        if ! suzak doctor; then
            if [[ "$mode" == "strict" ]]; then
                echo "suzak-entrypoint: suzak doctor found a problem (see the fix above); not starting '$*'." >&2
                echo "suzak-entrypoint: set SUZAK_DOCTOR=warn to start anyway, or SUZAK_DOCTOR=off to skip the checks." >&2
                exit 1
            fi
            echo "suzak-entrypoint: continuing despite the doctor's findings (SUZAK_DOCTOR=warn)." >&2
        fi
        ;;
    *)
        echo "suzak-entrypoint: SUZAK_DOCTOR='$mode' is not one of strict, warn, off." >&2
        exit 2
        ;;
esac

exec "$@"
