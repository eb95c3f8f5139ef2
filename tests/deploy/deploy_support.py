"""Readers for deploy/: the kustomization (rendered by `kubectl kustomize`, or by a small
renderer of our own when kubectl is absent), the Dockerfile, env files, and the metric
series a real server exposes. No cluster and no Docker engine needed."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def yaml_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


# --- kustomize -------------------------------------------------------------------------------
def render_with_kubectl(directory: Path = K8S) -> list[dict] | None:
    """`kubectl kustomize directory`, parsed; None when kubectl is not on PATH."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return yaml_documents(done.stdout)


# What our renderer implements; anything else in the kustomization is an error, so that
# the fallback can never silently render something kubectl would render differently.
_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "labels",
    "namespace",
    "generatorOptions",
}
_GENERATOR_KEYS = {"name", "literals", "envs"}
_LABELS_KEYS = {"pairs", "includeTemplates", "includeSelectors"}
_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def render_kustomization(directory: Path = K8S) -> list[dict]:
    """Our own rendering of the kustomization in `directory`: its `resources` files,
    `configMapGenerator` (literals and envs, with kustomize's name hash and the
    references to it rewritten), `labels` and `namespace`."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - _KUSTOMIZATION_KEYS
    if unsupported:
        raise NotImplementedError(f"kustomization fields not rendered here: {unsupported}")
    objects: list[dict] = []
    for resource in spec.get("resources", []):
        objects += yaml_documents((directory / resource).read_text())

    hashed = not (spec.get("generatorOptions") or {}).get("disableNameSuffixHash", False)
    names: dict[str, str] = {}
    for generator in spec.get("configMapGenerator", []):
        unsupported = set(generator) - _GENERATOR_KEYS
        if unsupported:
            raise NotImplementedError(f"configMapGenerator fields: {unsupported}")
        data: dict[str, str] = {}
        for path in generator.get("envs", []):
            data.update(env_file(directory / path))
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            data[key] = value
        name = generator["name"]
        names[name] = f"{name}-{configmap_hash(data)}" if hashed else name
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": names[name]},
                "data": data,
            }
        )

    for entry in spec.get("labels", []):
        if set(entry) - _LABELS_KEYS or entry.get("includeSelectors"):
            raise NotImplementedError(f"labels entry not rendered here: {entry}")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and obj["kind"] in _POD_TEMPLATE_KINDS:
                template = obj["spec"]["template"].setdefault("metadata", {})
                template.setdefault("labels", {}).update(entry["pairs"])
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    for obj in objects:
        if obj["kind"] in _POD_TEMPLATE_KINDS:
            _rename_configmaps(obj["spec"]["template"]["spec"], names)
    return objects


def _rename_configmaps(pod: dict, names: dict[str, str]) -> None:
    """Point a pod spec's ConfigMap references at the generated (hashed) names."""

    def rename(ref: dict | None) -> None:
        if ref and ref.get("name") in names:
            ref["name"] = names[ref["name"]]

    for container in pod.get("initContainers", []) + pod.get("containers", []):
        for source in container.get("envFrom", []):
            rename(source.get("configMapRef"))
        for var in container.get("env", []):
            rename((var.get("valueFrom") or {}).get("configMapKeyRef"))
    for volume in pod.get("volumes", []):
        rename(volume.get("configMap"))


def configmap_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix for a generated ConfigMap (api/hasher: the sha256 of the
    JSON of kind, name and data, first 10 hex digits with 0 1 3 a e swapped for
    letters). kustomize v5 looks the name up under a key that never matches, so the
    name hashes as ""."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(char, escape)  # Go's json.Marshal escapes these
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, '#' comments and blank lines skipped: the subset of the format
    that kustomize's `envs` and compose's `env_file` read alike."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE")
        values[key] = value
    return values


def by_kind(objects: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def quantity_bytes(text: str | int) -> int:
    """A Kubernetes memory quantity ("1536Mi", "2G", "1073741824") in bytes."""
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text))
    assert match, f"unsupported quantity {text!r}"
    number, suffix = int(match.group(1)), match.group(2) or ""
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[suffix[:1]]
    return number * (1024 if suffix.endswith("i") else 1000) ** power


def compose_bytes(text: str | int) -> int:
    """A compose byte value ("1536m", "2g", 1073741824): binary units."""
    match = re.fullmatch(r"(\d+)([bkmg])?", str(text).lower())
    assert match, f"unsupported byte value {text!r}"
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b")


def compose_seconds(text: str | int) -> float:
    """A compose duration ("45s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), text
    return sum(float(n) * units[u] for n, u in parts)


# --- Dockerfile ------------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str  # upper case
    arguments: str
    line: int


def dockerfile(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile: comments dropped, continuations joined."""
    instructions = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and pending):
            continue  # comments (and blank lines) may sit inside a continuation
        if not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
        pending = ""
    assert not pending, "a continuation at the end of the Dockerfile"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form is an error (no shell may
    stand between the runtime's signals and the server)."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def env_instruction(arguments: str) -> dict[str, str]:
    """ENV KEY=VALUE ... (the modern form only)."""
    pairs = {}
    for token in shlex.split(arguments):
        key, sep, value = token.partition("=")
        assert sep, f"ENV {arguments!r}: use KEY=VALUE"
        pairs[key] = value
    return pairs


def healthcheck(arguments: str) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK [--option=value ...] CMD [...] -> (options, command)."""
    options, _, command = arguments.partition("CMD")
    return (
        dict(opt.lstrip("-").split("=", 1) for opt in options.split()),
        exec_form(command.strip()),
    )


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` exclude `path` (relative to the build context)
    or a directory above it: Go globs, ** for any number of directories, the last
    matching pattern wins, ! makes an exception."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = re.compile(_glob_regex(pattern.lstrip("!").strip("/")))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignore_patterns(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


# --- the server's metrics --------------------------------------------------------------------
def exposed_series() -> dict[str, tuple[str, frozenset[str]]]:
    """{series name: (family type, label names)} that a real server exposes after one
    health check and one run: histograms as _bucket/_sum/_count, counters as _total."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client.parser import text_string_to_metric_families

    from remat_server import ServerConfig, create_server
    from remat_server.engine import Metrics

    server, port = create_server(ServerConfig(host="127.0.0.1", port=0))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        server.metrics.observe_run(Metrics(forward_seconds=0.01, policy="store_all"))
        text = server.metrics.exposition().decode()
    finally:
        server.stop(None).wait()
    series: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            kind, labels = series.setdefault(sample.name, (family.type, set()))
            labels.update(sample.labels)
    return {name: (kind, frozenset(labels)) for name, (kind, labels) in series.items()}
