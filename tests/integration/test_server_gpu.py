"""`suzak serve` on a CUDA GPU with the learner beside it: weight pushes through the ipc transport.

    python -m pytest -m gpu tests/integration/test_server_gpu.py -q      # on the device (vLLM 0.26, H100)

The GPU twin of tests/integration/test_server.py's files-transport test: greedy outputs change when changed
weights are pushed and come back exactly when the original weights are pushed again, the policy version moves,
and bad pushes get a 4xx while the server keeps answering. Runs once with the direct loads (the default, the
first push builds the copy plan) and once through vLLM's weight-transfer engine (server.direct_weight_load=false).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_server import MAX_PIXELS, MIN_PIXELS, _greedy, _image, _weights

from suzak.config import load_config
from suzak.errors import SuzakError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.vllm,
    pytest.mark.slow,
]


@pytest.fixture(scope="module", params=[True, False], ids=["direct", "engine"])
def gpu_srv(request, tmp_path_factory):
    from suzak.tiny import build_tiny_model
    from vllm_server.client import RolloutClient, start_local_server, stop_local_server

    root = tmp_path_factory.mktemp("gpu-server")
    model = build_tiny_model(root / "tiny")
    cfg = load_config(None, [
        f"out_dir={root}", f"model.name_or_path={model}", f"model.min_pixels={MIN_PIXELS}",
        f"model.max_pixels={MAX_PIXELS}", "server.dtype=float32", "server.gpu_memory_utilization=0.15",
        "server.enforce_eager=true", "server.max_model_len=1024", "server.max_num_seqs=16", "server.transport=ipc",
        f"server.direct_weight_load={str(request.param).lower()}"])
    process, url = start_local_server(cfg, root / "server.log", timeout_s=900)
    client = RolloutClient(url, timeout=300, retries=2)
    try:
        yield SimpleNamespace(client=client, model=model, direct=request.param)
    finally:
        client.close()
        stop_local_server(process)


def test_ipc_push_changes_outputs_and_the_original_restores_them_exactly(gpu_srv):
    from suzak.images import encode_image_data_url
    from trainer.weight_push import IPCTransport

    client = gpu_srv.client
    assert "ipc" in client.info().transports
    refs = [encode_image_data_url(_image(3)), encode_image_data_url(_image(4))]
    base = _greedy(client, refs)
    original = {k: v.cuda() for k, v in _weights(gpu_srv.model).items()}
    version = client.info().policy_version
    g = torch.Generator().manual_seed(0)
    changed_lm = {k: (-v if "embed_tokens" in k else v + 0.2 * torch.randn(v.shape, generator=g).cuda()
                      if ".layers.0." in k else v) for k, v in original.items()}

    transport = IPCTransport()
    transport.init(client)
    first = transport.push(changed_lm.items(), version + 1)
    changed = _greedy(client, refs)
    assert [c.token_ids for c in changed] != [c.token_ids for c in base]
    assert all(c.policy_version == version + 1 for c in changed) and client.info().policy_version == version + 1

    second = transport.push(original.items(), version + 2)
    assert [(c.token_ids, c.logprobs) for c in _greedy(client, refs)] == [(c.token_ids, c.logprobs) for c in base]
    if gpu_srv.direct:  # the first push learned the copy plan; later ones are copies into the served parameters
        assert first["server_timings"]["worker_built"] == 1
        assert second["server_timings"]["worker_copies"] >= len(original) - 1
    else:
        assert "start" in second["server_timings"] and "worker_copies" not in second["server_timings"]

    vision = {k: v + 0.5 * torch.randn(v.shape, generator=g).cuda()
              if k.startswith(("visual.blocks.0.", "visual.merger")) else v for k, v in original.items()}
    transport.push(vision.items(), version + 3)
    assert [c.logprobs for c in _greedy(client, refs)] != [c.logprobs for c in base]
    transport.push(original.items(), version + 4)
    assert [(c.token_ids, c.logprobs) for c in _greedy(client, refs)] == [(c.token_ids, c.logprobs) for c in base]


def test_bad_ipc_pushes_get_4xx_and_the_server_keeps_answering(gpu_srv):
    from suzak import wire
    from suzak.images import encode_image_data_url

    client = gpu_srv.client
    version = client.info().policy_version
    with pytest.raises(SuzakError, match=r"-> 400: .*needs 'payload'"):
        client.update_weights(wire.WeightUpdateRequest(version=99, transport="ipc"))
    with pytest.raises(SuzakError, match=r"-> 400: unknown ipc payload key 'bogus'"):
        client.update_weights(wire.WeightUpdateRequest(version=99, transport="ipc", payload={"bogus": 1}))
    assert client.info().policy_version == version
    assert len(_greedy(client, [encode_image_data_url(_image(6))])[0].token_ids) == 8
