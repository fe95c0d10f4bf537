"""The shared store in the deployment files: the compose MinIO and its one-shot set-up
(`minio-init`, deploy/minio-init.sh), the engine's storage settings, the lifecycle rules
docs/deployment.md gives, and the Caddy proxy of the documented two-GPU override.

As in test_deploy_files.py, nothing runs in a container: Compose resolves the project
offline, the set-up script runs under a POSIX `sh` against a stand-in `mc` that records its
calls, and the Caddyfile is checked by the real `caddy` binary where one is installed
(Debian's `caddy` package; PyPI has none), else those tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.settings import Settings
from core.storage import build_object_store
from tests.deploy.test_deploy_files import (
    ENGINE,
    REPO,
    documented_override,
    make_project,
    run_compose,
)

MINIO = "minio"
MINIO_INIT = "minio-init"
SCRIPT = REPO / "deploy" / "minio-init.sh"
CADDYFILE = REPO / "deploy" / "caddy" / "Caddyfile"
_RELEASE_TAG = re.compile(r"RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z")


def caddy() -> str | None:
    return os.environ.get("CADDY") or shutil.which("caddy")


needs_caddy = pytest.mark.skipif(
    caddy() is None,
    reason="no caddy binary: PyPI has no wheel that ships it; Debian's `caddy` package does "
    "(apt-get install caddy), or point CADDY at one",
)


def resolve(project: Path, *files: str) -> dict[str, Any]:
    extra = [arg for name in files for arg in ("-f", name)]
    result = run_compose(project, *extra, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr
    resolved: dict[str, Any] = json.loads(result.stdout)
    return resolved


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    project = make_project(tmp_path_factory.mktemp("compose") / "project")
    resolved: dict[str, Any] = resolve(project)["services"]
    return resolved


# --------------------------------------------------------------------------- compose


def test_minio_is_pinned_persistent_and_checked(services: dict[str, Any]) -> None:
    minio = services[MINIO]
    image, _, tag = minio["image"].partition(":")
    assert image == "minio/minio" and _RELEASE_TAG.fullmatch(tag), minio["image"]
    assert minio["command"][:2] == ["server", "/data"]
    assert {v["target"]: v["type"] for v in minio["volumes"]} == {"/data": "volume"}
    assert {"127.0.0.1"} == {p["host_ip"] for p in minio["ports"]}  # never on every address
    assert "9000" in {p["published"] for p in minio["ports"]}
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    env = minio["environment"]
    assert env["MINIO_ROOT_USER"] and len(env["MINIO_ROOT_PASSWORD"]) >= 8


def test_minio_init_runs_the_script_once_minio_is_healthy(services: dict[str, Any]) -> None:
    init = services[MINIO_INIT]
    image, _, tag = init["image"].partition(":")
    assert image == "minio/mc" and _RELEASE_TAG.fullmatch(tag), init["image"]
    assert {name: d["condition"] for name, d in init["depends_on"].items()} == {
        MINIO: "service_healthy"}
    assert init.get("restart", "no") == "no"
    mounts = {Path(v["source"]).name: v for v in init["volumes"] if v["type"] == "bind"}
    script = mounts[SCRIPT.name]
    assert script["read_only"] is True
    assert init["entrypoint"] == ["/bin/sh", script["target"]]
    env = init["environment"]
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert env[name] == services[MINIO]["environment"][name], name
    assert urlsplit(env["MINIO_ENDPOINT"]).netloc == f"{MINIO}:9000"
    assert env["OUTPUTS_EXPIRE_DAYS"] == "1"


def test_the_engine_uses_the_store_minio_init_prepared(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine, init = services[ENGINE]["environment"], services[MINIO_INIT]["environment"]
    assert engine["STORAGE_URL"] == init["STORAGE_URL"] == "s3://multimodal-engine"
    assert engine["STORAGE_ENDPOINT_URL"] == init["MINIO_ENDPOINT"] == "http://minio:9000"
    assert engine["AWS_ACCESS_KEY_ID"] == init["ENGINE_ACCESS_KEY"]
    assert engine["AWS_SECRET_ACCESS_KEY"] == init["ENGINE_SECRET_KEY"]
    assert len(engine["AWS_SECRET_ACCESS_KEY"]) >= 8  # MinIO refuses shorter secrets
    assert engine["AWS_ACCESS_KEY_ID"] != services[MINIO]["environment"]["MINIO_ROOT_USER"]
    assert engine["AWS_REGION"]
    depends = services[ENGINE]["depends_on"]
    assert depends[MINIO_INIT]["condition"] == "service_completed_successfully"
    assert depends[MINIO]["condition"] == "service_healthy"

    # the engine's settings accept what Compose hands it, and make a store of it
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in engine.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.storage_url == engine["STORAGE_URL"]
    assert settings.storage_endpoint_url == "http://minio:9000"
    assert settings.output_urls == "engine"  # presigned URLs would name minio:9000
    store = build_object_store(settings)  # a client only: contacts nothing
    assert store is not None and store.where == engine["STORAGE_URL"]


def test_store_settings_follow_the_operator(tmp_path: Path) -> None:
    """Compose reads .env (or the shell) for the ${...}: bucket and passwords are the
    operator's, still one definition for the engine and the set-up."""
    env_text = (REPO / ".env.example").read_text() + (
        "\nMINIO_BUCKET=prod-media\nMINIO_ROOT_PASSWORD=root-secret-123\n"
        "MINIO_ENGINE_SECRET_KEY=engine-secret-456\nOUTPUTS_EXPIRE_DAYS=2\n"
    )
    project = make_project(tmp_path / "project", env_text)
    services = resolve(project)["services"]
    engine, init = services[ENGINE]["environment"], services[MINIO_INIT]["environment"]
    assert engine["STORAGE_URL"] == init["STORAGE_URL"] == "s3://prod-media"
    assert services[MINIO]["environment"]["MINIO_ROOT_PASSWORD"] == "root-secret-123"
    assert init["MINIO_ROOT_PASSWORD"] == "root-secret-123"
    assert engine["AWS_SECRET_ACCESS_KEY"] == init["ENGINE_SECRET_KEY"] == "engine-secret-456"
    assert init["OUTPUTS_EXPIRE_DAYS"] == "2"


