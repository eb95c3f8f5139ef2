"""deploy/ against the server it deploys: the Kubernetes manifests (rendered with
`kubectl kustomize`, and with our own renderer, which must agree), the compose file,
Prometheus' configuration, the Grafana dashboard and the Dockerfile. Ports, probes,
settings and metric names are checked against `remat serve`'s real flags and the
metrics a real server exposes. No cluster, no Docker engine: nothing is built."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    DEPLOY,
    K8S,
    ROOT,
    by_kind,
    compose_bytes,
    compose_seconds,
    dockerfile,
    dockerignore_patterns,
    dockerignored,
    env_file,
    env_instruction,
    exec_form,
    exposed_series,
    final_stage,
    healthcheck,
    quantity_bytes,
    render_kustomization,
    render_with_kubectl,
)

from remat.cli import build_parser as sdk_parser
from remat_server.service import memory_budget
from remat_server.service.flags import build_parser, serve_env_vars, server_config
from remat_server.service.serve import KILL_AFTER_GRACE

MiB = 1 << 20
# What a server process needs beyond its memory budget, graph cache and messages in
# flight: the interpreter, NumPy, SciPy and gRPC (~100 MiB idle) and allocator slack.
BASELINE_BYTES = 256 * MiB
REMAT_SERVICES = ("remat-1", "remat-2")
HEALTH_SERVICES = ("", "remat.v1.Executor")


def serve_args(argv: list[str], environ: dict[str, str]):
    """`remat serve ARGV` under `environ`, through the real parser (a usage error fails)."""
    try:
        return build_parser(environ).parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"remat serve {argv} with {environ} does not parse ({error})")


def memory_needed(args, limit: int) -> int:
    """What one `remat serve` needs at most in a container limited to `limit` bytes
    (the default budget is decided from that limit): per worker process, the budget of
    running requests' predicted peaks, the graph cache, idle upload buffers and one
    message per handler thread."""
    config = server_config(args, environ={})
    assert config.memory_budget_bytes != 0, "a memory limit needs a memory budget under it"
    config = dataclasses.replace(config, machine_memory_bytes=limit)
    config, _ = memory_budget.resolve(config, args.workers)
    per_worker = (
        config.memory_budget_bytes
        + config.graph_cache_bytes
        + config.compile_cache_bytes
        + config.buffer_pool_bytes
        + config.max_workers * config.max_message_bytes
    )
    return args.workers * per_worker + BASELINE_BYTES


# --- the image ----------------------------------------------------------------------------
@dataclass
class Image:
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    user: str
    exposed: set[int]
    health_options: dict[str, str]
    health: list[str]


@pytest.fixture(scope="module")
def image() -> Image:
    stage = final_stage(dockerfile(DEPLOY / "Dockerfile"))
    last = {ins.keyword: ins.arguments for ins in stage}  # the last of each counts
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            env.update(env_instruction(ins.arguments))
    options, health = healthcheck(last["HEALTHCHECK"])
    exposed = {
        int(port.split("/")[0])
        for ins in stage
        if ins.keyword == "EXPOSE"
        for port in ins.arguments.split()
    }
    return Image(
        env=env,
        entrypoint=exec_form(last["ENTRYPOINT"]),
        cmd=exec_form(last.get("CMD", "[]")),
        user=last["USER"],
        exposed=exposed,
        health_options=options,
        health=health,
    )


def image_serve_args(
    image: Image, extra_env: dict[str, str] | None = None, argv: list[str] | None = None
):
    assert image.entrypoint[:2] == ["remat", "serve"]
    env = {k: v for k, v in image.env.items() if k.startswith("REMAT_")}
    return serve_args(
        image.entrypoint[2:] + (image.cmd if argv is None else argv), {**env, **(extra_env or {})}
    )


def test_dockerfile_base_images_are_slim_python():
    froms = [
        ins.arguments.split()[0]
        for ins in dockerfile(DEPLOY / "Dockerfile")
        if ins.keyword == "FROM"
    ]
    assert froms and all(re.fullmatch(r"python:3\.\d+-slim", ref) for ref in froms), froms


def test_dockerfile_runs_as_a_numeric_non_root_user(image):
    uid, _, gid = image.user.partition(":")
    assert uid.isdigit() and int(uid) != 0, image.user
    assert not gid or (gid.isdigit() and int(gid) != 0), image.user


def test_image_serves_on_the_exposed_ports_on_every_interface(image):
    args = image_serve_args(image)
    assert args.host in ("0.0.0.0", "[::]", "::")
    assert image.exposed == {args.port, args.metrics_port}
    assert args.metrics_host is None  # metrics follow --host


def test_image_keeps_its_ports_when_flags_are_appended(image):
    """`docker run remat:latest --grace 30`: the arguments replace CMD only."""
    args = image_serve_args(image, argv=["--grace", "30"])
    assert (args.port, args.metrics_port, args.grace) == (50051, 9464, 30.0)


def test_healthcheck_asks_the_server_over_grpc_health(image):
    assert image.health[:2] == ["remat", "health"]
    health = sdk_parser().parse_args(image.health[1:])
    assert health.command == "health" and health.service in HEALTH_SERVICES
    host, _, port = health.target.rpartition(":")
    assert host in ("127.0.0.1", "localhost", "[::1]")
    assert int(port) == image_serve_args(image).port
    # The check must give up before Docker does.
    assert health.timeout < compose_seconds(image.health_options["timeout"])


def test_dockerfile_installs_the_package_from_the_context_without_pip_cache():
    instructions = dockerfile(DEPLOY / "Dockerfile")
    runs = " ".join(ins.arguments for ins in instructions if ins.keyword == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs), runs
    patterns = dockerignore_patterns(ROOT / ".dockerignore")
    copied = [
        source
        for ins in instructions
        if ins.keyword == "COPY" and not ins.arguments.startswith("--from")
        for source in ins.arguments.split()[:-1]
    ]
    # What `pip install .` reads: the project file, its readme, the package roots.
    pyproject = (ROOT / "pyproject.toml").read_text()
    roots = re.search(r"where = \[([^\]]*)\]", pyproject).group(1)
    needed = {
        "pyproject.toml",
        re.search(r'readme = "([^"]+)"', pyproject).group(1),
        *re.findall(r'"([^"]+)"', roots),
    }
    assert needed <= set(copied), sorted(needed - set(copied))
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f".dockerignore excludes {source}"
    assert not dockerignored("client/remat/v1/executor_pb2.py", patterns)  # committed stubs
    for junk in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/support.py",
        "client/remat/__pycache__/cli.cpython-311.pyc",
    ):
        assert dockerignored(junk, patterns), junk


# --- Kubernetes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    """The rendered manifests by kind: `kubectl kustomize deploy/k8s`, or without kubectl
    our own rendering (test_renderings_agree holds them equal where both run)."""
    return by_kind(render_with_kubectl() or render_kustomization())


def one(k8s, kind: str) -> dict:
    assert len(k8s.get(kind, [])) == 1, f"expected one {kind}, got {k8s.get(kind)}"
    return k8s[kind][0]


def container(k8s) -> dict:
    containers = one(k8s, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_environment(k8s, image: Image) -> dict[str, str]:
    """The pod's environment as the server sees it: the image's ENV, then envFrom (the
    ConfigMap), then env."""
    c = container(k8s)
    configmaps = {cm["metadata"]["name"]: cm.get("data", {}) for cm in k8s["ConfigMap"]}
    environ = {k: v for k, v in image.env.items() if k.startswith("REMAT_")}
    for source in c.get("envFrom", []):
        environ.update(configmaps[source["configMapRef"]["name"]])
    environ.update({var["name"]: var["value"] for var in c.get("env", []) if "value" in var})
    return environ


def pod_serve_args(k8s, image: Image):
    c = container(k8s)
    assert c.get("command") is None, "the image's entrypoint (remat serve) runs"
    return image_serve_args(image, pod_environment(k8s, image), argv=c.get("args", []))


def test_renderings_agree():
    """Our renderer is the fallback when kubectl is absent: it must render what
    kubectl does (the ConfigMap's hash suffix aside: it may change across versions)."""
    ours = render_kustomization()
    theirs = render_with_kubectl()
    if theirs is None:
        pytest.skip("kubectl is not on PATH")

    def normal(objects):
        text = json.dumps(objects, sort_keys=True)
        for cm in by_kind(objects)["ConfigMap"]:
            name = cm["metadata"]["name"]
            text = text.replace(f'"{name}"', f'"{name.rsplit("-", 1)[0]}-HASH"')
        return {(o["kind"], o["metadata"]["name"]): o for o in json.loads(text)}

    assert normal(ours) == normal(theirs)


def test_manifests_hold_the_expected_objects(k8s):
    names = {kind: sorted(o["metadata"]["name"] for o in objects) for kind, objects in k8s.items()}
    assert names.keys() == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    assert names["Service"] == ["remat-headless"]
    assert re.fullmatch(r"remat-config-[a-z0-9]{10}", names["ConfigMap"][0])  # hashed: rolls pods
    assert one(k8s, "Deployment")["spec"]["replicas"] == 2


def test_every_configmap_key_is_a_serve_flag_and_parses_like_it(k8s):
    env = serve_env_vars()
    data = one(k8s, "ConfigMap")["data"]
    assert set(data) <= set(env), sorted(set(data) - set(env))
    serve = build_parser({})
    flags = {a.option_strings[0]: a for a in serve._actions if a.option_strings}
    from_env = serve_args([], data)
    for var, value in sorted(data.items()):
        assert re.fullmatch(r"[A-Za-z0-9._:-]+", value), (var, value)  # no quoting rules
        action = flags[env[var]]
        switch = action.nargs == 0
        from_flag = serve_args(
            ([env[var]] if value.lower() in ("1", "true", "yes") else [])
            if switch
            else [env[var], value],
            {},
        )
        assert getattr(from_env, action.dest) == getattr(from_flag, action.dest), var


def test_the_configmap_is_the_env_file_compose_uses(k8s):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert one(k8s, "ConfigMap")["data"] == {
        k: v for path in generator.get("envs", []) for k, v in env_file(K8S / path).items()
    }
    for name in REMAT_SERVICES:
        files = [(DEPLOY / path).resolve() for path in compose()["services"][name]["env_file"]]
        assert files == [(K8S / path).resolve() for path in generator["envs"]], name


def test_container_ports_are_the_servers(k8s, image):
    args = pod_serve_args(k8s, image)
    assert args.host in ("0.0.0.0", "[::]", "::")
    ports = {p["name"]: p["containerPort"] for p in container(k8s)["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    annotations = one(k8s, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe", "startupProbe"])
def test_probes_are_grpc_health_checks_on_the_grpc_port(k8s, image, probe):
    spec = container(k8s).get(probe)
    if spec is None and probe == "startupProbe":
        pytest.skip("no startup probe")
    assert spec is not None, probe
    assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
    assert spec["grpc"]["port"] == pod_serve_args(k8s, image).port
    assert spec["grpc"].get("service", "") in HEALTH_SERVICES


def test_memory_limit_covers_the_budget_and_headroom(k8s, image):
    args = pod_serve_args(k8s, image)
    resources = container(k8s)["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    assert limit >= memory_needed(args, limit), (limit, memory_needed(args, limit))
    # Request = limit: a pod using what it may use is not the first evicted.
    assert quantity_bytes(resources["requests"]["memory"]) == limit
    assert "cpu" in resources["requests"]  # the autoscaler's utilization is of it


def test_termination_grace_outlasts_the_servers_drain(k8s, image):
    args = pod_serve_args(k8s, image)
    pod = one(k8s, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > args.grace + KILL_AFTER_GRACE


def test_connections_are_recycled_so_new_pods_get_traffic(k8s, image):
    config = server_config(pod_serve_args(k8s, image), environ={})
    assert 0 < config.max_connection_age_seconds <= 30 * 60
    assert config.max_connection_age_grace_seconds > 0


def test_pods_run_unprivileged_as_the_images_user(k8s, image):
    pod = one(k8s, "Deployment")["spec"]["template"]["spec"]
    security = {**pod.get("securityContext", {}), **container(k8s).get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == image.user.partition(":")[0]
    assert security["allowPrivilegeEscalation"] is False
    if security.get("readOnlyRootFilesystem"):  # then /tmp must be writable
        mounts = {m["mountPath"]: m["name"] for m in container(k8s).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]]


def test_no_service_link_variable_can_shadow_a_serve_flag(k8s):
    """Kubernetes injects <SERVICE>_PORT=tcp://... for each Service; `remat serve`
    reads REMAT_* variables. The pods opt out, and no Service of ours collides anyway."""
    assert one(k8s, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False
    env = serve_env_vars()
    for service in k8s["Service"]:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        for var in env:
            assert not var.startswith(prefix + "_PORT") and not var.startswith(
                prefix + "_SERVICE"
            ), (service["metadata"]["name"], var)


def test_selectors_match_the_pods(k8s):
    deployment = one(k8s, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return bool(selector) and selector.items() <= pod_labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(one(k8s, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(one(k8s, "Service")["spec"]["selector"])
    for constraint in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert selects(constraint["labelSelector"]["matchLabels"])
    target = one(k8s, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_autoscaler_and_disruption_budget_fit_together(k8s):
    hpa = one(k8s, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    replicas = one(k8s, "Deployment")["spec"]["replicas"]
    assert 1 <= spec["minReplicas"] <= replicas <= spec["maxReplicas"]
    assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"]
    # A node drain can always evict one pod and still keep minAvailable serving.
    assert one(k8s, "PodDisruptionBudget")["spec"]["minAvailable"] < spec["minReplicas"]


def test_headless_service_exposes_the_grpc_port(k8s, image):
    service = one(k8s, "Service")
    assert service["metadata"]["name"] == "remat-headless"
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container(k8s)["ports"]}
    grpc = ports["grpc"]
    assert grpc["port"] == pod_serve_args(k8s, image).port
    assert grpc["targetPort"] in ("grpc", container_ports["grpc"])
    for port in ports.values():  # every target is a port the container declares
        assert (
            port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
        )


def test_configmap_reference_and_image(k8s):
    c = container(k8s)
    refs = [s["configMapRef"]["name"] for s in c["envFrom"]]
    assert refs == [one(k8s, "ConfigMap")["metadata"]["name"]]
    images = {compose()["services"][name]["image"] for name in REMAT_SERVICES}
    assert images == {c["image"]}


# --- compose, Prometheus, Grafana ---------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_serve_args(name: str, image: Image):
    service = compose()["services"][name]
    environ = {}
    for path in service.get("env_file", []):
        environ.update(env_file(DEPLOY / path))
    environ.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    command = service.get("command")
    return image_serve_args(image, environ, argv=None if command is None else command)


def host_path(source: str) -> Path:
    return (DEPLOY / source).resolve()


def mounts(service: dict) -> dict[str, Path]:
    """{container path: host path} of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("."), f"expected a bind mount, got {volume}"
        assert host_path(source).exists(), volume
        out[target] = host_path(source)
    return out


def published(service: dict) -> dict[int, int]:
    """{host port: container port}."""
    pairs = (str(p).split(":")[-2:] for p in service.get("ports", []))
    return {int(host): int(inside) for host, inside in pairs}


def test_compose_services():
    services = compose()["services"]
    assert set(services) == {*REMAT_SERVICES, "prometheus", "grafana"}
    builds = [services[name]["build"] for name in REMAT_SERVICES]
    assert builds[0] == builds[1]  # one image
    assert host_path(builds[0]["context"]) == ROOT
    assert (ROOT / builds[0]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


@pytest.mark.parametrize("name, host_port", [("remat-1", 50051), ("remat-2", 50052)])
def test_compose_replicas_parse_and_publish_their_grpc_port(image, name, host_port):
    service = compose()["services"][name]
    args = compose_serve_args(name, image)
    assert published(service) == {host_port: args.port}
    assert compose_seconds(service["stop_grace_period"]) > args.grace + KILL_AFTER_GRACE
    limit = compose_bytes(service["mem_limit"])
    assert limit >= memory_needed(args, limit)
    assert "healthcheck" not in service  # the image's `remat health`


def test_prometheus_scrapes_every_replicas_metrics_port(image):
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_file = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    assert mounts(prometheus)[config_file] == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "remat"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {
        f"{name}:{compose_serve_args(name, image).metrics_port}" for name in REMAT_SERVICES
    }
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert published(prometheus) == {9090: 9090}
    for name in REMAT_SERVICES:
        assert prometheus["depends_on"][name]["condition"] == "service_healthy"


def grafana_provisioning() -> tuple[dict, dict]:
    root = DEPLOY / "grafana" / "provisioning"
    (datasources,) = (yaml.safe_load(p.read_text()) for p in (root / "datasources").glob("*.yaml"))
    (providers,) = (yaml.safe_load(p.read_text()) for p in (root / "dashboards").glob("*.yaml"))
    return datasources, providers


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "remat.json").read_text())


def test_grafana_provisions_prometheus_and_the_dashboard():
    grafana = compose()["services"]["grafana"]
    volumes = mounts(grafana)
    assert volumes["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    datasources, providers = grafana_provisioning()
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = providers["providers"]
    dashboards = volumes[provider["options"]["path"]]
    assert dashboards == DEPLOY / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (dashboards / home.rsplit("/", 1)[1]).is_file()
    assert published(grafana) == {3000: 3000}
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}


# --- the dashboard's PromQL against the real exposition -----------------------------------
@pytest.fixture(scope="module")
def series():
    return exposed_series()


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


METRIC = re.compile(r"\b(remat_[a-z0-9_]+)\b")
COUNTERISH = ("_total", "_count", "_sum", "_bucket")


def test_dashboard_has_the_panels_operators_need():
    text = {
        title: " ".join(e for t, e in dashboard_exprs() if t == title)
        for title, _ in dashboard_exprs()
    }
    wanted = {  # what the panel shows -> a fragment of its PromQL
        "requests by method": "sum by (method) (rate(remat_rpc_duration_seconds_count",
        "errors by method and code": 'code!="OK"',
        "latency by method": "histogram_quantile(0.99, sum by (le, method) "
        "(rate(remat_rpc_duration_seconds_bucket",
        "peak bytes by policy": "sum by (le, policy) (rate(remat_peak_bytes_bucket",
        "recompute seconds by policy": "sum by (policy) (rate(remat_recompute_seconds_sum",
        "forward seconds": "remat_forward_seconds",
        "backward seconds": "remat_backward_seconds",
        "queue time p99": "histogram_quantile(0.99, sum by (le) (rate(remat_queue_seconds_bucket",
        "in-flight requests": "remat_inflight_requests",
        "rejections by reason": "sum by (reason) (rate(remat_rejected_requests_total",
        "graph cache entries": "remat_graph_cache_entries",
        "graph cache bytes": "remat_graph_cache_bytes",
    }
    for what, fragment in wanted.items():
        assert any(fragment in exprs for exprs in text.values()), what


def test_dashboard_metrics_and_labels_exist_in_the_exposition(series):
    for title, expr in dashboard_exprs():
        names = set(METRIC.findall(expr))
        assert names, (title, expr)
        missing = names - set(series)
        assert not missing, f"{title}: {sorted(missing)} are not exposed: {expr}"
        labels = set().union(*(series[n][1] for n in names)) | {"instance", "job"}
        used = {
            label.strip()
            for group in re.findall(r"\bby \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        used |= set(re.findall(r"[{,]\s*([a-z_]+)\s*(?:=~|!~|!=|=)", expr))
        assert used <= labels, f"{title}: labels {sorted(used - labels)} do not exist: {expr}"


def test_dashboard_uses_rate_on_counters_and_quantiles_on_buckets(series):
    for title, expr in dashboard_exprs():
        rated = set(re.findall(r"\brate\((remat_[a-z0-9_]+)", expr))
        for name in METRIC.findall(expr):
            counterish = name.endswith(COUNTERISH) and series[name][0] in ("counter", "histogram")
            assert (name in rated) == counterish, f"{title}: rate() of {name}: {expr}"
        if "_bucket" in expr:
            assert "histogram_quantile(" in expr, (title, expr)
            for group in re.findall(r"\bby \(([^)]*)\)", expr):
                assert "le" in [label.strip() for label in group.split(",")], (title, expr)


def test_dashboard_layout():
    board = dashboard()
    panels = board["panels"]
    assert board["uid"] and len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"] for v in board.get("templating", {}).get("list", [])}
    for _, expr in dashboard_exprs():
        for var in re.findall(r"\$(?!__)([a-z_]+)", expr):
            assert var in variables, var


# --- promtool -----------------------------------------------------------------------------
def promtool() -> str | None:
    found = shutil.which("promtool")
    if found is None and os.environ.get("REMAT_REQUIRE_PROMTOOL") == "1":
        pytest.fail("promtool is not on PATH but REMAT_REQUIRE_PROMTOOL=1")
    return found


def test_promtool_accepts_the_prometheus_config():
    tool = promtool()
    if tool is None:
        pytest.skip("promtool is not installed")
    done = subprocess.run(
        [tool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each query as a recording rule: `promtool check rules` parses its PromQL."""
    tool = promtool()
    if tool is None:
        pytest.skip("promtool is not installed")
    rules = [
        {
            "record": f"remat:dashboard:{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$instance", ".*"),
        }
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
