"""Kafka security settings: what fits together, files that cannot be used, secrets kept out
of every message, and the options every client gets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from consumers.security import KafkaSecurity, TokenFile
from core.settings import ConfigurationError, load_settings
from tests.support.tls_broker import CertificateSet

SECRET = "s3cret-Pa55word-never-shown"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    return CertificateSet.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def _no_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SSL_CA_FILE", "KAFKA_SSL_CERT_FILE",
                 "KAFKA_SSL_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def refusal(**settings: object) -> str:
    with pytest.raises(ConfigurationError) as caught:
        KafkaSecurity.from_settings(load_settings(**settings))
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message
    return message


def test_plaintext_by_default_with_no_options_beyond_the_protocol() -> None:
    security = KafkaSecurity.from_settings(load_settings())
    assert security.options() == {"security_protocol": "PLAINTEXT"}
    assert security.describe() == "PLAINTEXT"


def test_scram_over_tls_gives_every_client_the_same_options(
    certificates: CertificateSet
) -> None:
    security = KafkaSecurity.from_settings(load_settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="engine", kafka_sasl_password=SECRET,
        kafka_ssl_ca_file=str(certificates.ca)))
    options = security.options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("engine", SECRET)
    assert options["ssl_context"].check_hostname is True
    assert security.describe() == "SASL_SSL (SCRAM-SHA-512 as engine)"
    assert SECRET not in repr(security)
    assert security.describe(user=False) == "SASL_SSL (SCRAM-SHA-512)"


@pytest.mark.parametrize(("settings", "named"), [
    ({"kafka_security_protocol": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
      "kafka_sasl_password": SECRET}, "KAFKA_SASL_USERNAME"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "SCRAM-SHA-256",
      "kafka_sasl_username": "engine"}, "KAFKA_SASL_PASSWORD"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "OAUTHBEARER"},
     "KAFKA_SASL_OAUTH_TOKEN_FILE"),
    ({"kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "engine",
      "kafka_sasl_password": SECRET}, "KAFKA_SASL_MECHANISM"),  # PLAINTEXT: unused
    ({"kafka_sasl_password": SECRET}, "KAFKA_SASL_PASSWORD"),
    ({"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent/ca.pem"},
     "KAFKA_SSL_CA_FILE"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "SCRAM-SHA-512",
      "kafka_sasl_username": "e", "kafka_sasl_password": SECRET,
      "kafka_ssl_ca_file": "/etc/hostname"}, "KAFKA_SSL_CA_FILE"),  # no TLS: unused
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
      "kafka_sasl_username": "e", "kafka_sasl_password": SECRET,
      "kafka_sasl_oauth_token_file": "/etc/hostname"}, "KAFKA_SASL_OAUTH_TOKEN_FILE"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "OAUTHBEARER",
      "kafka_sasl_oauth_token_file": "/etc/hostname", "kafka_sasl_password": SECRET},
     "KAFKA_SASL_PASSWORD"),
    ({"kafka_replication_factor": 2, "kafka_min_insync_replicas": 3},
     "KAFKA_MIN_INSYNC_REPLICAS"),
])
def test_settings_that_do_not_fit_together_name_the_setting(
    settings: dict[str, object], named: str
) -> None:
    message = refusal(**settings)
    assert f"{named}=" in message, message


def test_a_client_certificate_needs_its_key_and_both_must_be_pem(
    certificates: CertificateSet, tmp_path: Path
) -> None:
    tls = {"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": str(certificates.ca)}
    assert "KAFKA_SSL_KEY_FILE=" in refusal(
        **tls, kafka_ssl_cert_file=str(certificates.cert("client")))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert "KAFKA_SSL_CA_FILE=" in refusal(kafka_security_protocol="SSL",
                                           kafka_ssl_ca_file=str(garbage))
    assert "KAFKA_SSL_CERT_FILE=" in refusal(**tls, kafka_ssl_cert_file=str(garbage),
                                             kafka_ssl_key_file=str(garbage))
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_text("x")
    unreadable.chmod(0)
    try:
        if not unreadable.stat().st_mode & 0o444 and _readable(unreadable):
            pytest.skip("running as root: every file is readable")
        assert "KAFKA_SSL_CA_FILE=" in refusal(kafka_security_protocol="SSL",
                                               kafka_ssl_ca_file=str(unreadable))
    finally:
        unreadable.chmod(0o600)


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True


def test_mutual_tls_loads_the_client_certificate(certificates: CertificateSet) -> None:
    security = KafkaSecurity.from_settings(load_settings(
        kafka_security_protocol="SSL", kafka_ssl_ca_file=str(certificates.ca),
        kafka_ssl_cert_file=str(certificates.cert("client")),
        kafka_ssl_key_file=str(certificates.key("client"))))
    assert security.options()["ssl_context"] is not None
    assert security.describe() == "SSL"


async def test_the_oauth_token_is_read_at_every_authentication(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    security = KafkaSecurity.from_settings(load_settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="OAUTHBEARER",
        kafka_sasl_oauth_token_file=str(path)))
    provider = security.options()["sasl_oauth_token_provider"]
    assert isinstance(provider, TokenFile)
    assert await provider.token() == "first-token"
    path.write_text("refreshed-token")  # what the platform's refresher does
    assert await provider.token() == "refreshed-token"
    path.write_text("")
    with pytest.raises(Exception, match="KAFKA_SASL_OAUTH_TOKEN_FILE"):
        await asyncio.wait_for(provider.token(), 5)