# --------------------------------------------------------------------------- minio-init.sh


def run_init(tmp_path: Path, attach_answer: str | None = None, **env: str
             ) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """Runs the script under `sh` (dash on Debian: POSIX only, as the mc image needs) with
    a stand-in `mc` that records argv, stdin of `ilm import` and the policy file of
    `admin policy create`; `attach_answer` makes `admin policy attach` fail saying it."""
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    stub = tmp_path / "bin" / "mc"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(
        f"#!{sys.executable}\nimport json, sys\nargs = sys.argv[1:]\nrecord = {{'argv': args}}\n"
        "if args[:2] == ['ilm', 'import']:\n    record['stdin'] = sys.stdin.read()\n"
        "if args[:3] == ['admin', 'policy', 'create']:\n"
        "    record['file'] = open(args[5]).read()\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(record) + '\\n')\n"
        f"answer = {attach_answer!r}\n"
        "if answer and args[:3] == ['admin', 'policy', 'attach']:\n"
        "    print(answer, file=sys.stderr)\n    sys.exit(1)\n"
    )
    stub.chmod(0o755)
    full_env = {
        "PATH": f"{stub.parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
        "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "root-password",
        "ENGINE_ACCESS_KEY": "engine", "ENGINE_SECRET_KEY": "engine-password", **env,
    }
    result = subprocess.run(["sh", str(SCRIPT)], env=full_env, capture_output=True, text=True,
                            timeout=20, check=False)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] \
        if calls.exists() else []
    return result, recorded


def rules_by_id(document: str) -> dict[str, dict[str, Any]]:
    return {rule["ID"]: rule for rule in json.loads(document)["Rules"]}


