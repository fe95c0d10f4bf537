"""deploy/kubernetes/: what `kubectl apply -k deploy/kubernetes` applies, checked offline.

The kustomization is read here as kustomize reads it (its resources, and the ConfigMap its
generator makes from engine.env) and, where `kubectl` is installed, rendered by the real
kustomize (`kubectl kustomize` contacts no cluster). Built-in kinds are validated with
kubernetes-validate (the API's JSON schemas of pinned Kubernetes versions, strict: an unknown
field fails); KEDA's and the Prometheus Operator's kinds with jsonschema against the CRD
schemas vendored in deploy/kubernetes/schemas/ (made strict the same way). Then what the
manifests say is checked against the code: the probe paths against the HTTP app, the port and
the stop timing against Settings and the engine, every environment name against Settings,
the contract and the store client, the environment a pod gets against `load_settings`, the
KEDA triggers against that environment, the PrometheusRule against deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from consumers.cli import main as cli_main
from consumers.engine import _STOP_MARGIN
from consumers.topics import CONTRACT_TOPICS
from core.health import EngineHealth
from core.metrics import EngineMetrics
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import Settings, load_settings
from core.voice import EspeakSynthesizer, LocalVoiceBackend, VoiceService
from http_files import AppServices, create_app
from http_files.auth import access_policy
from schemas.codec import EventCodec
from tests.deploy.test_deploy_files import REPO, _instructions, active_env, env_entries
from tests.deploy.test_operations_files import RULES

K8S = REPO / "deploy" / "kubernetes"
SCHEMAS = K8S / "schemas"
EXAMPLE_SECRET = K8S / "secret.example.yaml"  # applied by hand, never by the kustomization
KUBERNETES_VERSIONS = ("1.32", "1.34")  # kubernetes-validate bundles their schemas
POD_NAME = "multimodal-engine-7c9f6d8b5d-x2x9k"  # what a Deployment's pod is called
POD_IP = "10.244.3.17"
_POD_FIELDS = {"metadata.name": POD_NAME, "status.podIP": POD_IP}  # the downward API's
APP_KEY = "k8s-manifest-test-key-0123456789"  # API_KEYS of the app the probes are tried on
# CONTRACT.md, "Pinned for the fleet, production and streaming voice": Kafka settings whose
# names are fixed, known here whether or not core/settings.py has them yet.
CONTRACT_KAFKA_SETTINGS = {
    "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD", "KAFKA_SASL_OAUTH_TOKEN_FILE", "KAFKA_SSL_CA_FILE",
    "KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE", "KAFKA_GROUP_INSTANCE_ID",
    "KAFKA_REPLICATION_FACTOR",
}
# What the reader below understands of a kustomization; anything else must be taught to it.
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator",
                      "images"}
# KAFKA_SASL_MECHANISM as KEDA's Kafka scaler spells it (its `sasl` parameter)
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256",
             "SCRAM-SHA-512": "scram_sha512", "OAUTHBEARER": "oauthbearer"}
REQUEST_TOPICS = [t for t in CONTRACT_TOPICS if t.startswith("generation.requested.")]

Resource = dict[str, Any]


# --------------------------------------------------------------------------- reading


def yaml_documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return document


def resources() -> list[Resource]:
    """What the kustomization makes, before kustomize's renaming (no hash suffix on the
    ConfigMap, the image as the Deployment names it)."""
    kust = kustomization()
    unknown = set(kust) - KUSTOMIZATION_KEYS
    assert not unknown, f"this test's reader of kustomization.yaml does not know {unknown}"
    made = [doc for entry in kust["resources"] for doc in yaml_documents(K8S / entry)]
    for generator in kust.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            data.update(active_env(K8S / env_file))
        made.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"]}, "data": data})
    return made


def find(made: list[Resource], kind: str, name: str | None = None) -> Resource:
    """The one resource of ``kind`` (named ``name``) in ``made``."""
    found = [r for r in made
             if r["kind"] == kind and name in (None, r["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} named {name or 'anything'}"
    return found[0]


def engine_container(made: list[Resource]) -> dict[str, Any]:
    containers = find(made, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: the engine"
    container: dict[str, Any] = containers[0]
    return container


def example_secrets() -> dict[str, dict[str, str]]:
    """secret.example.yaml: each Secret's name and its keys (stringData)."""
    return {doc["metadata"]["name"]: doc.get("stringData", {})
            for doc in yaml_documents(EXAMPLE_SECRET) if doc["kind"] == "Secret"}


