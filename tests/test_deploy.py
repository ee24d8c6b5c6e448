"""Deployment files: Dockerfiles, docker-compose, Kubernetes manifests, Prometheus rules, Grafana dashboard.

No Docker engine and no cluster is needed. The checks run the tools that `.ci/install-deploy-tools`
installs: hadolint (Dockerfiles), check-jsonschema with its vendored compose-spec schema (compose file),
kubectl's kustomize (rendering), kubernetes-validate (the Kubernetes API schemas, offline), the
prometheus-operator models of cloudcoil (ServiceMonitor / PrometheusRule schemas, from the operator's
CRDs), and promtool and prometheus from Debian's `prometheus` package. A missing tool skips its test
with the reason, except under CI (env CI set), where it fails: CI must not go green without checking.

The last test starts a real Prometheus scraping a real `m2f serve` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "docker"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mask2former-serve.json"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
OVERLAYS = ("cpu", "gpu")
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
# Kubernetes versions the rendered manifests must be valid for: an older supported one and the newest
# kubernetes-validate knows.
K8S_VERSIONS = ("1.30", "latest")
DRAIN_TIMEOUT_S = 30  # the service's default M2F_REQUEST_TIMEOUT_S (the drain's bound), also set in the manifests

# The service's metrics (the contract with service/metrics.py); histograms by their base name.
COUNTERS = {"m2f_requests_total", "m2f_rejections_total"}
GAUGES = {"m2f_queue_depth", "m2f_inflight_requests", "m2f_ready", "m2f_model_info"}
HISTOGRAMS = {
    "m2f_request_duration_seconds",
    "m2f_queue_duration_seconds",
    "m2f_inference_duration_seconds",
    "m2f_postprocess_duration_seconds",
    "m2f_batch_size",
}
SERIES = COUNTERS | GAUGES | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")} | {"up"}

CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------------------------------ helpers
def missing(what: str) -> None:
    """Skip (a developer's machine without the tool) or fail (CI, where the tool must be installed)."""
    message = f"{what}; `bash .ci/install-deploy-tools` installs it"
    if CI:
        pytest.fail(f"{message} (CI is set, so a missing tool is a failure)")
    pytest.skip(message)


def tool(name: str) -> str:
    """Path of a command: first beside this interpreter (a virtual environment's bin), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        missing(f"`{name}` not found")
    return found


def module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module `{name}` not installed")


def run(cmd: list[str], timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def check(cmd: list[str], timeout: float = 120, cwd: Path = ROOT) -> str:
    result = run(cmd, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def promtool_check_exprs(exprs: list[str], tmp_path: Path) -> None:
    """Parse PromQL expressions with promtool, as recording rules in a throwaway rules file."""
    rules = {"groups": [{"name": "exprs", "rules": [{"record": f"check_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    check([tool("promtool"), "check", "rules", str(path)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- Dockerfiles
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by stage name (the last stage is the image)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            current = args.split()[-1] if " AS " in args.upper() else f"stage{len(result)}"
            result[current] = []
        if current is not None:
            result[current].append((keyword, args))
    return result


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    check([tool("hadolint"), "--no-color", str(DOCKER / name)])


def test_hadolint_reports_problems(tmp_path):
    """The linter really lints: an unpinned base image and pip install fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD python app.py\n")
    result = run([tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_image(name):
    path = DOCKER / name
    all_stages = stages(path)
    assert len(all_stages) >= 2, "multi-stage build expected"
    instructions = dockerfile_instructions(path)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instructions if k == "ARG" and "=" in a}
    for stage in all_stages.values():
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"base image not pinned: {image}"

    runtime_name, runtime = list(all_stages.items())[-1]
    assert runtime_name == "runtime"
    kinds = {k for k, _ in runtime}
    assert {"USER", "EXPOSE", "HEALTHCHECK", "CMD", "ENV"} <= kinds

    user = [a for k, a in runtime if k == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (Kubernetes runAsNonRoot checks it)"
    assert [a for k, a in runtime if k == "EXPOSE"] == ["8000"]

    cmd = [a for k, a in runtime if k == "CMD"][-1]
    assert json.loads(cmd) == ["m2f", "serve"], "exec-form CMD"
    healthcheck = [a for k, a in runtime if k == "HEALTHCHECK"][-1]
    hc_cmd = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert hc_cmd[-1] == "/opt/m2f/healthcheck.py"
    assert any("docker/healthcheck.py /opt/m2f/healthcheck.py" in a for k, a in runtime if k == "COPY")

    env = " ".join(a for k, a in runtime if k == "ENV")
    for setting in ("M2F_HOST=0.0.0.0", "M2F_MODEL=/opt/m2f/models/demo.onnx", "HOME=/tmp", "TMPDIR=/tmp"):
        assert setting in env, setting
    assert re.search(r"M2F_CACHE_DIR=/tmp/\S+", env)
    assert any("/models" in a for k, a in runtime if k == "RUN"), "the /models mount point"
    if name == "Dockerfile.cpu":
        # The demo model is the ONNX file shipped in the repository: no export (and no torch) in the build.
        assert ("COPY", "weights/demo/model.onnx /opt/m2f/models/demo.onnx") in runtime
        assert "export" not in all_stages
    else:
        assert any(k == "COPY" and "/opt/m2f/models/" in a and "--from=export" in a for k, a in runtime)
        # The demo model is exported at build time, the way the README documents it.
        export = " ".join(a for k, a in all_stages["export"] if k == "RUN")
        assert "m2f export onnx --weights weights/demo --output /opt/m2f/models/demo.onnx" in export
        assert "--dynamic-shape --dynamic-batch" in export
        assert "download.pytorch.org/whl/cpu" in export

    # Every COPY source from the build context exists.
    for keyword, arguments in instructions:
        if keyword == "COPY" and "--from=" not in arguments:
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} missing"


def pyproject_packages() -> list[str]:
    """The top-level packages pyproject's ``[tool.setuptools.packages.find] include`` lists."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in find["include"]})


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installing_stages_copy_every_package(name):
    """Every stage that pip-installs the project copies exactly the packages pyproject lists, one COPY each
    (`COPY pkg/ pkg/`): a package left out would be missing from the image (pip installs what the build
    context holds), and one pyproject no longer lists is a stale line."""
    packages = pyproject_packages()
    assert {"mask2former", "model_export", "runtimes", "service", "m2f"} <= set(packages)
    installing = {
        stage: instructions
        for stage, instructions in stages(DOCKER / name).items()
        if any(k == "RUN" and re.search(r"pip install [^&]*\"\.\[", a) for k, a in instructions)
    }
    assert installing, "no stage installs the project"
    for stage, instructions in installing.items():
        copies = [a.split() for k, a in instructions if k == "COPY" and "--from=" not in a]
        copied = [s.rstrip("/") for *sources, _ in copies for s in sources if (ROOT / s / "__init__.py").is_file()]
        assert sorted(copied) == packages, (
            f"{name} stage {stage} copies the packages {sorted(copied)}, pyproject.toml lists {packages}"
        )
        package_copies = [c for c in copies if c[0].rstrip("/") in packages]
        assert all(c == [f"{c[0].rstrip('/')}/"] * 2 for c in package_copies), f"one `COPY pkg/ pkg/` each: {copies}"


def test_cpu_image_has_no_torch():
    """Neither the image nor its build has torch (docker/smoke.sh checks the built image too)."""
    cpu = stages(DOCKER / "Dockerfile.cpu")
    assert list(cpu) == ["build", "runtime"]
    build = " ".join(a for k, a in cpu["build"] if k == "RUN")
    assert '".[serve]"' in build
    everything = " ".join(a for k, a in dockerfile_instructions(DOCKER / "Dockerfile.cpu"))
    assert "torch" not in everything and "download.pytorch.org" not in everything
    runtime = " ".join(a for k, a in cpu["runtime"] if k in ("RUN", "COPY"))
    assert "--from=build /opt/venv /opt/venv" in runtime


def test_gpu_image_stack():
    gpu = stages(DOCKER / "Dockerfile.gpu")
    assert gpu["runtime"][0][1].split()[0] == "${CUDA_IMAGE}"
    text = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvcr\.io/nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", text)
    build = " ".join(a for k, a in gpu["build"] if k == "RUN")
    # onnxruntime (CPU) must be removed before onnxruntime-gpu goes in: they share a package folder.
    assert build.index("uninstall -y onnxruntime") < build.index("onnxruntime-gpu==")
    for package in ('"torch==${TORCH_VERSION}"', "tensorrt-cu13==", ".[serve,torch]"):
        assert package in build
    assert "whl/cu130" in text
    env = " ".join(a for k, a in gpu["runtime"] if k == "ENV")
    assert "M2F_DEVICE=cuda" in env


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""

    def regex(pattern: str) -> re.Pattern:
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
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                out, i = out + pattern[i : j + 1], j + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = os.path.normpath(pattern.lstrip("!").strip("/"))
        if any(regex(body).match(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    needed = ["pyproject.toml", "README.md", "docker/healthcheck.py", "weights/demo/config.json"]
    needed += ["weights/demo/model.onnx"]  # the CPU image's demo model
    needed += [
        "pipeline/config.py",
        "model_export/cli.py",
        "runtimes/__init__.py",
        "service/__init__.py",
        "m2f/cli.py",
    ]
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} is needed by the images but ignored"
    unwanted = [".git/HEAD", ".venv/bin/python", "tests/test_deploy.py", "weights/train_demo.py"]
    unwanted += [
        "model.onnx",
        "models/your.onnx",
        "weights/demo/exported.onnx",
        "service/__pycache__/app.cpython-311.pyc",
        "docker/kubernetes/base/hpa.yaml",
    ]
    for path in unwanted:
        assert dockerignored(path, patterns), f"{path} should stay out of the build context"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1)])
def test_healthcheck_script(status, code):
    handler = type("Handler", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "M2F_PORT": str(server.server_address[1]), "HTTP_PROXY": "http://127.0.0.1:9"}
        result = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, timeout=30)
        assert result.returncode == code
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_script_nothing_listening():
    env = {**os.environ, "M2F_PORT": str(free_port())}
    assert subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, timeout=30).returncode == 1


# ------------------------------------------------------------------------------- the container smoke test
SHELL_SCRIPTS = ("docker/smoke.sh", ".ci/run", ".ci/install-deploy-tools")


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck(script):
    check([tool("shellcheck"), "--format=gcc", script])


def test_ci_runs_the_container_smoke_test():
    """docker/smoke.sh builds and serves the image in CI (it needs podman and minutes, so it is not a test here)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash docker/smoke.sh || smoke_rc=$?" in lines
    assert lines.index("bash docker/smoke.sh || smoke_rc=$?") < next(i for i, s in enumerate(lines) if "eval" in s)


def smoke_http():
    spec = importlib.util.spec_from_file_location("smoke_http", DOCKER / "smoke_http.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_comparison_ignores_only_timings():
    """The smoke test's comparison with the reference server: every field but the timings must be equal."""
    compare = smoke_http()
    assert compare.IGNORED_FIELDS == ("timings",)
    answer = {
        "width": 4,
        "task": "panoptic",
        "segments": [{"id": 1, "score": 0.5, "segmentation": {"size": [2, 2], "counts": "04"}}],
        "warnings": [],
    }
    assert compare.differences(answer, copy.deepcopy(answer)) == []
    for path, value in (("segments.0.segmentation.counts", "13"), ("segments.0.score", 0.500001), ("width", 5)):
        changed = copy.deepcopy(answer)
        *parents, last = path.split(".")
        node = changed
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
        (difference,) = compare.differences(answer, changed)
        assert last in difference
    assert compare.differences(answer, {**answer, "segments": []}) == [".segments: 1 vs 0 items"]
    assert compare.differences(answer, {**answer, "png": None}) == [".png: only in one answer"]


# ------------------------------------------------------------------------------------ docker-compose
def test_compose_schema():
    check([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")])


def test_compose_schema_rejects_typos(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  m2f:\n    image: x\n    read_olny: true\n")
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert result.returncode != 0 and "read_olny" in result.stdout


def test_compose_services():
    compose = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"m2f", "prometheus", "grafana"}

    m2f = services["m2f"]
    assert (ROOT / m2f["build"]["context"] / m2f["build"]["dockerfile"]).is_file()
    assert m2f["ports"] == ["${M2F_PUBLISH:-8000}:8000"]  # 8000 unless M2F_PUBLISH says otherwise
    assert m2f["read_only"] is True
    assert any(t.split(":")[0] == "/tmp" for t in m2f["tmpfs"])
    assert m2f["environment"]["M2F_HOST"] == "0.0.0.0"
    assert m2f["environment"]["M2F_CACHE_DIR"].startswith("/tmp/")
    assert any(v["target"] == "/models" for v in m2f["volumes"])
    assert m2f["healthcheck"]["test"] == ["CMD", "python", "/opt/m2f/healthcheck.py"]
    grace = re.fullmatch(r"(\d+)s", m2f["stop_grace_period"])
    assert grace and int(grace.group(1)) > int(m2f["environment"]["M2F_REQUEST_TIMEOUT_S"])

    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest")
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), f"{name} mounts {source}, which is missing"

    # Prometheus: the mounted folder holds its config, which scrapes the m2f service every 5 s.
    assert "./docker/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    config = load_yaml(PROM / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "m2f")
    assert job["static_configs"][0]["targets"] == ["m2f:8000"]
    assert job["scrape_interval"] == "5s"
    assert config["rule_files"] == ["alerts.yml"]

    # Grafana: the datasource points at the prometheus service, the dashboard provider at the mount.
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "mask2former-serve.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"


# -------------------------------------------------------------------------------------- Prometheus
def test_promtool_check_config():
    out = check([tool("promtool"), "check", "config", str(PROM / "prometheus.yml")])
    assert "SUCCESS" in out


def test_promtool_check_rules():
    out = check([tool("promtool"), "check", "rules", str(PROM / "alerts.yml")])
    assert "SUCCESS" in out


def test_promtool_rule_unit_tests():
    """docker/prometheus/alerts_test.yml: each alert fires on synthetic series when it should, only then."""
    out = check([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert "SUCCESS" in out


def rules_file() -> dict:
    return load_yaml(PROM / "alerts.yml")


def test_rules_cover_the_symptoms():
    groups = {g["name"]: g["rules"] for g in rules_file()["groups"]}
    records = {r["record"]: r["expr"] for r in groups["m2f.recording"]}
    alerts = {r["alert"]: r for r in groups["m2f.alerts"]}
    assert set(alerts) >= {"M2FHighErrorRatio", "M2FHighLatencyP95", "M2FQueueFullRejections", "M2FNotReady"}
    assert "M2FTargetDown" in alerts
    # Alerts on ratios and quantiles use the recording rules.
    for name in ("M2FHighErrorRatio", "M2FHighLatencyP95", "M2FQueueFullRejections"):
        used = [r for r in records if r in alerts[name]["expr"]]
        assert used, f"{name} should reference a recording rule"
    assert "histogram_quantile(0.95" in records["namespace_job:m2f_request_duration_seconds:p95_5m"]
    assert 'code=~"5.."' in records["namespace_job:m2f_request_errors:ratio_rate5m"]
    assert alerts["M2FQueueFullRejections"]["for"] == "10m"
    assert alerts["M2FNotReady"]["for"] == "5m"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("critical", "warning")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    # Only the service's own metrics (and `up`).
    for expr in [*records.values(), *(a["expr"] for a in alerts.values())]:
        for name in re.findall(r"\b(m2f_[a-z_]+|up)\b(?=[{\[)\s])", expr):
            assert name in SERIES, f"unknown metric {name} in {expr}"


def test_prometheusrule_equals_rules_file():
    """One source of truth: the Kubernetes PrometheusRule carries exactly docker/prometheus/alerts.yml."""
    rule = load_yaml(K8S / "base" / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == rules_file()["groups"]


# ------------------------------------------------------------------------------------------ Grafana
def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def substitute(expr: str, rate_interval: str = "1m", range_: str = "1h") -> str:
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    return expr.replace("$job", "m2f").replace("$instance", ".*")


def test_dashboard(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "mask2former-serve"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']} overlaps another"
        cells |= mine

    exprs = dashboard_exprs(dashboard)
    text = "\n".join(e for _, e in exprs)
    for name in re.findall(r"\b(m2f_[a-z_]+|up)\b(?=[{\[)\s])", text):
        assert name in SERIES, f"unknown metric {name}"
    # What the issue asks the dashboard to show.
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(m2f_request_duration_seconds_bucket" in text
    for needed in (
        "sum by (code) (rate(m2f_requests_total",
        'code=~"5.."',
        "m2f_queue_depth",
        "m2f_inflight_requests",
        "m2f_batch_size_sum",
        "m2f_batch_size_bucket",
        "m2f_inference_duration_seconds_bucket",
        "m2f_postprocess_duration_seconds_bucket",
        "sum by (reason) (rate(m2f_rejections_total",
        "m2f_ready",
    ):
        assert needed in text, needed
    # Every panel query is valid PromQL (Grafana's variables filled in).
    promtool_check_exprs([substitute(e) for _, e in exprs], tmp_path)


# ---------------------------------------------------------------------------------------- Kubernetes
_rendered: dict[str, list[dict]] = {}


def render(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        out = check([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)])
        _rendered[overlay] = [d for d in yaml.safe_load_all(out) if d]
    return _rendered[overlay]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds))
    return {d["kind"]: d for d in docs}


def strict_schema(node):
    """Forbid unknown fields wherever an object lists its fields (as kubernetes-validate's strict mode)."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict_schema(value)
    elif isinstance(node, list):
        for value in node:
            strict_schema(value)
    return node


def crd_validator(kind: str):
    """A JSON-schema validator for a prometheus-operator resource (monitoring.coreos.com/v1)."""
    jsonschema = module("jsonschema")
    models = module("cloudcoil.models.prometheus_operator.v1")
    schema = strict_schema(getattr(models, kind).model_json_schema(by_alias=True))
    return jsonschema.Draft202012Validator(schema)


CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def validate_manifest(doc: dict) -> list[str]:
    if doc["kind"] in CRD_KINDS:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        return [f"{e.json_path}: {e.message}" for e in crd_validator(doc["kind"]).iter_errors(doc)]
    utils = module("kubernetes_validate.utils")
    errors = []
    for version in K8S_VERSIONS:
        version = utils.latest_version() if version == "latest" else version
        try:
            utils.validate(doc, version, strict=True)
        except utils.ValidationError as e:
            errors.append(f"{version}: {e.message} at {list(e.path)}")
    return errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_manifests_validate(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} | CRD_KINDS
    assert kinds == expected
    for doc in docs:
        errors = validate_manifest(doc)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']} ({overlay}):\n" + "\n".join(errors)


def test_kubernetes_validation_catches_mistakes():
    """The validators really validate: a misspelt field and a wrong type are caught."""
    docs = by_kind(render("cpu"))
    deployment = copy.deepcopy(docs["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert validate_manifest(deployment)
    deployment = copy.deepcopy(docs["Deployment"])
    deployment["spec"]["replicas"] = "two"
    assert validate_manifest(deployment)
    monitor = copy.deepcopy(docs["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert validate_manifest(monitor)
    rule = copy.deepcopy(docs["PrometheusRule"])
    rule["spec"]["groups"][1]["rules"][0]["for"] = "five minutes"
    assert validate_manifest(rule)


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


def seconds(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_deployment(overlay):
    docs = by_kind(render(overlay))
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    c = container(deployment)
    env = env_of(deployment)

    # Probes sized for slow model loading.
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz" and seconds(c["startupProbe"]) >= 600
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(env["M2F_PORT"])} and env["M2F_HOST"] == "0.0.0.0"

    # Termination: preStop, then the drain, both inside the grace period.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env["M2F_REQUEST_TIMEOUT_S"])
    assert drain == DRAIN_TIMEOUT_S
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain

    # Hardening: non-root, read-only root, no capabilities, default seccomp, a writable /tmp.
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert env["HOME"].startswith("/tmp") and env["M2F_CACHE_DIR"].startswith("/tmp/")
    for key in ("cpu", "memory"):
        assert key in c["resources"]["requests"] and key in c["resources"]["limits"]

    # Service, PDB and ServiceMonitor select these pods / this Service.
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    # job="m2f" (what the alert rules select) comes from the Service label named by jobLabel.
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "m2f"

    image = c["image"]
    assert image.endswith(f":{overlay}")
    if overlay == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert env["M2F_DEVICE"] == "cuda" and env["M2F_MODEL"].endswith(".onnx")  # ONNX Runtime
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
        assert pod["spec"]["nodeSelector"]
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert "M2F_DEVICE" not in env


def adapter_rule() -> dict:
    (rule,) = load_yaml(ADAPTER_VALUES)["rules"]["custom"]
    return rule


def adapter_query(rule: dict, label_matchers: str, group_by: str) -> str:
    """The PromQL prometheus-adapter sends for `rule`, with its template filled in."""
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    query = rule["metricsQuery"]
    for key, value in (("Series", series), ("LabelMatchers", label_matchers), ("GroupBy", group_by)):
        query = query.replace(f"<<.{key}>>", value)
    assert "<<" not in query
    return query


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_metric_is_exposed_by_the_adapter(overlay, tmp_path):
    hpa = by_kind(render(overlay))["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "m2f"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"

    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"
    series = re.match(r"\w+", rule["seriesQuery"]).group(0)
    assert series in SERIES
    query = adapter_query(rule, 'namespace="default",pod=~"m2f-abc|m2f-def"', "pod")
    promtool_check_exprs([query], tmp_path)


# ------------------------------------------------------------ Prometheus scraping a running service
def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict | None = None, stop_timeout: float = 45):
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def wait_for(what: str, probe, timeout: float, logs: list[Path] = (), interval: float = 0.5):
    """Call probe() until it returns something truthy; fail with the logs after `timeout` seconds."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = probe()
        except (OSError, ValueError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\n{tails}")


def png_bytes(size: tuple[int, int] = (96, 64)) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (90, 140, 200))
    ImageDraw.Draw(image).ellipse((20, 10, 60, 50), fill=(200, 60, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.skipif(
    importlib.util.find_spec("service") is None or importlib.util.find_spec("service.app") is None,
    reason="service.app (`m2f serve`) is not there yet",
)
def test_prometheus_scrapes_running_service(tmp_path):
    prometheus = tool("prometheus")
    server_log, prom_log = tmp_path / "m2f.log", tmp_path / "prometheus.log"
    logs = [server_log, prom_log]
    port, prom_port = free_port(), free_port()
    base, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"

    def query(expr: str) -> list[dict]:
        status, body = http(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def value(expr: str) -> float | None:
        result = query(expr)
        if not result:
            return None
        (sample,) = result
        v = float(sample["value"][1])
        return v if math.isfinite(v) else None

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "m2f",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    server_cmd = [sys.executable, "-m", "m2f.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server_env = {**os.environ, "PYTHONUNBUFFERED": "1", "M2F_LOG_LEVEL": "warning", "M2F_REQUEST_TIMEOUT_S": "5"}
    prom_cmd = [
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    with process(server_cmd, server_log, env=server_env) as server, process(prom_cmd, prom_log) as prom_proc:

        def ready() -> bool:
            for proc, name in ((server, "m2f serve"), (prom_proc, "prometheus")):
                assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n" + "\n".join(
                    p.read_text(errors="replace")[-3000:] for p in logs
                )
            return http(f"{base}/readyz", timeout=5)[0] == 200 and http(f"{prom}/-/ready", timeout=5)[0] == 200

        wait_for("m2f serve and Prometheus to be ready", ready, timeout=240, logs=logs)

        image = png_bytes()
        headers = {"Content-Type": "image/png"}

        def segment() -> float:
            started = time.monotonic()
            status, body = http(f"{base}/v1/segment", data=image, headers=headers)
            assert status == 200, body[:500]
            assert "segments" in json.loads(body)
            return time.monotonic() - started

        # A first request creates the per-task series; Prometheus must see them before the rest, so that
        # rate() over the window sees the counters grow.
        latencies = [segment()]
        wait_for(
            "the first request in Prometheus",
            lambda: value('sum(m2f_requests_total{job="m2f", code="200"})') == 1,
            timeout=30,
            logs=logs,
        )
        latencies += [segment() for _ in range(3)]
        threads = [threading.Thread(target=lambda: latencies.append(segment())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(latencies) == 8
        status, _ = http(f"{base}/v1/segment", data=b"not an image", headers={"Content-Type": "text/plain"})
        assert status == 415

        # The request counter, exactly.
        wait_for(
            "all requests counted",
            lambda: (
                value('sum(m2f_requests_total{job="m2f", code="200"})') == 8
                and value('sum(m2f_requests_total{job="m2f", code="415"})') == 1
            ),
            timeout=30,
            logs=logs,
        )
        rejected = value('sum(m2f_rejections_total{job="m2f", reason="unsupported_media_type"})')
        assert rejected == 1

        # p95 request latency from the histogram: positive and no more than the bucket above the slowest
        # request the client saw (the quantile interpolates inside a bucket).
        p95 = wait_for(
            "a p95 latency",
            lambda: value(
                'histogram_quantile(0.95, sum by (le) (rate(m2f_request_duration_seconds_bucket{job="m2f"}[30s])))'
            ),
            timeout=30,
            logs=logs,
        )
        buckets = [float(s["metric"]["le"]) for s in query('m2f_request_duration_seconds_bucket{job="m2f"}')]
        assert 0 < p95 <= min(b for b in buckets if b >= max(latencies)), (p95, latencies)

        # The HPA metric, as prometheus-adapter asks for it (pod -> instance here, no namespace).
        hpa = wait_for(
            "the HPA metric",
            lambda: query(adapter_query(adapter_rule(), 'job="m2f"', "instance")),
            timeout=30,
            logs=logs,
        )
        (sample,) = hpa
        queued = float(sample["value"][1])
        assert math.isfinite(queued) and 0 <= queued < 256, queued  # 256: the most admitted (service.state.MAX_JOBS)

        # The recording rules evaluate, and no alert fires on a healthy service.
        ratio = wait_for(
            "the error-ratio recording rule",
            lambda: query('namespace_job:m2f_request_errors:ratio_rate5m{job="m2f"}'),
            timeout=30,
            logs=logs,
        )
        assert float(ratio[0]["value"][1]) == 0  # only 200 and 415 answers: no 5xx
        p95_rule = wait_for(
            "the p95 recording rule",
            lambda: value('namespace_job:m2f_request_duration_seconds:p95_5m{job="m2f"}'),
            timeout=30,
            logs=logs,
        )
        assert 0 < p95_rule < 60
        assert value('m2f_ready{job="m2f"}') == 1
        status, body = http(f"{prom}/api/v1/rules", timeout=10)
        groups = json.loads(body)["data"]["groups"]
        assert {g["name"] for g in groups} == {"m2f.recording", "m2f.alerts"}
        unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert not unhealthy
        assert not query('ALERTS{alertstate="firing"}')

        # Every dashboard query runs against the real Prometheus; the traffic panels have data.
        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for title, expr in dashboard_exprs(dashboard):
            if not query(substitute(expr, rate_interval="30s", range_="5m")):
                empty.append(title)
        for title in (
            "Request rate",
            "Latency p95",
            "Request latency",
            "Inference vs post-processing",
            "Ready replicas",
        ):
            assert title not in empty, f"dashboard panel {title!r} has no data"
