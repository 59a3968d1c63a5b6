"""Checks that docker/build-check.sh runs inside the built image, as its non-root user (stdlib + PyYAML only).

    python docker/check_image.py volumes compose.yaml
    python docker/check_image.py healthcheck docker/Dockerfile compose.yaml --model runs/check/grpo/final

volumes      every path compose.yaml mounts into a service exists in the image and is writable by this user
             (a named volume starts as a copy of the image's folder, owner included).
healthcheck  starts `suzak serve` on the given model and runs, word for word, the server target's HEALTHCHECK
             command (docker/Dockerfile, liveness on /health) and compose.yaml's vllm_server healthcheck
             (readiness on /ready) against it, as Docker would; then stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def volumes(compose_file: str) -> int:
    compose = yaml.safe_load(Path(compose_file).read_text())
    targets: dict[str, set[str]] = {}
    for name, service in compose["services"].items():
        for spec in service.get("volumes", []):
            target = spec["target"] if isinstance(spec, dict) else spec.split(":")[1]
            targets.setdefault(target, set()).add(name)
    bad = 0
    for target, services in sorted(targets.items()):
        path = Path(target)
        ok = path.is_dir()
        if ok:
            try:
                with tempfile.NamedTemporaryFile(dir=path):
                    pass
            except OSError as exc:
                ok = False
                why = f"not writable by uid {os.getuid()}: {exc}"
        else:
            why = "missing in the image"
        print(f"  [{'ok' if ok else 'FAIL'}] {target} ({', '.join(sorted(services))})" + ("" if ok else f": {why}"))
        bad += not ok
    print(f"volumes: {len(targets) - bad}/{len(targets)} mount targets present and writable as uid {os.getuid()}")
    return 1 if bad else 0


def dockerfile_healthcheck(dockerfile: str) -> list[str]:
    """The exec-form CMD of the HEALTHCHECK in the `server` stage."""
    text = Path(dockerfile).read_text().replace("\\\n", " ")
    stage = text.split(" AS server", 1)[1].split("\nFROM ", 1)[0]
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", stage, flags=re.MULTILINE)
    if not match:
        raise SystemExit("no exec-form HEALTHCHECK CMD in the server stage")
    return json.loads(match.group(1))


def compose_healthcheck(compose_file: str) -> list[str]:
    test = yaml.safe_load(Path(compose_file).read_text())["services"]["vllm_server"]["healthcheck"]["test"]
    if test[0] != "CMD":
        raise SystemExit(f"compose healthcheck is not exec form: {test}")
    return test[1:]


def probe(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).strip()[:200]


def healthcheck(dockerfile: str, compose_file: str, model: str, port: int, timeout_s: float) -> int:
    live, ready = dockerfile_healthcheck(dockerfile), compose_healthcheck(compose_file)
    if port != 8000:  # the commands name 8000; another port only where the host's 8000 is taken (no netns)
        live = [a.replace(":8000/", f":{port}/") for a in live]
        ready = [a.replace(":8000/", f":{port}/") for a in ready]
        print(f"  note: port 8000 is in use on this host, so the server and both commands use {port}")
    print(f"  Dockerfile HEALTHCHECK: {' '.join(live)}")
    print(f"  compose healthcheck:    {' '.join(ready)}")
    log = Path(tempfile.gettempdir()) / "suzak-serve-check.log"
    cmd = ["suzak", "serve", "--config", "configs/tiny_clevr.yaml", f"model.name_or_path={model}",
           "server.host=127.0.0.1", f"server.port={port}"]
    print(f"  server: {' '.join(cmd)} (log {log})")
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    live_at = ready_at = None
    ready_rc_before = None
    try:
        while time.monotonic() - start < timeout_s and server.poll() is None:
            if live_at is None and probe(live)[0] == 0:
                live_at = time.monotonic() - start
                ready_rc_before = probe(ready)[0]
            if live_at is not None and probe(ready)[0] == 0:
                ready_at = time.monotonic() - start
                break
            time.sleep(1)
        alive = server.poll() is None
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    ok = live_at is not None and ready_at is not None and alive
    if live_at is not None:
        print(f"  [ok] liveness command passed {live_at:.0f} s after start"
              + (f" (readiness then: exit {ready_rc_before}, engine still loading)" if ready_rc_before else ""))
    if ready_at is not None:
        print(f"  [ok] readiness command passed {ready_at:.0f} s after start")
    if not ok:
        print(f"  [FAIL] server alive={alive} live={live_at} ready={ready_at}; last lines of {log}:")
        print("\n".join(log.read_text().splitlines()[-20:]))
    # After the server stops, the liveness command must fail (it really probes the server).
    rc_after, _ = probe(live)
    print(f"  [{'ok' if rc_after else 'FAIL'}] liveness command fails once the server is stopped (exit {rc_after})")
    return 0 if ok and rc_after else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("volumes")
    v.add_argument("compose")
    h = sub.add_parser("healthcheck")
    h.add_argument("dockerfile")
    h.add_argument("compose")
    h.add_argument("--model", required=True)
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.cmd == "volumes":
        return volumes(args.compose)
    return healthcheck(args.dockerfile, args.compose, args.model, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
