"""Configuration from the environment and ``.env``: every variable of the contract.

Built once at the entry point (:func:`load_settings`) and handed down; components receive
only their part. Invalid values stop start-up with :class:`ConfigurationError`, whose
message is one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.net.policy import AllowedHosts

__all__ = ["ConfigurationError", "Settings", "env_file_values", "load_settings"]

_USERINFO = re.compile(r"://[^/?#\s]*@")
_SECRET_FIELDS = {"api_keys", "elevenlabs_api_key", "kafka_sasl_password",
                  "schema_registry_user_info"}


class ConfigurationError(Exception):
    """A configuration value is invalid; the message is one line, never a secret."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- service (original .env.example) ---
    service_name: str = Field("multimodal_engine", min_length=1)
    service_port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # --- HTTP: API keys (http_files/auth.py) and probes (http_files/health.py) ---
    api_keys: SecretStr | None = Field(
        None, description="comma-separated bearer keys, each plain or sha256:<64 hex>; "
        "unset: the HTTP API is open")
    metrics_require_key: bool = True
    outputs_require_key: bool = Field(
        True, description="with API_KEYS set, /outputs and /streams/voice need a key; false: "
        "open, as capability URLs")
    liveness_gpu_stuck_seconds: float = Field(
        900.0, gt=0, le=86400,
        description="seconds the GPU worker may spend on one item before /health/live fails")

    # --- model ---
    flux_model_path: Path | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    use_fp16: bool = False
    default_inference_steps: int = Field(28, ge=1, le=100)
    default_guidance_scale: float = Field(3.5, ge=0.0, le=30.0)
    default_negative_prompt: str = ""
    max_image_size: int = Field(2048, ge=64, le=4096)
    max_batch_size: int = Field(4, ge=1, le=64)
    max_inference_steps: int = Field(100, ge=1, le=1000)
    memory_mode: Literal["none", "model_offload", "sequential_offload"] = "none"
    attention_backend: str = Field("auto", pattern=r"^[a-z0-9_]+$",
                                   description="auto: the fastest kernel this machine runs "
                                   "(core/image/attention.py)")
    vae_tiling_threshold: int = Field(1536, ge=64, description="pixels per side")
    flux_max_sequence_length: int = Field(512, ge=16, le=512)
    true_cfg_scale: float = Field(4.0, gt=1.0, le=30.0)
    batch_window_ms: int = Field(20, ge=0, le=10000)
    lora_cache_size: int = Field(4, ge=1, le=64)
    compile_transformer: bool = False
    compile_cache: Literal["off", "local", "shared"] = Field(
        "local", description="with COMPILE_TRANSFORMER: keep the compiled kernels in "
        "OUTPUT_DIR/.compile-cache (local), and in the shared store for the next instance "
        "(shared: its writers must be trusted like the weights; core/image/compile_cache.py)")
    fuse_qkv: bool = Field(True, description="with COMPILE_TRANSFORMER: one projection for "
                           "query, key and value, LoRAs kept (core/image/fused_qkv.py)")
    # --- GPU speed (core/image/acceleration.py): what bench/gpu_check.py measures ---
    quantization: Literal["none", "fp8"] = "none"
    step_cache: Literal["none", "first_block", "taylorseer", "mag"] = "none"
    step_cache_threshold: float | None = Field(
        None, gt=0, le=1, description="first_block and mag: skip a step below this change "
        "(their defaults 0.05 and 0.06 when unset)")
    step_cache_interval: int = Field(5, ge=2, le=50,
                                     description="taylorseer: one full step in this many")
    progress_interval: float = Field(0.5, ge=0.0)
    result_cache_max_entries: int = Field(100_000, ge=1)
    dev_model_dir: Path = Path(".cache/dev-flux")

    # --- LoRA ---
    lora_output_dir: Path = Path("lora_models")
    min_lora_images: int = Field(5, ge=1)
    max_lora_images: int = Field(50, ge=1)
    lora_train_steps: int = Field(1000, ge=1, le=100_000)
    lora_learning_rate: float = Field(1e-4, gt=0, le=1.0)
    lora_resolution: int = Field(512, ge=64, le=2048)
    lora_batch_size: int = Field(1, ge=1, le=16)
    lora_checkpoint_every: int = Field(20, ge=1)
    lora_max_image_bytes: int = Field(20 * 2**20, ge=1024)
    lora_max_image_pixels: int = Field(40_000_000, ge=4096)
    lora_max_upload_bytes: int = Field(256 * 2**20, ge=2**20,
                                       description="one POST /train-lora body")
    max_concurrent_uploads: int = Field(2, ge=1, le=64)
    lora_fetch_timeout: float = Field(30.0, gt=0)
    lora_fetch_allowed_hosts: str = Field("", description="internal hosts URLs may name")
    lora_training_only: bool = False

    # --- image requests: stacked LoRAs (issue 11) ---
    max_loras_per_request: int = Field(3, ge=1, le=16,
                                       description="character_lora_id and loras, in all")

    # --- files ---
    output_dir: Path = Path("outputs")
    temp_dir: Path = Path("temp")
    auto_cleanup: bool = True
    cleanup_delay: float = Field(3600, gt=0, description="seconds a file lives")
    public_base_url: str = ""

    # --- shared storage (core/storage): what outlives an instance, for a fleet ---
    storage_url: str | None = Field(
        None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?$",
        description="s3://bucket/prefix; unset: the local folders only")
    storage_endpoint_url: str | None = Field(
        None, pattern=r"^https?://", description="a non-AWS endpoint (MinIO, R2, GCS)")
    storage_timeout: float = Field(30.0, gt=0, le=600,
                                   description="seconds one store request may take")
    output_urls: Literal["engine", "presigned"] = "engine"
    output_url_ttl_seconds: int = Field(3600, ge=1, le=7 * 86400,
                                        description="lifetime of a presigned URL")

    # --- voice ---
    voice_backend: Literal["auto", "elevenlabs", "local"] = "auto"
    elevenlabs_api_url: str = Field("https://api.elevenlabs.io/v1", pattern=r"^https?://")
    elevenlabs_api_key: SecretStr | None = None
    default_voice_id: str = Field("21m00Tcm4TlvDq8ikWAM", min_length=1)
    elevenlabs_model_id: str = Field("eleven_multilingual_v2", min_length=1)
    # ElevenLabs' names (core/voice/formats.py): the format of a request that names none
    elevenlabs_output_format: str = Field(
        "mp3_44100_128", pattern=r"^(mp3_\d+_\d+|pcm_\d+|ulaw_8000|alaw_8000|opus_48000_\d+)$")
    elevenlabs_max_concurrency: int = Field(4, ge=1, le=100)
    # The account's limit, shared by every instance on its key (a fleet-wide figure): no
    # process exceeds it; each still adapts below it to the 429s the fleet meets.
    elevenlabs_account_concurrency: int | None = Field(None, ge=1, le=100)
    elevenlabs_adaptive_concurrency: bool = True
    elevenlabs_timeout: float = Field(30.0, gt=0)
    voice_profiles_path: Path | None = None
    # Live voice streams (core/voice/streams.py): where this instance is reached directly
    # (unset: PUBLIC_BASE_URL) and its name in stream URLs (unset: the host name)
    voice_stream_base_url: str | None = Field(None, pattern=r"^https?://")
    voice_stream_instance: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,100}$")
    voice_stream_linger_seconds: float = Field(60.0, ge=0, le=3600)

    # --- voice: the longest text (core/voice/service.py; sizes in docs/voice.md) ---
    # Above the largest per-request limit (40,000, flash/turbo v2.5), so that every model
    # that stitches speaks a longer text in stitched parts; at most ≈ 100 min of speech.
    voice_max_text_chars: int = Field(
        50_000, ge=1, le=100_000,
        description="characters of one voice request (≈ 1 MB of MP3 on disk per 1,000 at "
                    "128 kbps; memory stays bounded: docs/voice.md)")

    # --- Persona Engine ---
    persona_engine_url: str | None = Field(None, pattern=r"^https?://")
    persona_engine_model: str = Field("persona", min_length=1)
    persona_engine_timeout: float = Field(2.0, gt=0, le=60)

    # --- Kafka ---
    kafka_bootstrap_servers: str | None = None
    kafka_group_id: str = Field("multimodal_engine", min_length=1)
    kafka_topic_prefix: str = ""
    kafka_topic_partitions: int = Field(6, ge=1, le=1000)
    kafka_fetch_max_wait_ms: int = Field(10, ge=0, le=10000)
    kafka_session_timeout_ms: int = Field(10000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(1000, ge=100)
    # Static membership (consumers/kafka.py): one id per instance, the same across its
    # restarts, never two live instances with one id. Kafka's rule for group.instance.id
    # (its topic-name rule): at most 249 of [A-Za-z0-9._-], and not "." or "..".
    kafka_group_instance_id: str | None = Field(
        None, min_length=1, max_length=249,
        pattern=r"^(?:\.*[A-Za-z0-9_-][A-Za-z0-9._-]*|\.{3,})$")
    kafka_idempotence: Literal["auto", "on", "off"] = "auto"
    # Topics the engine creates (consumers/topics.py): unset, as many replicas as the
    # cluster has brokers, up to 3, and min.insync.replicas one fewer from 3 replicas on
    # (the broker's default below that).
    kafka_replication_factor: int | None = Field(None, ge=1, le=32)
    kafka_min_insync_replicas: int | None = Field(None, ge=1, le=32)
    # Security (consumers/security.py): one set of options for every Kafka client
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512",
                                  "OAUTHBEARER"] | None = None
    kafka_sasl_username: str | None = Field(None, min_length=1)
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_oauth_token_file: Path | None = Field(
        None, description="a file holding the current OAUTHBEARER token, read at every "
        "(re)authentication, so the platform may refresh it")
    kafka_ssl_ca_file: Path | None = Field(None, description="PEM; unset: the system's CAs")
    kafka_ssl_cert_file: Path | None = Field(None, description="PEM client certificate "
                                             "(mutual TLS), with KAFKA_SSL_KEY_FILE")
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_check_hostname: bool = True
    event_encoding: Literal["avro", "json"] = "avro"
    embedded_broker: Literal["tansu", "rdkafka-mock"] = "tansu"

    # --- Schema Registry (schemas/registry.py): unset, Avro single-object encoding ---
    schema_registry_url: str | None = Field(
        None, pattern=r"^https?://[^\s/@]+(/\S*)?$",
        description="Confluent Schema Registry; Avro then uses Confluent's wire format")
    schema_registry_user_info: SecretStr | None = Field(
        None, description="user:password, sent as HTTP basic auth")
    schema_registry_timeout: float = Field(5.0, gt=0, le=120,
                                           description="seconds per registry call")

    # --- delivery and scheduling ---
    max_in_flight_image: int = Field(16, ge=1, le=10000,
                                     description="images taken in at once (GPU queue)")
    max_in_flight_voice: int = Field(32, ge=1, le=10000)
    max_in_flight_lora: int = Field(2, ge=1, le=100)
    max_in_flight_per_conversation: int = Field(2, ge=1, le=1000)
    max_buffered_records: int = Field(1000, ge=1, le=1_000_000,
                                      description="fetched and unanswered, per kind")
    max_buffered_bytes: int = Field(64 * 2**20, ge=2**20,
                                    description="bytes of those records, per kind")
    replay_age_seconds: float = Field(600.0, gt=0,
                                      description="older records count as background")
    cancel_memory_seconds: float = Field(600.0, ge=0,
                                         description="how long a cancel is remembered")
    cancel_barrier_seconds: float = Field(
        2.0, ge=0, le=60,
        description="longest wait of a request for the cancels published before it; 0: off")
    retry_max_attempts: int = Field(6, ge=1, le=20,
                                    description="upstream attempts per request, all layers")
    retry_base_delay: float = Field(0.5, ge=0.0)
    retry_max_delay: float = Field(30.0, ge=0.0)
    shutdown_grace_seconds: float = Field(30.0, ge=0.0)
    rebalance_grace_seconds: float = Field(5.0, ge=0.0)

    # --- operations: logs and tracing (core/telemetry) ---
    log_format: Literal["text", "json"] = "text"
    otel_exporter_otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://",
        description="OTLP/HTTP collector; spans are exported with the otel extra installed")

    @field_validator("otel_exporter_otlp_endpoint", "step_cache_threshold", "storage_url",
                     "storage_endpoint_url", "elevenlabs_account_concurrency",
                     "kafka_replication_factor", "kafka_min_insync_replicas",
                     "kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password",
                     "kafka_sasl_oauth_token_file", "kafka_ssl_ca_file", "kafka_ssl_cert_file",
                     "kafka_ssl_key_file", "schema_registry_url", "schema_registry_user_info",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_key_list(cls, value: object) -> object:
        """Checks the form of each entry; the message never repeats one."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str):
            return value
        if not text.strip():
            return None
        for number, entry in enumerate(text.split(","), start=1):
            if not _API_KEY.fullmatch(entry.strip()):
                raise ValueError(
                    "comma-separated keys, each sha256:<64 hex digits> or at least 16 "
                    f"characters of A-Z a-z 0-9 - . _ ~ + / (entry {number} is not)")
        return text.strip()

    @field_validator("schema_registry_user_info")
    @classmethod
    def _user_info(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and ":" not in value.get_secret_value():
            raise ValueError("user:password")  # the message never repeats the value
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_list(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        for part in value.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError("a list host:port,host:port")
        return value.strip()

    @field_validator("lora_fetch_allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: str) -> str:
        AllowedHosts.parse(value)  # raises ValueError naming the bad entry
        return value.strip()

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def use_elevenlabs(self) -> bool:
        if self.voice_backend == "auto":
            return self.elevenlabs_api_key is not None
        return self.voice_backend == "elevenlabs"

    def topic(self, name: str) -> str:
        """The configured name of a contract topic (prefix + name)."""
        return f"{self.kafka_topic_prefix}{name}"


# An RFC 6750 bearer token (b64token), so that it can be sent as it is, or its SHA-256
_API_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}|[A-Za-z0-9._~+/-]{16,}=*")

_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "bool_parsing": "a boolean (true/false, 1/0, yes/no)",
    "string_too_short": "a non-empty string",
}


def _describe(error: Mapping[str, Any]) -> str:
    if error.get("type") in _TYPE_WORDS:
        return _TYPE_WORDS[str(error["type"])]
    ctx = error.get("ctx") or {}
    if "expected" in ctx:
        return f"one of {ctx['expected']}"
    if "pattern" in ctx:
        return f"a value matching {ctx['pattern']}"
    if "error" in ctx:
        return str(ctx["error"]).removeprefix("Value error, ")
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"a number {word} {ctx[key]}"
    return str(error.get("msg", "a valid value"))


def _without_credentials(value: object) -> object:
    """``value`` with the user information of any URL in it (``https://user:password@``)
    replaced by ``***``: an invalid URL setting is named in the error, its secret is not."""
    return _USERINFO.sub("://***@", value) if isinstance(value, str) else value


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and ``.env`` (overrides win).

    Raises :class:`ConfigurationError` naming the first invalid variable, its value and
    what is allowed, in one line; secrets are shown as ``'**********'``.
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        value = "**********" if name in _SECRET_FIELDS else _without_credentials(
            first.get("input"))
        raise ConfigurationError(
            f"invalid configuration: {name.upper()}={value!r} (allowed: {_describe(first)})"
        ) from None
    if settings.min_lora_images > settings.max_lora_images:
        raise ConfigurationError(
            f"invalid configuration: MIN_LORA_IMAGES={settings.min_lora_images!r} "
            f"(allowed: at most MAX_LORA_IMAGES={settings.max_lora_images})"
        )
    largest = settings.max_image_size // 16 * 16
    if settings.lora_resolution > largest and "lora_resolution" not in settings.model_fields_set:
        # the default, under a MAX_IMAGE_SIZE below it: the largest side allowed
        settings = settings.model_copy(update={"lora_resolution": largest})
    if settings.lora_resolution % 16 or settings.lora_resolution > settings.max_image_size:
        raise ConfigurationError(
            f"invalid configuration: LORA_RESOLUTION={settings.lora_resolution!r} (allowed: a "
            f"multiple of 16, at most MAX_IMAGE_SIZE={settings.max_image_size})"
        )
    if settings.default_inference_steps > settings.max_inference_steps:
        raise ConfigurationError(
            f"invalid configuration: DEFAULT_INFERENCE_STEPS="
            f"{settings.default_inference_steps!r} (allowed: at most MAX_INFERENCE_STEPS="
            f"{settings.max_inference_steps})"
        )
    _check_kafka_security(settings)
    if settings.output_urls == "presigned" and settings.storage_url is None:
        raise ConfigurationError(
            "invalid configuration: OUTPUT_URLS='presigned' (allowed: only with "
            "STORAGE_URL set; the local folders have no signed URLs)")
    return settings


def env_file_values(env_file: Path = Path(".env")) -> dict[str, str]:
    """What :func:`load_settings` takes from ``env_file`` (the working directory's ``.env``):
    ``{VARIABLE: value}`` for each setting the file sets and the environment does not (the
    environment wins). Empty without such a file."""
    from dotenv import dotenv_values

    if not env_file.is_file():
        return {}
    environment = {name.lower() for name in os.environ}
    return {name.upper(): value
            for name, value in dotenv_values(env_file, encoding="utf-8").items()
            if value is not None and name.lower() in Settings.model_fields
            and name.lower() not in environment}


def _check_kafka_security(settings: Settings) -> None:
    """The Kafka security settings fit together and their files can be read; the message
    names the setting (never a secret's value)."""
    protocol = settings.kafka_security_protocol
    sasl, tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
    mechanism = settings.kafka_sasl_mechanism

    def refuse(name: str, value: object, allowed: str) -> None:
        raise ConfigurationError(f"invalid configuration: {name}={value!r} (allowed: {allowed})")

    if sasl and mechanism is None:
        refuse("KAFKA_SASL_MECHANISM", None, f"PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or "
               f"OAUTHBEARER with KAFKA_SECURITY_PROTOCOL={protocol}")
    if not sasl:
        for name in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password",
                     "kafka_sasl_oauth_token_file"):
            if getattr(settings, name) is not None:
                value = "**********" if name in _SECRET_FIELDS else getattr(settings, name)
                refuse(name.upper(), value, "only with KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT "
                       f"or SASL_SSL (it is {protocol})")
    if mechanism == "OAUTHBEARER":
        if settings.kafka_sasl_oauth_token_file is None:
            refuse("KAFKA_SASL_OAUTH_TOKEN_FILE", None, "a token file with "
                   "KAFKA_SASL_MECHANISM=OAUTHBEARER")
        for name in ("kafka_sasl_username", "kafka_sasl_password"):
            if getattr(settings, name) is not None:
                value = "**********" if name in _SECRET_FIELDS else getattr(settings, name)
                refuse(name.upper(), value, "unset with KAFKA_SASL_MECHANISM=OAUTHBEARER "
                       "(the token file is its credential)")
    elif mechanism is not None:
        if settings.kafka_sasl_oauth_token_file is not None:
            refuse("KAFKA_SASL_OAUTH_TOKEN_FILE", str(settings.kafka_sasl_oauth_token_file),
                   f"only with KAFKA_SASL_MECHANISM=OAUTHBEARER (it is {mechanism})")
        if settings.kafka_sasl_username is None:
            refuse("KAFKA_SASL_USERNAME", None, f"a user name with KAFKA_SASL_MECHANISM={mechanism}")
        if settings.kafka_sasl_password is None:
            refuse("KAFKA_SASL_PASSWORD", None, f"a password with KAFKA_SASL_MECHANISM={mechanism}")
    files = {"KAFKA_SSL_CA_FILE": settings.kafka_ssl_ca_file,
             "KAFKA_SSL_CERT_FILE": settings.kafka_ssl_cert_file,
             "KAFKA_SSL_KEY_FILE": settings.kafka_ssl_key_file}
    if not tls:
        for name, path in files.items():
            if path is not None:
                refuse(name, str(path), "only with KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL "
                       f"(it is {protocol}: nothing would use it)")
    if (settings.kafka_ssl_cert_file is None) != (settings.kafka_ssl_key_file is None):
        missing = "KAFKA_SSL_KEY_FILE" if settings.kafka_ssl_key_file is None \
            else "KAFKA_SSL_CERT_FILE"
        refuse(missing, None, "set with its pair: mutual TLS needs the client certificate "
               "and its key")
    files["KAFKA_SASL_OAUTH_TOKEN_FILE"] = settings.kafka_sasl_oauth_token_file
    for name, path in files.items():
        if path is not None:
            _check_readable(name, path)
    if (settings.kafka_replication_factor is not None
            and settings.kafka_min_insync_replicas is not None
            and settings.kafka_min_insync_replicas > settings.kafka_replication_factor):
        refuse("KAFKA_MIN_INSYNC_REPLICAS", settings.kafka_min_insync_replicas,
               f"at most KAFKA_REPLICATION_FACTOR={settings.kafka_replication_factor}")


def _check_readable(name: str, path: Path) -> None:
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(
            f"invalid configuration: {name}={str(path)!r} (allowed: a readable file; "
            f"{reason.lower()})") from None
