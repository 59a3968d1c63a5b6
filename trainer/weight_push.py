"""The learner's end of the weight push to the rollout server: files (any machine), CUDA IPC (same GPU), NCCL.

    from trainer.weight_push import choose_transport
    transport = choose_transport(cfg, learner_device, client.info(), out_dir=run_dir)
    transport.init(client)                                   # once
    stats = transport.push(model.named_parameters(), version=step)

The sending side only: it talks to the server through vllm_server/client.py (the server's receiving side is
vllm_server/engine.py), and the client never imports this module.

A push is one control message (POST /weights, suzak.wire.WeightUpdateRequest) per bucket, never one per tensor;
the tensors travel on the transport's own data plane. The server pauses generation and clears its caches around
every push, so no completion mixes weights and each carries the version it was made with.
- FilesTransport: safetensors shards (bucket_mb each) written atomically into a folder both sides can read; the
  server reloads them in place (vLLM's reload_weights). Works on CPU and across machines with a shared disk.
- IPCTransport: CUDA IPC handles (torch reduce_tensor), pickled + base64 in the update_info format of vLLM's IPC
  weight-transfer engine. Unpacked (default): one message holding a handle per tensor, no copy of contiguous
  tensors. Packed: tensors copied into a bucket_mb buffer, one message per filled bucket. Needs the learner on
  the server's GPU. Pickled handles run code when unpickled: internal networks only.
- NCCLTransport: vLLM's nccl weight-transfer backend; the learner is rank 0 of a 2-rank NCCL group and
  broadcasts while the server receives. It needs vLLM in the learner's environment for PyNcclCommunicator
  (imported inside this class only).
IPC and NCCL (and the unpacked modes) hold every tensor yielded by `named_tensors` until the push returns: pass
live parameters (no dtype conversion) to avoid a full copy, and do not modify them until push() returns.
Never imports vLLM at module level (only NCCLTransport does, inside); torch is imported inside the functions too.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from suzak import wire
from suzak.errors import SuzakError

if TYPE_CHECKING:
    import torch

    from suzak.config import RunConfig
    from vllm_server.client import RolloutClient

log = logging.getLogger("suzak.transport")
MIB = 1 << 20
VERSION_DIR = re.compile(r"^v(\d+)$")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).split(".")[-1]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class WeightTransport(ABC):
    """Moves (name, tensor) pairs with HF checkpoint names into a running rollout server."""

    name = "base"

    def __init__(self) -> None:
        self.client: RolloutClient | None = None

    def init(self, client: RolloutClient) -> None:
        """Bind to a server (and set up the data plane); call once before the first push."""
        self.client = client

    @abstractmethod
    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict:
        """Load these weights into the server as policy `version`; returns stats (bytes, seconds, ...)."""

    def _client(self) -> RolloutClient:
        if self.client is None:
            raise SuzakError(f"{type(self).__name__}.push before init(client): call transport.init(client) first")
        return self.client

    def _send(self, version: int, *, path: str | None = None, payload: dict | None = None, begin: bool = True,
              end: bool = True) -> wire.WeightUpdateResponse:
        req = wire.WeightUpdateRequest(version=version, transport=self.name, path=path, payload=payload,
                                       begin=begin, end=end)
        return self._client().update_weights(req)


# --------------------------------------------------------------------------- files


class FilesTransport(WeightTransport):
    """safetensors shards in `folder`/v<version>, written to a temporary folder and renamed into place."""

    name = "files"

    def __init__(self, folder: str | Path, bucket_mb: int = 1024, keep_last: int = 1):
        super().__init__()
        self.folder = Path(folder)
        self.bucket_bytes = max(1, bucket_mb) * MIB
        self.keep_last = max(1, keep_last)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict:
        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version:06d}-", dir=self.folder))
        final = self.folder / f"v{version:06d}"
        try:
            shards, tensors, nbytes = self._write(named_tensors, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)  # the server never sees a half-written version
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        written = time.perf_counter()
        resp = self._send(version, path=str(final.resolve()))
        self._prune(final)
        return {"transport": self.name, "version": resp.policy_version, "tensors": tensors, "bytes": nbytes,
                "shards": shards, "write_s": written - start, "server_s": resp.seconds,
                "server_timings": resp.timings, "total_s": time.perf_counter() - start}

    def _write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], out: Path) -> tuple[int, int, int]:
        from safetensors.torch import save_file

        bucket: dict[str, Any] = {}
        size = shards = tensors = nbytes = 0
        seen: set[str] = set()
        for name, tensor in named_tensors:
            if name in seen:
                raise SuzakError(f"weight '{name}' was given twice in one push")
            seen.add(name)
            # An independent copy: tied weights share storage, which safetensors refuses to save.
            cpu = tensor.detach().to("cpu", copy=True).contiguous()
            if bucket and size + _nbytes(cpu) > self.bucket_bytes:
                save_file(bucket, str(out / f"model-{shards:05d}.safetensors"))
                shards, nbytes, bucket, size = shards + 1, nbytes + size, {}, 0
            bucket[name] = cpu
            size += _nbytes(cpu)
            tensors += 1
        if bucket:
            save_file(bucket, str(out / f"model-{shards:05d}.safetensors"))
            shards, nbytes = shards + 1, nbytes + size
        if tensors == 0:
            raise SuzakError("no weights to push: named_tensors was empty")
        return shards, tensors, nbytes

    def _prune(self, keep: Path) -> None:
        versions = sorted((int(m.group(1)), p) for p in self.folder.iterdir()
                          if p.is_dir() and (m := VERSION_DIR.match(p.name)) and p != keep)
        for _, old in versions[: max(0, len(versions) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- CUDA IPC


def gpu_uuid(device) -> str:
    """The physical GPU's UUID as vLLM keys IPC handles (str of torch's device properties uuid)."""
    import torch

    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def _norm_uuid(u: str) -> str:
    return u.lower().removeprefix("gpu-")


def _pickled(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode("ascii")


class _PackedChunk:
    """Tensors copied back to back into one IPC-shared uint8 buffer (the layout vLLM's packed consumer reads)."""

    def __init__(self, buffer: torch.Tensor, handle: tuple):
        self.buffer, self.handle, self.used = buffer, handle, 0
        self.names: list[str] = []
        self.dtype_names: list[str] = []
        self.shapes: list[list[int]] = []
        self.sizes: list[int] = []

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.buffer.numel()

    def add(self, name: str, tensor: torch.Tensor, flat: torch.Tensor) -> None:
        if self.used % tensor.element_size():
            # vLLM views each slice of the buffer as its dtype in place, which needs an aligned offset.
            raise SuzakError(f"packed ipc: '{name}' ({tensor.dtype}) would start at byte {self.used}, not a multiple "
                             f"of {tensor.element_size()}: push one dtype at a time or use IPCTransport(packed=False)")
        self.buffer[self.used: self.used + flat.numel()].copy_(flat)
        self.used += flat.numel()
        self.names.append(name)
        self.dtype_names.append(_dtype_name(tensor))
        self.shapes.append(list(tensor.shape))
        self.sizes.append(flat.numel())

    def payload(self, uuid: str) -> dict:
        return {"names": self.names, "dtype_names": self.dtype_names, "shapes": self.shapes,
                "tensor_sizes": self.sizes, "ipc_handles_pickled": _pickled({uuid: self.handle}), "packed": True}


class IPCTransport(WeightTransport):
    """CUDA IPC into a vLLM server on the same physical GPU (server.transport=ipc or auto on CUDA)."""

    name = "ipc"

    def __init__(self, packed: bool = False, bucket_mb: int = 1024):
        super().__init__()
        self.packed = packed
        self.bucket_bytes = max(1, bucket_mb) * MIB

    def init(self, client: RolloutClient) -> None:
        import torch

        if not torch.cuda.is_available():
            raise SuzakError("the ipc transport needs CUDA; on CPU use server.transport=files")
        super().init(client)
        # vLLM 0.32 fixes packed/unpacked at init; the server adapts this for 0.26.
        client.init_transport(wire.TransportInitRequest(transport="ipc", init_info={"packed": self.packed}))

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict:
        import torch

        start = time.perf_counter()
        self._client()
        stats = self._push_packed(named_tensors, version) if self.packed else \
            self._push_unpacked(named_tensors, version)
        torch.cuda.ipc_collect()  # release the IPC-shared blocks the server has closed
        stats.update(transport=self.name, packed=self.packed, total_s=time.perf_counter() - start)
        return stats

    def _push_unpacked(self, named_tensors, version: int) -> dict:
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        names, dtype_names, shapes, handles, refs = [], [], [], [], []
        uuid = None
        for name, tensor in named_tensors:
            weight = self._check_cuda(name, tensor).detach()
            weight = weight if weight.is_contiguous() else weight.contiguous()
            uuid = uuid or gpu_uuid(weight.device)
            refs.append(weight)  # reduce_tensor does not keep the storage alive: these refs do, until the reply
            names.append(name)
            dtype_names.append(_dtype_name(weight))
            shapes.append(list(weight.shape))
            handles.append({uuid: reduce_tensor(weight)[1]})
        if not names:
            raise SuzakError("no weights to push: named_tensors was empty")
        torch.cuda.synchronize(refs[0].device)
        payload = {"names": names, "dtype_names": dtype_names, "shapes": shapes,
                   "ipc_handles_pickled": _pickled(handles), "packed": False}
        resp = self._send(version, payload=payload)
        return {"version": resp.policy_version, "tensors": len(names), "bytes": sum(_nbytes(r) for r in refs),
                "chunks": 1, "server_s": resp.seconds, "server_timings": resp.timings}

    def _push_packed(self, named_tensors, version: int) -> dict:
        import torch

        sent = {"chunks": 0, "tensors": 0, "bytes": 0, "server_s": 0.0}
        bucket: tuple | None = None  # (buffer, handle), reused by every chunk of this push
        chunk: _PackedChunk | None = None
        uuid = None
        for name, tensor in named_tensors:
            tensor = self._check_cuda(name, tensor).detach()
            uuid = uuid or gpu_uuid(tensor.device)
            flat = tensor.contiguous().view(-1).view(torch.uint8)
            if chunk is not None and not chunk.fits(flat.numel()):
                self._send_chunk(chunk, uuid, version, sent, end=False)
                chunk = None
            if chunk is None:
                if flat.numel() > self.bucket_bytes:
                    # An oversize tensor (7B's embeddings exceed 1 GiB) travels alone in a buffer of its size.
                    chunk = _PackedChunk(*self._shared_buffer(flat.numel(), tensor.device))
                else:
                    bucket = bucket or self._shared_buffer(self.bucket_bytes, tensor.device)
                    chunk = _PackedChunk(*bucket)
            chunk.add(name, tensor, flat)
        if chunk is None:
            raise SuzakError("no weights to push: named_tensors was empty")
        resp = self._send_chunk(chunk, uuid, version, sent, end=True)
        sent["version"] = resp.policy_version
        return sent

    @staticmethod
    def _shared_buffer(nbytes: int, device) -> tuple:
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buffer, reduce_tensor(buffer)[1]

    def _send_chunk(self, chunk: _PackedChunk, uuid: str, version: int, sent: dict, *, end: bool):
        import torch

        torch.cuda.current_stream(chunk.buffer.device).synchronize()  # the copies must land before the server reads
        resp = self._send(version, payload=chunk.payload(uuid), begin=sent["chunks"] == 0, end=end)
        sent["chunks"] += 1
        sent["tensors"] += len(chunk.names)
        sent["bytes"] += chunk.used
        sent["server_s"] += resp.seconds
        timings = sent.setdefault("server_timings", {})
        for key, value in resp.timings.items():
            timings[key] = timings.get(key, 0.0) + value
        return resp

    @staticmethod
    def _check_cuda(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cuda":
            raise SuzakError(f"ipc transport: weight '{name}' is on {tensor.device}, not a CUDA GPU; "
                             "use server.transport=files for CPU learners")
        return tensor


# --------------------------------------------------------------------------- NCCL


class NCCLTransport(WeightTransport):
    """vLLM's nccl weight-transfer backend: the learner (rank 0) broadcasts while the server's worker receives."""

    name = "nccl"

    def __init__(self, master_address: str | None = None, master_port: int = 29555, packed: bool = True,
                 bucket_mb: int = 1024, num_buffers: int = 2, device=None):
        super().__init__()
        self.device = device
        """The learner's GPU (default: the current CUDA device); NCCL refuses two ranks on one GPU."""
        self.master_address = master_address or os.environ.get("SUZAK_NCCL_ADDRESS", "127.0.0.1")
        self.master_port = master_port
        self.packed = packed
        self.bucket_bytes = max(1, bucket_mb) * MIB
        self.num_buffers = num_buffers
        self.group = None

    def init(self, client: RolloutClient) -> None:
        import torch

        try:  # the one vLLM import of the learner side: its NCCL communicator over a stateless group
            from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group
        except ImportError as e:
            raise SuzakError(f"the nccl transport needs vLLM in the learner's environment ({e}); put the learner on "
                             "the server's GPU (ipc) or use server.transport=files") from None
        super().init(client)
        init_info = {"master_address": self.master_address, "master_port": self.master_port, "world_size": 2,
                     "packed": self.packed, "packed_buffer_size_bytes": self.bucket_bytes,
                     "packed_num_buffers": self.num_buffers}
        req = wire.TransportInitRequest(transport="nccl", init_info=init_info)
        self.device = torch.device(self.device if self.device is not None else torch.cuda.current_device())
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with ThreadPoolExecutor(max_workers=1) as pool, torch.cuda.device(self.device):
            # The server's worker blocks in the rendezvous until this rank joins: both must run at once.
            future = pool.submit(client.init_transport, req)
            self.group = stateless_init_process_group(self.master_address, self.master_port, 0, 2,
                                                      self.device.index)
            future.result()

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict:
        import torch

        if self.group is None:
            raise SuzakError("NCCLTransport.push before init(client)")
        start = time.perf_counter()
        items = [(name, t.detach()) for name, t in named_tensors]  # the server needs all metadata first
        payload = {"names": [n for n, _ in items], "dtype_names": [_dtype_name(t) for _, t in items],
                   "shapes": [list(t.shape) for _, t in items]}
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            future = pool.submit(self._send, version, payload=payload)
            with torch.cuda.device(self.device):  # the producer's streams belong to the current device
                self._broadcast(items)
                torch.cuda.synchronize()
            resp = future.result()
        finally:
            # Never join here: after a failed broadcast the server's receive never returns.
            pool.shutdown(wait=False)
        return {"transport": self.name, "version": resp.policy_version, "tensors": len(items),
                "bytes": sum(_nbytes(t) for _, t in items), "server_s": resp.seconds,
                "server_timings": resp.timings, "total_s": time.perf_counter() - start}

    def _broadcast(self, items: list) -> None:
        import torch

        if self.packed:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(iterator=iter(items), group=self.group, src=0,
                                           post_iter_func=lambda item: item[1],
                                           buffer_size_bytes=self.bucket_bytes, num_buffers=self.num_buffers)
            return
        stream = torch.cuda.current_stream()
        for _, tensor in items:
            self.group.broadcast(tensor if tensor.is_contiguous() else tensor.contiguous(), src=0, stream=stream)


# --------------------------------------------------------------------------- choice


def choose_transport(cfg: RunConfig, learner_device, server_info: wire.ModelInfo, *,
                     out_dir: str | Path | None = None) -> WeightTransport:
    """The transport for cfg.server.transport; auto: ipc on the server's GPU, nccl for another GPU, files on CPU.

    Files go to <out_dir or cfg.out_dir>/weights_push, which the server must be able to read.
    """
    import torch

    srv = cfg.server
    device = torch.device(learner_device)
    offered = server_info.transports
    same_gpu = device.type == "cuda" and _norm_uuid(gpu_uuid(device)) in {_norm_uuid(u) for u in server_info.gpu_uuids}
    mode = srv.transport
    if mode == "auto":
        if device.type != "cuda":
            mode = "files"
        elif "ipc" in offered and same_gpu:
            mode = "ipc"
        elif "nccl" in offered:
            mode = "nccl"
        else:
            mode = "files"
            log.warning("learner on %s, server offers %s: pushing weights through files (slow); start the server "
                        "with server.transport=nccl for a learner on another GPU", device, offered)
    elif mode not in offered:
        raise SuzakError(f"server.transport={mode}, but the server offers {offered}: restart it with "
                         f"server.transport={mode} (ipc/nccl need a CUDA GPU) or use files")
    if mode == "ipc" and not same_gpu:
        raise SuzakError(f"server.transport=ipc needs the learner on the server's GPU {server_info.gpu_uuids}, but it "
                         f"is on {device}: use nccl (another GPU) or files")
    log.info("weight transport: %s", mode)
    if mode == "ipc":
        return IPCTransport(packed=False, bucket_mb=srv.bucket_mb)
    if mode == "nccl":
        return NCCLTransport(master_port=srv.nccl_port, bucket_mb=srv.bucket_mb, device=device)
    return FilesTransport(Path(out_dir or cfg.out_dir) / "weights_push", bucket_mb=srv.bucket_mb)
