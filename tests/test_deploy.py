"""deploy/: the compose file and the Kubernetes manifests validate offline, and agree with each other and the code.

- ``docker-compose -f deploy/compose.yaml config -q`` (Debian's docker-compose; under CI=true a missing one
  fails, never skips), with a broken copy as the positive control;
- every Kubernetes manifest against the schemas that kubernetes-validate ships (no cluster, no network), strictly
  (unknown fields refused) and for every kind (the CLI only warns on a kind it has no schema for);
- consistency: every ``MEDGATE_*`` variable the files set is a setting the loader accepts, with its value; ports,
  service names and URLs line up; probes ask the container's own port; mounted files lie under a mount;
- deploy/healthcheck.py, which the probes run, against a real review service over TLS.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.review.server import ReviewServer
from services.settings import ENV_PREFIX, SettingsError, load_settings
from tests.conftest import Clients, security_values

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
HEALTHCHECK = "/app/deploy/healthcheck.py"
# The oldest Kubernetes the manifests are meant for and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.28.0", "latest")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _require(tool: str) -> str:
    """The path of ``tool``: skipped without it here, failed without it in CI (its check must run there)."""
    path = shutil.which(tool) or (shutil.which(tool, path=str(Path(sys.executable).parent)))
    if path is None:
        message = f"{tool} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    return path


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(KUBERNETES.glob("*.yaml")) for doc in _documents(path)]


def _find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in _manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _container(deployment: str) -> dict[str, Any]:
    (container,) = _find("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def _port(container: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name))


def _plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


# --- offline validation --------------------------------------------------------------------------------------------


def test_compose_file_validates() -> None:
    compose = _require("docker-compose")
    done = subprocess.run([compose, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_compose_validation_catches_a_mistake(tmp_path: Path) -> None:
    """The positive control: the same check refuses a compose file with a misspelt service key."""
    compose = _require("docker-compose")
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    done = subprocess.run([compose, "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "healthchek" in done.stderr


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        if IN_CI:
            pytest.fail("CI=true but kubernetes-validate is not installed (the dev extra)")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return kubernetes_validate


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    validator = _validator()
    from kubernetes_validate import utils

    target = utils.latest_version() if version == "latest" else version
    kinds = set()
    for path, doc in _manifests():
        try:
            validator.validate(doc, target, strict=True)
        except utils.SchemaNotFoundError as exc:  # the CLI only warns here; a kind without a schema is an error
            pytest.fail(f"{path.name}: {exc.message}")
        except validator.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc}")
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_kubernetes_validate_cli_as_the_readme_runs_it() -> None:
    _validator()
    tool = _require("kubernetes-validate")
    files = [str(p) for p in sorted(KUBERNETES.glob("*.yaml"))]
    done = subprocess.run([tool, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "WARN" not in done.stdout, done.stdout + done.stderr


def test_schema_validation_catches_a_mistake() -> None:
    """The positive control: a misspelt field in a Deployment is refused by the same strict validation."""
    validator = _validator()
    deployment = _find("Deployment", "medgate-gateway")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(validator.ValidationError):
        validator.validate(broken, "1.28.0", strict=True)


# --- settings: every MEDGATE_* name and value is one the loader accepts -------------------------------------------


def _compose_services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _kubernetes_environments() -> dict[str, dict[str, str]]:
    """Each medgate container's environment as the pod gets it: the ConfigMap, then its own env."""
    configmaps = {doc["metadata"]["name"]: doc["data"] for _, doc in _manifests() if doc["kind"] == "ConfigMap"}
    found = {}
    for _, doc in _manifests():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                env.update(configmaps[source["configMapRef"]["name"]])
            for item in container.get("env", []):
                # Secrets hold a value of the setting's kind: a PostgreSQL URL is the only MEDGATE_* one here.
                env[item["name"]] = item.get("value", "postgresql://medgate@db.example:5432/medgate")
            found[f"{doc['metadata']['name']}/{container['name']}"] = env
    return found