def secret_key_listed(secret: str, key: str, optional: bool) -> bool:
    """Whether the example Secret ``secret`` has ``key`` (an optional key may be there as a
    line commented out, as ELEVENLABS_API_KEY is)."""
    if key in example_secrets().get(secret, {}):
        return True
    commented = re.search(rf"^\s*#\s*{re.escape(key)}:", EXAMPLE_SECRET.read_text(),
                          re.MULTILINE)
    return optional and commented is not None


def setting_names() -> set[str]:
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else field_name.upper())
    return names


@cache
def store_client_names() -> frozenset[str]:
    """The AWS_* variables the store client (obstore's S3Store) reads, from its type stubs,
    where each configuration key names its environment variable."""
    spec = importlib.util.find_spec("obstore")
    assert spec is not None and spec.submodule_search_locations
    stubs = Path(next(iter(spec.submodule_search_locations))) / "_store" / "_aws.pyi"
    names = frozenset(re.findall(r"`(AWS_[A-Z0-9_]+)`", stubs.read_text()))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= names, stubs
    return names


def known_env_names() -> set[str]:
    return setting_names() | store_client_names()


def test_the_contracts_kafka_settings_are_settings() -> None:
    assert CONTRACT_KAFKA_SETTINGS <= setting_names()


def env_names(made: list[Resource]) -> dict[str, str]:
    """Every environment variable name the manifests give the engine, with where: the
    ConfigMap's keys, the container's `env`, and engine.env's lines commented out (an
    operator uncomments them)."""
    where: dict[str, str] = {}
    container = engine_container(made)
    for source in container.get("envFrom", []):
        # a whole Secret as environment would hide which names it sets
        assert set(source) == {"configMapRef"}, f"envFrom {source}: only the ConfigMap"
        ref = source["configMapRef"]
        for name in find(made, "ConfigMap", ref["name"]).get("data", {}):
            where[name] = f"ConfigMap {ref['name']}"
    env = container.get("env", [])
    for entry in env:
        where[entry["name"]] = "the container's env"
    for helper in _helpers(env):  # not the engine's: only expanded into another value
        where.pop(helper)
    for name, _, commented, _ in env_entries(K8S / "engine.env"):
        if commented:
            where.setdefault(name, "engine.env, commented out")
    return where


def _helpers(env: list[dict[str, Any]]) -> set[str]:
    """The container's variables used only as ``$(NAME)`` in a later entry's value (the
    pod's IP in VOICE_STREAM_BASE_URL)."""
    used = {name for entry in env for name in re.findall(r"\$\(([A-Z0-9_]+)\)",
                                                           entry.get("value", ""))}
    return {entry["name"] for entry in env if entry["name"] in used}


def unknown_env_names(made: list[Resource]) -> dict[str, str]:
    known = known_env_names()
    return {name: where for name, where in env_names(made).items() if name not in known}


def pod_environment(made: list[Resource]) -> dict[str, str]:
    """The environment a pod of the Deployment gets, with the example Secrets applied."""
    container = engine_container(made)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(made, "ConfigMap", source["configMapRef"]["name"])["data"])
    secrets = example_secrets()
    for entry in container.get("env", []):
        if "value" in entry:  # $(NAME): an entry before it, as Kubernetes expands it
            env[entry["name"]] = re.sub(r"\$\(([A-Z0-9_]+)\)", lambda m: env[m[1]],
                                        entry["value"])
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            field_path = source["fieldRef"]["fieldPath"]
            assert field_path in _POD_FIELDS, entry
            env[entry["name"]] = _POD_FIELDS[field_path]
        else:
            ref = source["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            assert value is not None or ref.get("optional"), (
                f"{entry['name']}: the example Secret {ref['name']} has no key {ref['key']} "
                "and the reference is not optional")
            if value is not None:
                env[entry["name"]] = value
    return env


def engine_settings(environment: dict[str, str]) -> Settings:
    """``load_settings`` of exactly ``environment`` (the caller cleared the process's own
    settings with the ``clean_environment`` fixture)."""
    fields = Settings.model_fields
    return load_settings(_env_file=None, **{
        name.lower(): value for name, value in environment.items() if name.lower() in fields})