def test_minio_init_prepares_bucket_rules_and_engine_user(tmp_path: Path) -> None:
    result, calls = run_init(tmp_path, STORAGE_URL="s3://multimodal-engine")
    assert result.returncode == 0, result.stderr
    argvs = [call["argv"] for call in calls]
    assert argvs[0] == ["alias", "set", "store", "http://minio:9000", "root", "root-password"]
    assert ["mb", "--ignore-existing", "store/multimodal-engine"] in argvs
    assert ["admin", "user", "add", "store", "engine", "engine-password"] in argvs
    assert ["admin", "policy", "attach", "store", "multimodal-engine", "--user", "engine"] \
        in argvs
    # the bucket exists before its rules are set, the policy before it is attached
    order = [" ".join(argv[:3]) for argv in argvs]
    assert order.index("mb --ignore-existing store/multimodal-engine") < order.index(
        "ilm import store/multimodal-engine")
    assert order.index("admin user add") < order.index("admin policy attach")
    assert order.index("admin policy create") < order.index("admin policy attach")

    ilm = next(call for call in calls if call["argv"][:2] == ["ilm", "import"])
    assert ilm["argv"][2] == "store/multimodal-engine"
    rules = rules_by_id(ilm["stdin"])
    assert rules["expire-outputs"]["Filter"] == {"Prefix": "outputs/"}
    assert rules["expire-outputs"]["Expiration"] == {"Days": 1}
    assert rules["expire-results"]["Filter"] == {"Prefix": "results/"}
    assert all(rule["Status"] == "Enabled" for rule in rules.values())

    policy = json.loads(next(c["file"] for c in calls if c["argv"][:3] ==
                             ["admin", "policy", "create"]))
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::multimodal-engine", "arn:aws:s3:::multimodal-engine/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= actions
    assert not any("*" in action for action in actions)
    assert not list(tmp_path.glob("*.json")), "the policy file is left behind"
    for secret in ("root-password", "engine-password"):
        assert secret not in result.stdout + result.stderr


def test_minio_init_keeps_to_the_storage_prefix(tmp_path: Path) -> None:
    result, calls = run_init(tmp_path, STORAGE_URL="s3://media/prod/engine/",
                             OUTPUTS_EXPIRE_DAYS="2", RESULTS_EXPIRE_DAYS="7")
    assert result.returncode == 0, result.stderr
    rules = rules_by_id(next(c["stdin"] for c in calls if c["argv"][:2] == ["ilm", "import"]))
    assert rules["expire-outputs"]["Filter"] == {"Prefix": "prod/engine/outputs/"}
    assert rules["expire-outputs"]["Expiration"] == {"Days": 2}
    assert rules["expire-results"]["Filter"] == {"Prefix": "prod/engine/results/"}
    assert rules["expire-results"]["Expiration"] == {"Days": 7}
    policy = next(c["file"] for c in calls if c["argv"][:3] == ["admin", "policy", "create"])
    assert '"arn:aws:s3:::media/prod/engine/*"' in policy


def test_minio_init_runs_again_but_fails_on_real_errors(tmp_path: Path) -> None:
    again, _ = run_init(tmp_path, attach_answer="mc: <ERROR> Unable to make user/group policy "
                        "association. The specified policy change is already in effect.")
    assert again.returncode == 0, again.stderr
    refused, _ = run_init(tmp_path, attach_answer="mc: <ERROR> Access Denied.")
    assert refused.returncode != 0
    assert "cannot attach policy" in refused.stderr and "Access Denied" in refused.stderr


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"STORAGE_URL": "https://minio:9000/bucket"}, "STORAGE_URL must be s3://"),
        ({"OUTPUTS_EXPIRE_DAYS": "0"}, "whole days >= 1"),
        ({"RESULTS_EXPIRE_DAYS": "1.5"}, "whole days >= 1"),
        ({"ENGINE_SECRET_KEY": ""}, "ENGINE_SECRET_KEY is required"),
    ],
    ids=["not-s3", "zero-days", "fractional-days", "no-secret"],
)
def test_minio_init_refuses_bad_settings(tmp_path: Path, env: dict[str, str],
                                         complaint: str) -> None:
    result, calls = run_init(tmp_path, **env)
    assert result.returncode != 0
    assert complaint in result.stderr
    assert calls == []  # before any change to the store