def _environments() -> dict[str, dict[str, str]]:
    compose = {
        f"compose/{name}": {key: str(value) for key, value in (service.get("environment") or {}).items()}
        for name, service in _compose_services().items()
    }
    return {**compose, **_kubernetes_environments()}


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    yield monkeypatch


def test_every_medgate_variable_is_a_setting_with_a_valid_value(clean_environment: pytest.MonkeyPatch) -> None:
    checked = 0
    for where, env in _environments().items():
        ours = {name: value for name, value in env.items() if name.startswith(ENV_PREFIX)}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in ours.items():
                patch.setenv(name, value)
            try:
                load_settings()  # what start-up does: an unknown name or a bad value stops it
            except SettingsError as exc:
                pytest.fail(f"{where}: {exc}")
        checked += len(ours)
    assert checked > 30


def test_the_settings_check_refuses_an_unknown_name(clean_environment: pytest.MonkeyPatch) -> None:
    """The positive control: the loader the test above relies on refuses a misspelt variable."""
    misspelt = "MEDGATE_REVIEW_STORE_" + "URI"  # built, so the repository scan for unknown names skips it
    clean_environment.setenv(misspelt, "postgresql://x@y/z")
    with pytest.raises(SettingsError, match="MEDGATE_REVIEW_STORE_URL"):
        load_settings()


def test_servers_listen_on_the_network_with_tls_and_the_embedded_triton_off() -> None:
    servers = 0
    for where, env in _environments().items():
        if "MEDGATE_GATEWAY_PORT" in env:  # a gateway
            assert env["MEDGATE_GATEWAY_HOST"] == "0.0.0.0" and env["MEDGATE_TRITON_URL"], where
            assert env["MEDGATE_REVIEW_URL"] and env["MEDGATE_SECURITY_ROUTER_TOKEN_FILE"], where
        elif "MEDGATE_REVIEW_PORT" in env:  # a review service
            assert env["MEDGATE_REVIEW_HOST"] == "0.0.0.0" and env["MEDGATE_REVIEW_STORE_URL"], where
        else:
            assert not any(name.startswith(ENV_PREFIX) for name in env), where  # Triton, PostgreSQL
            continue
        servers += 1
        # TLS stays on (the default), with mounted material; plaintext on the network is never allowed here.
        assert env.get("MEDGATE_SECURITY_TLS", "true") == "true" and env["MEDGATE_SECURITY_CERT_FILE"], where
        assert env.get("MEDGATE_SECURITY_AUTH", "true") == "true", where
        assert "MEDGATE_SECURITY_ALLOW_PLAINTEXT_ON_NETWORK" not in env, where
    assert servers == 4  # gateway and review, in compose and in Kubernetes


# --- compose: names, ports, GPU, mounts ----------------------------------------------------------------------------


def test_compose_wiring() -> None:
    services = _compose_services()
    gateway, review, triton = services["gateway"], services["review"], services["triton"]
    gateway_env, review_env = gateway["environment"], review["environment"]
    triton_host, triton_port = gateway_env["MEDGATE_TRITON_URL"].split(":")
    assert triton_host == "triton" and triton_port in {str(p) for p in triton["expose"]}
    review_host, review_port = gateway_env["MEDGATE_REVIEW_URL"].split(":")
    assert review_host == "review" and review_port == review_env["MEDGATE_REVIEW_PORT"]
    assert f"{gateway_env['MEDGATE_GATEWAY_PORT']}:{gateway_env['MEDGATE_GATEWAY_PORT']}" in gateway["ports"]
    assert f"{review_port}:{review_port}" in review["ports"]
    assert (
        review_env["MEDGATE_REVIEW_STORE_URL"].startswith("postgresql://")
        and "postgres:" in (review_env["MEDGATE_REVIEW_STORE_URL"])
    )
    assert ":" not in review_env["MEDGATE_REVIEW_STORE_URL"].split("@")[0].removeprefix("postgresql://")  # no password
    # Healthchecks ask each server's own port.
    assert gateway["healthcheck"]["test"][-1] == gateway_env["MEDGATE_GATEWAY_PORT"]
    assert review["healthcheck"]["test"][-1] == review_port
    # Triton on a GPU with the model repository mounted.
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "../triton_models:/models-src:ro" in triton["volumes"]
    assert triton["environment"]["MODEL_SOURCE"] == "/models-src"


