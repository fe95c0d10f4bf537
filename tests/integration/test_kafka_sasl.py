"""The engine on a broker that enforces SASL (tests/support/sasl_broker.py: Tansu behind a
gateway doing the broker's half of SASL as Kafka does; Tansu 0.6 cannot enforce it itself,
see docs/brokers.md).

- SCRAM-SHA-512 and OAUTHBEARER (a token file, re-read at every login) answer requests.
- Wrong credentials stop ``serve`` with one line saying so, never showing the password.
- Credentials revoked while running: the log and ``/health`` say the broker refuses them,
  and the engine does not retry the login in a tight loop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from consumers.engine import Engine
from consumers.topics import CONTRACT_TOPICS
from core.settings import Settings
from tests.support.kafka_client import PersonaPeer
from tests.support.kafka_security import register
from tests.support.sasl_broker import SaslBroker
from tests.support.settings import engine_settings

pytestmark = pytest.mark.kafka

USER, PASSWORD = "engine", "Sc7am-pa55word-not-for-logs"
TOKEN = "token-one-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def broker() -> Iterator[SaslBroker]:
    with SaslBroker({USER: PASSWORD}, tokens=[TOKEN]) as instance:
        yield instance


def scram(broker: SaslBroker, password: str = PASSWORD) -> dict[str, str]:
    return {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_PASSWORD": password}


async def _settings(tmp_path: Path, broker: SaslBroker, env: dict[str, str],
                    monkeypatch: pytest.MonkeyPatch, **overrides: object) -> Settings:
    monkeypatch.chdir(tmp_path)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    register(broker.bootstrap_servers, scram(broker))  # the test's own clients: SCRAM
    broker.create_topics([prefix + name for name in CONTRACT_TOPICS], 2)
    return engine_settings(tmp_path, broker.bootstrap_servers, prefix,
                           **{k.lower(): v for k, v in env.items()}, **overrides)


async def _answered(engine: Engine, settings: Settings) -> None:
    async with PersonaPeer(settings.kafka_bootstrap_servers or "",
                           settings.kafka_topic_prefix) as peer:
        request = {"request_id": str(uuid.uuid4()), "conversation_id": "sasl",
                   "text": "Hello through SASL."}
        await peer.publish("voice", request)
        reply = (await peer.answers_for([request["request_id"]], timeout=60))[
            request["request_id"]]
    assert reply.kind == "completed", reply.event


async def test_scram_answers_and_a_revoked_login_is_reported_not_hammered(
    broker: SaslBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    settings = await _settings(tmp_path, broker, scram(broker), monkeypatch)
    engine = Engine(settings, broker.bootstrap_servers, http_host="127.0.0.1",
                    broker_watch_interval=1.0)
    await engine.start()
    try:
        await _answered(engine, settings)
        assert engine.health.kafka_security == "SASL_PLAINTEXT (SCRAM-SHA-512)"
        # the password is withdrawn and every connection must log in again
        broker.remove_user(USER)
        before = len(broker.attempts())
        revoked, revoked_at = time.monotonic(), time.time()
        broker.drop_connections()
        await engine.health.wait_until(lambda h: h.kafka_problem is not None, timeout=30)
        assert "refused the credentials" in (engine.health.kafka_problem or "")
        assert engine.addresses is not None
        async with httpx.AsyncClient(timeout=10) as http:
            health = (await http.get(engine.addresses.http_url + "/health")).json()
        assert health["status"] == "degraded"
        assert "refused the credentials" in health["kafka"]["problem"]
        assert "SCRAM-SHA-512" in health["kafka"]["security"]
        # the logins the engine tried meanwhile, over a few seconds: not a tight loop
        window = 6.0
        await _wait(window - (time.monotonic() - revoked))
        failed = [a for a in broker.attempts()[before:] if not a.succeeded]
        rate = len(failed) / (time.monotonic() - revoked)
        print(f"failed logins after the revocation: {len(failed)} in "
              f"{time.monotonic() - revoked:.1f} s ({rate:.1f}/s)")
        assert rate <= 4.0, f"{len(failed)} failed logins in {window:.0f} s"
        # and aiokafka's own log, which repeats every failure of every client, stays short
        noise = [r for r in caplog.records
                 if r.name.startswith("aiokafka") and r.created >= revoked_at]
        print(f"aiokafka log records meanwhile: {len(noise)}")
        assert len(noise) <= 25, [r.getMessage()[:120] for r in noise[:30]]
        # the password is back: the engine connects again and says so
        broker.add_user(USER, PASSWORD)
        await engine.health.wait_until(lambda h: h.kafka_connected and not h.kafka_problem,
                                       timeout=30)
        await _answered(engine, settings)
    finally:
        await engine.stop()
    assert "refused the credentials" in caplog.text
    assert PASSWORD not in caplog.text


async def _wait(seconds: float) -> None:
    """Lets the engine run for ``seconds``: what is measured is what it does meanwhile
    (nothing is awaited here but the passing of time itself)."""
    if seconds > 0:
        await asyncio.sleep(seconds)


async def test_oauthbearer_reads_the_token_file_at_every_login(
    broker: SaslBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "OAUTHBEARER",
           "KAFKA_SASL_OAUTH_TOKEN_FILE": str(token_file)}
    settings = await _settings(tmp_path, broker, env, monkeypatch,  # not the test's SCRAM
                               kafka_sasl_username=None, kafka_sasl_password=None)
    engine = Engine(settings, broker.bootstrap_servers, http_host="127.0.0.1",
                    broker_watch_interval=1.0)
    await engine.start()
    try:
        await _answered(engine, settings)
        # the platform rotates the token: the broker accepts only the new one from now on,
        # the file holds it, and every connection logs in again
        fresh = "token-two-" + uuid.uuid4().hex
        token_file.write_text(fresh)
        broker.set_tokens([fresh])
        broker.drop_connections()
        await _answered(engine, settings)
        logins = [a for a in broker.attempts() if a.mechanism == "OAUTHBEARER"]
        assert logins[-1].succeeded
    finally:
        await engine.stop()


def test_serve_with_a_wrong_password_stops_with_one_line_that_says_so(
    broker: SaslBroker, dev_model_dir: Path, tmp_path: Path
) -> None:
    wrong = "Wr0ng-pa55word-" + uuid.uuid4().hex[:8]
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("KAFKA_", "SERVICE_", "API_KEYS"))}
    env.update(scram(broker, wrong), KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
               KAFKA_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:8]}.", FLUX_MODEL_PATH=str(dev_model_dir),
               SERVICE_PORT="0", OUTPUT_DIR=str(tmp_path / "outputs"), VOICE_BACKEND="local",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    script = str(Path(sys.executable).with_name("multimodal-engine"))
    done = subprocess.run([script, "serve"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("multimodal-engine: cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS=")
    assert "refused the credentials" in last and "KAFKA_SASL_PASSWORD" in last, last
    assert wrong not in done.stderr and wrong not in done.stdout

