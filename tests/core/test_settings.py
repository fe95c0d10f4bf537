from pathlib import Path

import pytest

from core.settings import ConfigurationError, load_settings


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_follow_the_contract() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers is None
    assert settings.kafka_group_id == "multimodal_engine"
    assert settings.public_base_url == ""
    assert settings.event_encoding == "avro"
    assert settings.voice_backend == "auto" and not settings.use_elevenlabs


def test_env_and_dotenv_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SERVICE_PORT=9001\nEVENT_ENCODING=json\n")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    settings = load_settings()
    assert settings.service_port == 9001
    assert settings.event_encoding == "json"
    assert settings.kafka_bootstrap_servers == "k1:9092,k2:9092"


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("SERVICE_PORT", "eighty", "integer"),
        ("SERVICE_PORT", "70000", "<= 65535"),
        ("EVENT_ENCODING", "xml", "'avro' or 'json'"),
        ("VOICE_BACKEND", "cloud", "'auto', 'elevenlabs' or 'local'"),
        ("KAFKA_BOOTSTRAP_SERVERS", "localhost", "host:port"),
        ("AUTO_CLEANUP", "maybe", "boolean"),
        ("KAFKA_GROUP_INSTANCE_ID", "", "non-empty"),
        ("KAFKA_GROUP_INSTANCE_ID", "engine 0", "A-Za-z0-9._-"),
        ("KAFKA_GROUP_INSTANCE_ID", "..", "A-Za-z0-9._-"),
        ("KAFKA_GROUP_INSTANCE_ID", "e" * 250, "249"),
    ],
)
def test_invalid_value_is_one_line_naming_variable_value_and_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert variable in message and repr(value) in message
    assert allowed in message


def test_group_instance_id_follows_kafkas_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().kafka_group_instance_id is None  # unset: a dynamic member
    for value in ("engine-0", "gpu_1.host-a", "...", "e" * 249):
        monkeypatch.setenv("KAFKA_GROUP_INSTANCE_ID", value)
        assert load_settings().kafka_group_instance_id == value


def test_api_key_is_secret_and_selects_elevenlabs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELEVENLABS_API_KEY", "sk_live_do_not_print")
    settings = load_settings()
    assert settings.use_elevenlabs
    assert "sk_live_do_not_print" not in repr(settings)
    assert "sk_live_do_not_print" not in str(settings.model_dump())
    monkeypatch.setenv("VOICE_BACKEND", "local")
    assert not load_settings().use_elevenlabs


@pytest.mark.parametrize(("name", "value"), [
    ("schema_registry_url", "ftp://svc:hunter2@registry.internal:8081"),
    ("persona_engine_url", "tcp://svc:hunter2@persona.internal/v1"),
])
def test_an_invalid_url_setting_is_named_without_its_credentials(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings(**{name: value}, _env_file=None)
    message = str(raised.value)
    assert message.startswith(f"invalid configuration: {name.upper()}=")
    assert "hunter2" not in message and "svc:" not in message
    assert "://***@" in message  # where the secret was, so the operator sees what to fix


def test_default_steps_beyond_the_maximum_stop_start_up(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Accepted, it would refuse every request that gives no num_inference_steps."""
    monkeypatch.setenv("DEFAULT_INFERENCE_STEPS", "50")
    monkeypatch.setenv("MAX_INFERENCE_STEPS", "30")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "DEFAULT_INFERENCE_STEPS=50" in message and "MAX_INFERENCE_STEPS=30" in message
    monkeypatch.setenv("DEFAULT_INFERENCE_STEPS", "30")
    assert load_settings().default_inference_steps == 30


@pytest.mark.parametrize(("resolution", "max_size"), [("500", "2048"), ("1024", "768")])
def test_a_lora_resolution_no_request_could_use_stops_start_up(
        monkeypatch: pytest.MonkeyPatch, resolution: str, max_size: str) -> None:
    """Accepted, it would refuse every training request that gives no resolution."""
    monkeypatch.setenv("LORA_RESOLUTION", resolution)
    monkeypatch.setenv("MAX_IMAGE_SIZE", max_size)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert f"LORA_RESOLUTION={resolution}" in str(info.value)
    assert "multiple of 16" in str(info.value) and f"MAX_IMAGE_SIZE={max_size}" in str(info.value)


def test_the_default_lora_resolution_follows_a_smaller_max_image_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_IMAGE_SIZE", "300")
    assert load_settings().lora_resolution == 288  # the largest multiple of 16 within it
    monkeypatch.setenv("MAX_IMAGE_SIZE", "2048")
    assert load_settings().lora_resolution == 512