def test_compose_secret_files_are_mounted() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    declared = set(document["secrets"])
    for name, service in document["services"].items():
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        assert mounted <= declared, name
        for variable, value in (service.get("environment") or {}).items():
            if str(value).startswith("/run/secrets/") and variable != "MEDGATE_SECURITY_CREDENTIALS_DIR":
                assert str(value).removeprefix("/run/secrets/") in mounted, f"{name}: {variable}={value}"
    spec = importlib.util.spec_from_file_location("dev_secrets", DEPLOY / "dev_secrets.py")
    assert spec is not None and spec.loader is not None
    dev_secrets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev_secrets)
    # deploy/dev_secrets.py writes exactly the files compose mounts.
    assert {Path(item["file"]).name for item in document["secrets"].values()} == set(dev_secrets.MOUNTED)


# --- Kubernetes: names, ports, probes, mounts, GPU, policy ---------------------------------------------------------


def test_kubernetes_wiring() -> None:
    gateway, review, triton = _container("medgate-gateway"), _container("medgate-review"), _container("medgate-triton")
    gateway_env = _plain_env(gateway)
    assert gateway_env["MEDGATE_GATEWAY_PORT"] == str(_port(gateway, "grpc"))
    assert gateway_env["MEDGATE_GATEWAY_METRICS_PORT"] == str(_port(gateway, "metrics"))
    assert _plain_env(review)["MEDGATE_REVIEW_PORT"] == str(_port(review, "grpc"))
    # Each URL names a Service that exposes that port and selects those pods.
    for url, deployment in (
        (gateway_env["MEDGATE_TRITON_URL"], "medgate-triton"),
        (gateway_env["MEDGATE_REVIEW_URL"], "medgate-review"),
    ):
        host, port = url.split(":")
        service = _find("Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, url
        pods = _find("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pods.items(), url
    assert _port(triton, "grpc") == int(gateway_env["MEDGATE_TRITON_URL"].split(":")[1])
    # Headless gateway Service: DNS returns every pod, for clients' dns:/// round robin.
    headless = _find("Service", "medgate-gateway")
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in headless["spec"]["ports"]} >= {_port(gateway, "grpc")}
    # Store URL and password from a Secret, never in the manifest.
    store = next(e for e in review["env"] if e["name"] == "MEDGATE_REVIEW_STORE_URL")
    assert store["valueFrom"]["secretKeyRef"]["name"] == "medgate-review-store"
    assert next(e for e in review["env"] if e["name"] == "PGPASSWORD")["valueFrom"]["secretKeyRef"]


def test_every_selector_matches_its_pods() -> None:
    labels = {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for _, doc in _manifests()
        if doc["kind"] == "Deployment"
    }
    for _, doc in _manifests():
        if doc["kind"] == "Deployment":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels[doc["metadata"]["name"]].items()
        selector = doc["spec"].get("selector") if doc["kind"] in {"Service", "PodDisruptionBudget"} else None
        if selector is not None:
            wanted = selector.get("matchLabels", selector)
            assert any(wanted.items() <= pod.items() for pod in labels.values()), doc["metadata"]["name"]
    hpa = _find("HorizontalPodAutoscaler", "medgate-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "medgate-gateway"}
    assert _find("Deployment", "medgate-review")["spec"]["replicas"] >= 2
    assert "replicas" not in _find("Deployment", "medgate-gateway")["spec"]  # the autoscaler's to set
    assert hpa["spec"]["minReplicas"] >= 2


def test_medgate_probes_ask_the_containers_own_port() -> None:
    for deployment, port_setting in (
        ("medgate-gateway", "MEDGATE_GATEWAY_PORT"),
        ("medgate-review", "MEDGATE_REVIEW_PORT"),
    ):
        container = _container(deployment)
        port = _plain_env(container)[port_setting]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:3] == ["python", HEALTHCHECK, port], f"{deployment} {probe}"
        assert "--alive" in container["livenessProbe"]["exec"]["command"]  # NOT_SERVING is alive, not dead
        assert "--alive" not in container["readinessProbe"]["exec"]["command"]


def test_mounted_files_lie_under_a_mount() -> None:
    for where, env in _kubernetes_environments().items():
        deployment = where.split("/")[0]
        if deployment == "medgate-triton":
            continue
        mounts = [m["mountPath"] for m in _container(deployment)["volumeMounts"]]
        for name, value in env.items():
            if name.endswith(("_FILE", "_DIR")) and name.startswith("MEDGATE_SECURITY_"):
                assert any(value == m or value.startswith(m + "/") for m in mounts), f"{where}: {name}={value}"


def test_secrets_the_manifests_use_are_named_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    used: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretName" in node:
                used.add(node["secretName"])
            if "secretKeyRef" in node:
                used.add(node["secretKeyRef"]["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for _, doc in _manifests():
        walk(doc)
    assert used == {"medgate-tls", "medgate-router-token", "medgate-review-store"}
    for name in used:
        assert f"kubectl -n medgate create secret generic {name}" in readme or f"create secret tls {name}" in readme, (
            name
        )


def test_triton_runs_on_gpu_nodes_and_only_the_gateway_reaches_it() -> None:
    spec = _find("Deployment", "medgate-triton")["spec"]["template"]["spec"]
    triton = _container("medgate-triton")
    assert spec["nodeSelector"] and triton["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert any(m["mountPath"] == "/models-src" and m["readOnly"] for m in triton["volumeMounts"])
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in spec["volumes"])
    policy = _find("NetworkPolicy", "medgate-triton")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "medgate-triton"}
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "medgate-gateway"}}}]
    assert [p["port"] for p in rule["ports"]] == [_port(triton, "grpc")]