# --------------------------------------------------------------------------- docs


def test_the_documented_lifecycle_rules_are_the_ones_minio_init_sets(tmp_path: Path) -> None:
    docs = (REPO / "docs" / "deployment.md").read_text()
    aws = next(block for block in re.findall(r"```json\n(.*?)```", docs, re.DOTALL)
               if '"Rules"' in block)
    documented = rules_by_id(aws)
    _, calls = run_init(tmp_path)  # the compose defaults
    imported = rules_by_id(next(c["stdin"] for c in calls if c["argv"][:2] == ["ilm", "import"]))
    assert documented.keys() == imported.keys()
    for rule_id, rule in imported.items():
        for key in ("Status", "Filter", "Expiration"):
            assert documented[rule_id][key] == rule[key], (rule_id, key)
    for prefix, days in (("outputs/", 1), ("results/", 30)):
        assert f'mc ilm rule add --prefix "{prefix}" --expire-days {days} ' in docs


# --------------------------------------------------------------------------- Caddy


def proxy_environment(tmp_path: Path) -> dict[str, str]:
    project = make_project(tmp_path / "project")
    (project / "docker-compose.gpu1.yml").write_text(documented_override())
    environment: dict[str, str] = resolve(project, "docker-compose.yml",
                                          "docker-compose.gpu1.yml")["services"]["proxy"][
        "environment"]
    return environment


def run_caddy(*args: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = caddy()
    assert tool is not None
    return subprocess.run(
        [tool, *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd or REPO),
             **(env or {})},
        capture_output=True, text=True, timeout=30, check=False, cwd=cwd)


@needs_caddy
def test_the_caddyfile_balances_the_two_engines(tmp_path: Path) -> None:
    """`caddy adapt` parses the Caddyfile with the proxy's environment from the documented
    override (no module is started) into the JSON config Caddy would run."""
    environment = proxy_environment(tmp_path)
    adapted = run_caddy("adapt", "--adapter", "caddyfile", "--config", str(CADDYFILE),
                        env=environment, cwd=tmp_path)
    assert adapted.returncode == 0, adapted.stderr
    server = next(iter(json.loads(adapted.stdout)["apps"]["http"]["servers"].values()))
    assert server["listen"] == [f":{environment['SERVICE_PORT']}"]
    proxy = server["routes"][0]["handle"][0]
    assert proxy["handler"] == "reverse_proxy"
    assert [u["dial"] for u in proxy["upstreams"]] == environment["ENGINE_UPSTREAMS"].split()
    # the probe: /health needs a key when API_KEYS is set
    assert proxy["health_checks"]["active"]["uri"] == "/health/ready"
    assert proxy["flush_interval"] == -1  # streamed audio is not held back


@needs_caddy
def test_caddy_validates_the_caddyfile_and_rejects_a_broken_one(tmp_path: Path) -> None:
    """`caddy validate` also provisions every module; upstreams on loopback ports where
    nothing listens keep its health checker's first probe on this machine."""
    env = {"ENGINE_UPSTREAMS": "127.0.0.1:9 127.0.0.1:9", "SERVICE_PORT": "8000"}
    good = run_caddy("validate", "--adapter", "caddyfile", "--config", str(CADDYFILE),
                     env=env, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "Caddyfile"
    broken.write_text(CADDYFILE.read_text().replace("lb_policy least_conn",
                                                    "lb_policy fastest_please", 1))
    bad = run_caddy("validate", "--adapter", "caddyfile", "--config", str(broken), env=env,
                    cwd=tmp_path)
    assert bad.returncode != 0
    assert "fastest_please" in bad.stderr