def triggers(made: list[Resource]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = find(made, "ScaledObject")["spec"]["triggers"]
    return found


def secret_refs_of(trigger_auth: Resource) -> dict[str, tuple[str, str]]:
    return {ref["parameter"]: (ref["name"], ref["key"])
            for ref in trigger_auth["spec"].get("secretTargetRef", [])}


def env_secret_ref(made: list[Resource], name: str) -> tuple[str, str] | None:
    for entry in engine_container(made).get("env", []):
        if entry["name"] == name and "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            return ref["name"], ref["key"]
    return None


def mounted_secret_file(made: list[Resource], path: PurePosixPath) -> tuple[str, str] | None:
    """(Secret, key) that a file path in the engine container comes from, if any."""
    pod = find(made, "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in engine_container(made).get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is not None and path.parent == PurePosixPath(mount["mountPath"]):
            return secret["secretName"], path.name
    return None


def keda_problems(made: list[Resource], settings: Settings) -> list[str]:
    """Where the ScaledObject and its TriggerAuthentication disagree with the Deployment
    they scale and with the engine's settings: target, brokers, group, topics, TLS, SASL,
    and the credentials and CA behind them."""
    problems = []
    deployment, scaled = find(made, "Deployment"), find(made, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    if (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment"),
            target["name"]) != ("apps/v1", "Deployment", deployment["metadata"]["name"]):
        problems.append(f"scaleTargetRef {target} is not the Deployment")
    protocol = settings.kafka_security_protocol
    mechanism = settings.kafka_sasl_mechanism if protocol.startswith("SASL_") else None
    want_tls = "enable" if protocol.endswith("SSL") else "disable"
    want_sasl = KEDA_SASL[mechanism] if mechanism is not None else "none"
    topics = []
    for trigger in triggers(made):
        meta, name = trigger["metadata"], trigger.get("name", trigger["type"])
        if trigger["type"] != "kafka":
            problems.append(f"{name}: type {trigger['type']}, not kafka")
            continue
        expected = {"bootstrapServers": settings.kafka_bootstrap_servers,
                    "consumerGroup": settings.kafka_group_id,
                    "tls": want_tls, "sasl": want_sasl,
                    "offsetResetPolicy": "earliest"}  # the engine's auto_offset_reset
        defaults = {"tls": "disable", "sasl": "none", "offsetResetPolicy": "latest"}
        for key, value in expected.items():
            if meta.get(key, defaults.get(key)) != value:
                problems.append(f"{name}: {key}={meta.get(key)!r}, the engine has {value!r}")
        if not str(meta.get("lagThreshold", "")).isdigit() or int(meta["lagThreshold"]) < 1:
            problems.append(f"{name}: lagThreshold {meta.get('lagThreshold')!r}")
        topics.append(meta.get("topic"))
        ref = trigger.get("authenticationRef", {}).get("name")
        auths = [r for r in made if r["kind"] == "TriggerAuthentication"
                 and r["metadata"]["name"] == ref]
        if len(auths) != 1:
            problems.append(f"{name}: authenticationRef {ref!r} is no TriggerAuthentication")
            continue
        params = secret_refs_of(auths[0])
        if mechanism not in (None, "OAUTHBEARER"):
            for parameter, variable in (("username", "KAFKA_SASL_USERNAME"),
                                        ("password", "KAFKA_SASL_PASSWORD")):
                if params.get(parameter) != env_secret_ref(made, variable):
                    problems.append(f"{name}: KEDA's {parameter} {params.get(parameter)} is "
                                    f"not the engine's {variable}")
        for parameter, path in (("ca", settings.kafka_ssl_ca_file),
                                ("cert", settings.kafka_ssl_cert_file),
                                ("key", settings.kafka_ssl_key_file)):
            engine_side = (None if path is None
                           else mounted_secret_file(made, PurePosixPath(str(path))))
            if params.get(parameter) != engine_side:
                problems.append(f"{name}: KEDA's {parameter} {params.get(parameter)} is not "
                                f"the engine's file {path} ({engine_side})")
    wanted = sorted(settings.topic(t) for t in REQUEST_TOPICS)
    if sorted(str(t) for t in topics) != wanted:
        problems.append(f"trigger topics {topics}, the engine consumes {wanted}")
    return problems


# --------------------------------------------------------------------------- schemas


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server's strict field
    validation does: ``additionalProperties: false`` wherever properties are named and
    unknown fields are not explicitly kept. Patterns are Go's (RE2), where a flag group may
    stand anywhere (``^(?i)(abort|warn)?$``); Python's ``re`` wants it first."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: ({name: strict(sub) for name, sub in value.items()}
                    if key == "properties" else strict(value))
              for key, value in schema.items()}
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and (flags := re.findall(r"\(\?[a-z]+\)", pattern)):
        result["pattern"] = "".join(flags) + re.sub(r"\(\?[a-z]+\)", "", pattern)
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{group}_{version}_{kind.lower()}.json"
    if not group or not path.is_file():
        return None
    schema = strict(json.loads(path.read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_problems(resource: Resource, version: str) -> list[str]:
    """Where ``resource`` breaks its schema: a vendored CRD's, else the Kubernetes API's
    of ``version`` (strict)."""
    what = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    validator = crd_validator(resource["apiVersion"], resource["kind"])
    if validator is not None:
        return [f"{what}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
                for error in validator.iter_errors(resource)]
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{what}: {exc.message}; vendor its CRD schema in {SCHEMAS}"]
    return []


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def made() -> list[Resource]:
    return resources()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No setting of this process's environment (a test session may carry Kafka or store
    settings) and no `.env` reach the settings loaded here."""
    for name in known_env_names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def pod_settings(made: list[Resource], clean_environment: None) -> Settings:
    return engine_settings(pod_environment(made))


@pytest.fixture
async def app_client(tmp_path: Path, clean_environment: None
                     ) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The engine's HTTP app with API keys required, as a pod has it while its model loads
    (not started, Kafka not connected), on 127.0.0.1."""
    settings = load_settings(_env_file=None, api_keys=APP_KEY)
    metrics = EngineMetrics(CollectorRegistry())
    store = OutputStore(tmp_path / "outputs")
    services = AppServices(
        health=EngineHealth(voice_backend="local"), metrics=metrics, store=store,
        codec=EventCodec(),
        voice=VoiceService(LocalVoiceBackend(EspeakSynthesizer()), store,
                           settings.default_voice_id),
        scheduling=build_scheduling(settings, metrics))
    app = create_app(services, access=access_policy(settings))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


# --------------------------------------------------------------------------- the files


def test_the_kustomization_lists_every_manifest_and_each_exists() -> None:
    kust = kustomization()
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    listed = list(kust["resources"])
    assert len(listed) == len(set(listed)), "a manifest is listed twice"
    for entry in listed:
        assert (K8S / entry).is_file(), f"kustomization.yaml lists {entry}: no such file"
    for generator in kust["configMapGenerator"]:
        for env_file in generator["envs"]:
            assert (K8S / env_file).is_file(), env_file
    on_disk = {str(p.relative_to(K8S)) for pattern in ("*.yaml", "*.yml")
               for p in K8S.rglob(pattern)}
    unlisted = on_disk - set(listed) - {"kustomization.yaml", EXAMPLE_SECRET.name}
    assert not unlisted, f"not in kustomization.yaml: {sorted(unlisted)}"
    assert EXAMPLE_SECRET.name not in listed, "the example Secret must never be applied"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_validates_against_its_schema(made: list[Resource],
                                                     version: str) -> None:
    kinds = {r["kind"] for r in made}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ScaledObject",
            "TriggerAuthentication", "PrometheusRule", "ServiceMonitor"} <= kinds
    problems = [p for resource in made + yaml_documents(EXAMPLE_SECRET)
                for p in schema_problems(resource, version)]
    assert not problems, "\n".join(problems)


def test_the_schema_checks_refuse_misspelt_and_misplaced_fields(made: list[Resource]) -> None:
    """Strictness is what catches a typo: each of these is a real mistake."""
    deployment = copy.deepcopy(find(made, "Deployment"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    scaled = copy.deepcopy(find(made, "ScaledObject"))
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    rule = copy.deepcopy(find(made, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    monitor = copy.deepcopy(find(made, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["authorization"]["credential"] = {"name": "x", "key": "y"}
    auth = copy.deepcopy(find(made, "TriggerAuthentication"))
    del auth["spec"]["secretTargetRef"][0]["parameter"]
    pdb = copy.deepcopy(find(made, "PodDisruptionBudget"))
    pdb["spec"]["maxUnavailable"] = [1]
    for broken, field in ((deployment, "paht"), (scaled, "minReplicas"),
                          (rule, "expresion"), (monitor, "credential"),
                          (auth, "parameter"), (pdb, "maxUnavailable")):
        problems = schema_problems(broken, KUBERNETES_VERSIONS[0])
        assert any(field in p for p in problems), (broken["kind"], problems)


def test_kustomize_renders_the_same_resources(made: list[Resource], tmp_path: Path) -> None:
    """The real kustomize (`kubectl kustomize`, offline) agrees with the reader above, and
    what it renders validates too."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl: the kustomization is checked by this test's own reader only")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                            timeout=60, check=False, env={"HOME": str(tmp_path),
                                                          "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def key(resource: Resource) -> tuple[str, str]:
        name = resource["metadata"]["name"]
        if resource["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)  # kustomize's content hash
        return resource["kind"], name

    assert sorted(map(key, rendered)) == sorted(map(key, made))
    config = next(r for r in rendered if r["kind"] == "ConfigMap")
    assert config["data"] == find(made, "ConfigMap")["data"]  # engine.env read alike
    container = engine_container(rendered)
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    image = kustomization()["images"][0]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"
    problems = [p for r in rendered for p in schema_problems(r, KUBERNETES_VERSIONS[-1])]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the engine's pod


def test_one_gpu_per_pod_and_the_image_of_the_kustomization(made: list[Resource]) -> None:
    container = engine_container(made)
    resources_ = container["resources"]
    assert int(resources_["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources_.get("requests", {}).get("nvidia.com/gpu", 1)) == 1
    assert [i["name"] for i in kustomization()["images"]] == [container["image"]]
    # no count here: KEDA's autoscaler owns it, and `kubectl apply -k` would reset it
    assert "replicas" not in find(made, "Deployment")["spec"]


def test_the_container_runs_serve_under_the_images_entrypoint(
        made: list[Resource], capsys: pytest.CaptureFixture[str]) -> None:
    container = engine_container(made)
    assert "command" not in container, "command would replace tini, the image's entrypoint"
    assert container["args"] == ["multimodal-engine", "serve"]
    steps = _instructions(REPO / "Dockerfile")
    entrypoint = [json.loads(rest) for keyword, rest in steps if keyword == "ENTRYPOINT"]
    assert entrypoint[-1][0].endswith("/tini")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["args"][0] in scripts
    with pytest.raises(SystemExit) as exit_:
        cli_main(container["args"][1:] + ["--help"])
    assert exit_.value.code == 0
    assert "serve" in capsys.readouterr().out
    # the pod runs as the image's user
    arguments = dict(rest.partition("=")[::2] for keyword, rest in steps if keyword == "ARG")
    pod = find(made, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(arguments["APP_UID"])


def test_the_container_port_is_service_port(made: list[Resource],
                                            pod_settings: Settings) -> None:
    container = engine_container(made)
    (port,) = container["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == Settings.model_fields["service_port"].default
    assert port["containerPort"] == pod_settings.service_port
    service = find(made, "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ("http", port["containerPort"])
    labels = find(made, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


async def test_the_probes_are_the_apps_probe_routes(
        made: list[Resource], app_client: TestClient[web.Request, web.Application]) -> None:
    """Each probe's path is a GET route of the HTTP app that needs no API key, on the
    container's port; while the model loads, liveness (and so the startup probe) answers
    200 and readiness 503."""
    container = engine_container(made)
    probes = {name: container[name] for name in ("startupProbe", "livenessProbe",
                                                 "readinessProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert probes["startupProbe"]["httpGet"]["path"] == "/health/live"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name, probe in probes.items():
        assert probe["httpGet"]["port"] in (*ports, *ports.values()), name
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP", name

    unauthenticated = await app_client.post("/generate/image", json={"prompt": "x"})
    assert unauthenticated.status == 401  # keys are on, so the probes below prove exemption
    expected = {"/health/live": 200, "/health/ready": 503}
    for name, probe in probes.items():
        response = await app_client.get(probe["httpGet"]["path"])
        assert response.status == expected[probe["httpGet"]["path"]], (name, response.status)
        assert "status" in await response.json()


def test_the_probes_leave_time_for_a_model_load(made: list[Resource]) -> None:
    container = engine_container(made)

    def budget(probe: dict[str, Any]) -> int:
        return (probe.get("initialDelaySeconds", 0)
                + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))

    assert budget(container["startupProbe"]) >= 300, "minutes for a cold start"
    assert budget(container["livenessProbe"]) >= 30, "a busy moment is no reason to restart"
    assert container["readinessProbe"].get("periodSeconds", 10) <= 10


def test_the_pod_has_time_to_drain_before_it_is_killed(made: list[Resource],
                                                       pod_settings: Settings) -> None:
    pod = find(made, "Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    default = Settings.model_fields["shutdown_grace_seconds"].default
    assert grace > default + _STOP_MARGIN
    assert grace > pod_settings.shutdown_grace_seconds + _STOP_MARGIN


def test_volumes_are_where_the_settings_point(made: list[Resource],
                                              pod_settings: Settings) -> None:
    pod = find(made, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in engine_container(made)["volumeMounts"]}
    assert {m["name"] for m in mounts.values()} <= set(volumes)
    for path in (pod_settings.output_dir, pod_settings.temp_dir, pod_settings.lora_output_dir):
        assert str(path) in mounts and not mounts[str(path)].get("readOnly"), path
    assert pod_settings.flux_model_path is not None
    models = mounts[str(pod_settings.flux_model_path.parent)]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    find(made, "PersistentVolumeClaim", claim)

    # the Kafka TLS files (engine.env, set or commented out) are keys of an optional Secret
    tls_files = {name: value for name, value, _, _ in env_entries(K8S / "engine.env")
                 if name in ("KAFKA_SSL_CA_FILE", "KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE")}
    assert len(tls_files) == 3
    for name, value in tls_files.items():
        source = mounted_secret_file(made, PurePosixPath(value))
        assert source is not None, f"{name}={value} is not in a mounted Secret"
        secret, key = source
        assert key in example_secrets()[secret], f"{name}: {secret} has no key {key}"
        (volume,) = [v for v in volumes.values() if v.get("secret", {}).get("secretName")
                     == secret]
        assert volume["secret"].get("optional") is True, "optional: only some clusters need it"


# --------------------------------------------------------------------------- environment


def test_every_environment_name_is_a_setting(made: list[Resource]) -> None:
    assert not unknown_env_names(made), (
        f"not a setting (core/settings.py), a CONTRACT.md Kafka name or a store variable: "
        f"{unknown_env_names(made)}")
    # and the check can fail
    broken = copy.deepcopy(made)
    env = find(broken, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "KAFKA_SASL_USERNAME")["name"] = "KAFKA_SASL_USER"
    find(broken, "ConfigMap")["data"]["KAFKA_BOOTSTRAP_SERVER"] = "kafka:9092"
    assert set(unknown_env_names(broken)) == {"KAFKA_SASL_USER", "KAFKA_BOOTSTRAP_SERVER"}


def test_the_pod_environment_loads_as_settings(made: list[Resource],
                                               pod_settings: Settings) -> None:
    """With the example Secrets, a pod's environment is a valid configuration for `serve`:
    static membership from the pod name, keys on, the store and Kafka security set."""
    assert pod_settings.kafka_group_instance_id == POD_NAME
    assert pod_settings.api_keys is not None
    assert pod_settings.metrics_require_key is True
    assert pod_settings.kafka_bootstrap_servers is not None
    assert pod_settings.flux_model_path is not None
    assert pod_settings.storage_url is not None, "several pods need one store"
    assert pod_settings.device.startswith("cuda")
    env = engine_container(made)["env"]
    instance = next(e for e in env if e["name"] == "KAFKA_GROUP_INSTANCE_ID")
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert pod_settings.voice_stream_base_url == f"http://{POD_IP}:8000"  # the pod itself
    assert find(made, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_secrets_come_from_secrets_and_the_example_has_every_key(
        made: list[Resource]) -> None:
    config = find(made, "ConfigMap")["data"]
    for name in ("API_KEYS", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "ELEVENLABS_API_KEY",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name not in config, f"{name} is a secret: not in the ConfigMap"
        assert env_secret_ref(made, name) is not None, f"{name}: no secretKeyRef"
    refs: list[tuple[str, str, bool, str]] = []
    for entry in engine_container(made)["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs.append((ref["name"], ref["key"], bool(ref.get("optional")), entry["name"]))
    for param, (secret, key) in secret_refs_of(find(made, "TriggerAuthentication")).items():
        refs.append((secret, key, False, f"KEDA {param}"))
    credentials = find(made, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"]
    refs.append((credentials["credentials"]["name"], credentials["credentials"]["key"], False,
                 "the ServiceMonitor's token"))
    for secret, key, optional, user in refs:
        assert secret_key_listed(secret, key, optional), (
            f"{user}: secret.example.yaml has no {secret} key {key}")
    required = [name for secret, key, optional, name in refs
                if not optional and secret == "multimodal-engine-secrets"]
    assert "API_KEYS" in required, "the API stays closed unless keys are configured"


# --------------------------------------------------------------------------- KEDA


def test_the_scaled_object_follows_the_engine(made: list[Resource],
                                              pod_settings: Settings) -> None:
    problems = keda_problems(made, pod_settings)
    assert not problems, "\n".join(problems)
    triggers_ = triggers(made)
    assert {t["metadata"]["consumerGroup"] for t in triggers_} == {
        Settings.model_fields["kafka_group_id"].default}
    spec = find(made, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"]["name"] == find(made, "Deployment")["metadata"]["name"]
    # never zero (a model load per cold start), never more pods than partitions to share
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] <= pod_settings.kafka_topic_partitions


def test_the_keda_check_can_fail(made: list[Resource], pod_settings: Settings) -> None:
    """Each of these is a real mismatch between KEDA and the engine, and is reported."""

    def problems_after(change: Callable[[list[Resource]], object]) -> str:
        copied = copy.deepcopy(made)
        change(copied)
        return "\n".join(keda_problems(copied, pod_settings))

    def image_trigger(copied: list[Resource]) -> dict[str, Any]:
        metadata: dict[str, Any] = triggers(copied)[0]["metadata"]
        return metadata

    def without_password(copied: list[Resource]) -> None:
        refs = find(copied, "TriggerAuthentication")["spec"]["secretTargetRef"]
        refs[:] = [ref for ref in refs if ref["parameter"] != "password"]

    assert "consumerGroup" in problems_after(
        lambda m: image_trigger(m).update(consumerGroup="multimodal-engine"))
    assert "sasl" in problems_after(lambda m: image_trigger(m).update(sasl="scram_sha256"))
    assert "tls" in problems_after(lambda m: image_trigger(m).pop("tls"))
    assert "topics" in problems_after(
        lambda m: image_trigger(m).update(topic="generation.requested.images"))
    assert "scaleTargetRef" in problems_after(
        lambda m: find(m, "ScaledObject")["spec"]["scaleTargetRef"].update(name="engine"))
    assert "password" in problems_after(without_password)
    # the engine with a private CA, KEDA without it
    with_ca = pod_settings.model_copy(update={"kafka_ssl_ca_file": Path("/etc/kafka-tls/ca.crt")})
    assert any("KEDA's ca" in p for p in keda_problems(made, with_ca))


# --------------------------------------------------------------------------- monitoring


def test_the_prometheus_rule_has_exactly_the_alert_rules() -> None:
    rule = find(resources(), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "deploy/kubernetes/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: "
        "run `python deploy/kubernetes/sync-alert-rules.py`")
    spec = importlib.util.spec_from_file_location("sync_alert_rules",
                                                  K8S / "sync-alert-rules.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (K8S / "prometheusrule.yaml").read_text() == script.render(RULES.read_text()), (
        "prometheusrule.yaml is generated: run `python deploy/kubernetes/sync-alert-rules.py`")


async def test_the_service_monitor_scrapes_metrics_with_a_key(
        made: list[Resource], pod_settings: Settings,
        app_client: TestClient[web.Request, web.Application]) -> None:
    monitor, service = find(made, "ServiceMonitor"), find(made, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert pod_settings.metrics_require_key, "engine.env: /metrics needs a key"
    assert endpoint["authorization"].get("type", "Bearer") == "Bearer"
    # the app answers the path only with a key, as the ServiceMonitor sends it
    assert (await app_client.get(endpoint["path"])).status == 401
    with_key = await app_client.get(endpoint["path"],
                                    headers={"Authorization": f"Bearer {APP_KEY}"})
    assert with_key.status == 200
    assert "engine_build_info" in await with_key.text()
    # the targets' job is the Service's name (no jobLabel): the one the alerts select
    assert "jobLabel" not in monitor["spec"]
    jobs = {match for rule in find(made, "PrometheusRule")["spec"]["groups"][0]["rules"]
            for match in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert jobs == {service["metadata"]["name"]}


def test_the_disruption_budget_never_blocks_a_drain(made: list[Resource]) -> None:
    budget = find(made, "PodDisruptionBudget")["spec"]
    labels = find(made, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1 and "minAvailable" not in budget
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