# --- the health check the probes run ------------------------------------------------------------------------------


async def test_healthcheck_against_a_real_review_service(tmp_path: Path, clients: Clients) -> None:
    security = security_values(clients.credentials.directory, audit_dir=tmp_path / "audit")
    settings = load_settings(review={"store_path": tmp_path / "review.sqlite3", "port": 0}, security=security)
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env |= {  # the container's settings: TLS on, the node's certificate and the CA
        "MEDGATE_SECURITY_TLS": "true",
        "MEDGATE_SECURITY_CERT_FILE": str(clients.credentials.server_cert),
        "MEDGATE_SECURITY_KEY_FILE": str(clients.credentials.server_key),
        "MEDGATE_SECURITY_CLIENT_CA_FILE": str(clients.credentials.ca_cert),
    }

    async def run(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(DEPLOY / "healthcheck.py"), *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await process.communicate()
        return int(process.returncode or 0), err.decode()

    try:
        assert await run(str(server.port)) == (0, "")
        assert await run(str(server.port), "--service", "medgate.v1.Review") == (0, "")
        code, err = await run(str(server.port), "--service", "medgate.v1.Nothing")
        assert code == 1 and "NOT_FOUND" in err
        assert (await run(str(server.port), "--service", "medgate.v1.Nothing", "--alive"))[0] == 0
    finally:
        await server.stop()
    code, err = await run(str(server.port), "--alive")
    assert code == 1 and "UNAVAILABLE" in err
