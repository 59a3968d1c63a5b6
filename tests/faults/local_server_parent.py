"""Stands in for a learner in the fault suite: starts a local rollout server the way the pipeline does, reports it.

    python tests/faults/local_server_parent.py ROOT MODEL [overrides...]

Prints one JSON line {"pid", "url"} once the server is ready, then {"exit": code} if the server stops, and
sleeps until it is killed (the test kills it with -9 to check that the server goes with it).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from suzak.config import load_config  # noqa: E402
from vllm_server.client import start_local_server  # noqa: E402

root, model, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
cfg = load_config(None, [f"out_dir={root}", f"model.name_or_path={model}", "model.min_pixels=3136",
                         "model.max_pixels=100352", "server.dtype=float32", "server.gpu_memory_utilization=0.12",
                         "server.enforce_eager=true", "server.max_model_len=1024", "server.max_num_seqs=16",
                         *overrides])
process, url = start_local_server(cfg, root / "server.log", timeout_s=900)
print(json.dumps({"pid": process.pid, "url": url}), flush=True)
print(json.dumps({"exit": process.wait()}), flush=True)
while True:
    time.sleep(60)
