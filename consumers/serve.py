"""The ``serve`` and ``dev`` process entries: build, start, wait for a signal, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Self

from aiokafka.errors import KafkaConnectionError

from consumers.broker import launch_broker
from consumers.devstate import DevState, clear_state, write_state
from consumers.engine import Engine, EngineAddresses
from consumers.security import diagnose, without_security
from consumers.topics import CONTRACT_TOPICS, Replication, ensure_topics
from core.image.devmodel import DEV_MODEL_NAME, build_dev_model, make_dev_lora
from core.image.loader import ModelLoadError
from core.lora.registry import LoraRegistry
from core.settings import ConfigurationError, Settings
from core.storage import StorageError
from schemas.errors import UnknownLoraError
from schemas.registry import SchemaRegistryError

__all__ = ["DEV_LORA_ID", "StartupError", "StartupInterrupted", "prepare_dev_model", "run_dev",
           "run_serve"]

DEV_LORA_ID = "sarah_v1"

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """Start-up cannot go on; the message says why and what to do."""


class StartupInterrupted(StartupError):
    """A stop signal came before the engine served; what had started is stopped.
    ``exit_code`` is the shell's for that signal (130 for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__("interrupted during start-up" if signum == signal.SIGINT
                         else f"stopped by {name} during start-up")
        self.exit_code = 128 + signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _StopSignals:
    """SIGTERM, SIGINT and SIGHUP (a closed terminal) from before anything starts until
    everything stopped. During start-up the first one cancels the start (what started is
    stopped, :class:`StartupInterrupted` follows); while serving it begins the graceful
    stop; one more during that stop ends its grace at once (:meth:`Engine.stop_now`)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        self.engine: Engine | None = None  # once built: the one a later signal hurries
        self.received: int | None = None  # the signal that interrupted the start-up
        self._serving = False
        self._stopping = False
        self.hurried = False  # a signal came during the stop: nothing waits any more

    def __enter__(self) -> Self:
        for sig in _STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for sig in _STOP_SIGNALS:
            self._loop.remove_signal_handler(sig)

    def serving(self) -> None:
        """The start is over: a signal from now on stops the engine gracefully."""
        self._serving = True

    def stopping(self) -> None:
        """The engine stops (asked to, or by itself): a signal now hurries the stop."""
        self._stopping = True

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            self.hurried = True
            logger.warning("%s during the stop: stopping now, without waiting for in-flight "
                           "work (left uncommitted, it is redelivered)", name)
            if self.engine is not None:
                self.engine.stop_now()
        elif self._serving:
            assert self.engine is not None
            self._stopping = True
            logger.info("%s: stopping gracefully (another one stops at once)", name)
            self.engine.request_stop()
        else:
            self._stopping = True
            self.received = signum
            logger.info("%s during start-up: stopping what started", name)
            if self._main is not None:
                self._main.cancel()

    def interrupted(self) -> StartupInterrupted | None:
        """The error to raise for a start-up cancelled by a signal (None: not by one)."""
        if self.received is None:
            return None
        if self._main is not None:
            self._main.uncancel()
        return StartupInterrupted(self.received)


async def _under_stop_signals(main: Callable[[Settings, _StopSignals], Awaitable[None]],
                              settings: Settings) -> None:
    """``main(settings, signals)`` with the stop signals handled from its first step; a
    start-up a signal cancelled raises :class:`StartupInterrupted`."""
    with _StopSignals() as signals:
        try:
            await main(settings, signals)
        except asyncio.CancelledError:
            if (interrupted := signals.interrupted()) is None:
                raise
            raise interrupted from None


async def _serve_until_signal(engine: Engine, signals: _StopSignals) -> None:
    signals.serving()
    try:
        await engine.wait_stopped()
    finally:
        signals.stopping()
        logger.info("stopping: draining in-flight work")
        await engine.stop()
    if engine.crashed is not None:
        raise StartupError(f"the consume loop stopped with an error: {engine.crashed!r}")


async def run_serve(settings: Settings) -> None:
    """Production entry: the configured broker, or a clear error. Raises
    :class:`StartupError` (:class:`StartupInterrupted` for a stop signal during start-up)
    or :class:`~core.settings.ConfigurationError`."""
    await _under_stop_signals(_serve, settings)


async def _serve(settings: Settings, signals: _StopSignals) -> None:
    if settings.kafka_bootstrap_servers is None:
        raise StartupError(
            "KAFKA_BOOTSTRAP_SERVERS is not set: `serve` needs a Kafka broker "
            "(host:port,…); for a local all-in-one setup use `multimodal-engine dev`"
        )
    if settings.flux_model_path is None:
        raise StartupError(
            "FLUX_MODEL_PATH is not set: `serve` needs a local FLUX.1 folder (diffusers "
            "layout, see docs/deployment.md); `multimodal-engine dev-model DIR` writes the "
            "tiny development model, and `multimodal-engine dev` uses it by itself"
        )
    bootstrap = settings.kafka_bootstrap_servers
    engine = signals.engine = Engine(settings, bootstrap, model_path=settings.flux_model_path)
    await _ensure_topics(settings, engine, bootstrap)
    addresses = await _start(engine, bootstrap)
    _announce(settings, f"engine serving: kafka={addresses.bootstrap_servers} "
                        f"http={addresses.http_url} voice={engine.voice.backend.name} "
                        f"model={_model_line(engine)}")
    await _serve_until_signal(engine, signals)


async def _start(engine: Engine, bootstrap: str) -> EngineAddresses:
    """Starts the engine or turns what stopped it into one clear :class:`StartupError`."""
    try:
        return await engine.start()
    except KafkaConnectionError as exc:
        await engine.stop()
        why = await diagnose(bootstrap, engine.kafka_security)
        raise StartupError(
            f"cannot reach Kafka at KAFKA_BOOTSTRAP_SERVERS={bootstrap}: {why or exc}") from exc
    except ModelLoadError as exc:
        await engine.stop()
        raise StartupError(f"cannot load the image model: {exc}") from exc
    except StorageError as exc:
        await engine.stop()
        raise StartupError(f"cannot use the store at STORAGE_URL: {exc}") from exc
    except SchemaRegistryError as exc:  # incompatible subject, unreachable, refused
        await engine.stop()
        raise StartupError(f"SCHEMA_REGISTRY_URL: {exc}") from exc
    except (ConfigurationError, asyncio.CancelledError):  # a setting; a stop signal
        await engine.stop()
        raise


async def _ensure_topics(settings: Settings, engine: Engine, bootstrap: str) -> None:
    """The contract's topics on a broker the engine does not own: best effort, replicated
    as KAFKA_REPLICATION_FACTOR and KAFKA_MIN_INSYNC_REPLICAS say."""
    await ensure_topics(
        bootstrap, [settings.topic(t) for t in CONTRACT_TOPICS], settings.kafka_topic_partitions,
        replication=Replication(settings.kafka_replication_factor,
                                settings.kafka_min_insync_replicas),
        security=engine.kafka_security)


def _announce(settings: Settings, text: str) -> None:
    """The start-up banner, whatever LOG_LEVEL is: printed for a person, or one INFO log
    record when logs are JSON (LOG_FORMAT=json: every line of the output parses). It is no
    diagnostic but the line saying the engine is up and where, so LOG_LEVEL=WARNING (which
    a plain text banner ignores too) does not hide it."""
    if settings.log_format == "json":
        # handed to the handlers directly, past the level check; still an INFO line, so
        # that nothing watching for warnings takes it for one
        logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, "%s",
                                        (text,), None, "_announce"))
    else:
        print(text, flush=True)


def _model_line(engine: Engine) -> str:
    if engine.image is None:
        return "none"
    model = engine.image.model
    return f"{model.name} (development model)" if model.development_model else model.name


def prepare_dev_model(settings: Settings) -> Path:
    """The tiny development model (built once, cached in DEV_MODEL_DIR) with the
    development LoRA ``sarah_v1`` (trigger word ``sarah``) registered, so the original
    API's example request works as it is."""
    path = build_dev_model(settings.dev_model_dir)
    registry = LoraRegistry(settings.lora_output_dir)
    try:
        registry.get(DEV_LORA_ID)
    except UnknownLoraError:
        with tempfile.TemporaryDirectory() as tmp:
            weights = make_dev_lora(path, Path(tmp) / f"{DEV_LORA_ID}.safetensors", seed=1)
            registry.register(DEV_LORA_ID, weights, trigger_word="sarah",
                              base_model=DEV_MODEL_NAME)
    return path


def _embedded_group_timing(settings: Settings) -> Settings:
    """Tansu makes a first group join wait half the session timeout (docs/brokers.md):
    on the embedded broker, unless configured, `dev` uses a 3 s session so its first
    answer comes after ~2 s instead of ~5 s. The dev configuration is decided here,
    once, at the entry point."""
    update: dict[str, int] = {}
    if "kafka_session_timeout_ms" not in settings.model_fields_set:
        update["kafka_session_timeout_ms"] = 3000
    if "kafka_heartbeat_interval_ms" not in settings.model_fields_set:
        update["kafka_heartbeat_interval_ms"] = 300
    return settings.model_copy(update=update)


def _embedded_plaintext(settings: Settings) -> Settings:
    """The embedded broker is plaintext on 127.0.0.1: Kafka security settings (meant for a
    configured broker) are set aside, with a warning, rather than failing to connect."""
    if settings.kafka_security_protocol == "PLAINTEXT":
        return settings
    logger.warning("KAFKA_SECURITY_PROTOCOL=%s is for KAFKA_BOOTSTRAP_SERVERS, which is "
                   "unset: the embedded broker is plaintext on 127.0.0.1",
                   settings.kafka_security_protocol)
    return without_security(settings)


async def run_dev(settings: Settings) -> None:
    """Everything on one machine: embedded broker unless configured, local voice without a
    key; prints what it started and records it for ``send``. Raises as :func:`run_serve`;
    the embedded broker is stopped whatever happens."""
    await _under_stop_signals(_dev, settings)


async def _dev(settings: Settings, signals: _StopSignals) -> None:
    if settings.kafka_bootstrap_servers is None:
        settings = _embedded_plaintext(_embedded_group_timing(settings))
    with ExitStack() as stack:
        bootstrap = settings.kafka_bootstrap_servers
        broker_note = "external (KAFKA_BOOTSTRAP_SERVERS)"
        topics = [settings.topic(t) for t in CONTRACT_TOPICS]
        if bootstrap is None:
            broker = launch_broker(settings.embedded_broker)
            broker.start()
            # a graceful Tansu waits ~5 s for its clients to go: not after a 2nd signal
            stack.callback(lambda: broker.stop(1.0 if signals.hurried else 10.0))
            broker.create_topics(topics, settings.kafka_topic_partitions)
            bootstrap = broker.bootstrap_servers
            broker_note = f"embedded {broker.name}"
        model_path = settings.flux_model_path or await asyncio.to_thread(
            prepare_dev_model, settings)
        engine = signals.engine = Engine(settings, bootstrap, model_path=model_path,
                                         http_host="127.0.0.1")
        if settings.kafka_bootstrap_servers is not None:
            await _ensure_topics(settings, engine, bootstrap)
        addresses = await _start(engine, bootstrap)
        write_state(DevState(os.getpid(), bootstrap, addresses.http_url,
                             settings.kafka_topic_prefix))
        stack.callback(clear_state, os.getpid())
        _announce(
            settings,
            "multimodal-engine dev is up\n"
            f"  broker      {bootstrap} ({broker_note}, {settings.kafka_topic_partitions} "
            "partitions per topic)\n"
            f"  http        {addresses.http_url}  (/health, /metrics, /outputs/…, "
            "POST /generate/image, POST /generate/voice, POST /train-lora, "
            "DELETE /requests/{id}, /openapi.json, /schemas/{fingerprint})\n"
            f"  voice       {engine.voice.backend.name}\n"
            f"  image model {_model_line(engine)} from {model_path}\n"
            f"  LoRAs       {settings.lora_output_dir.resolve()} "
            f"({', '.join(i.lora_id for i in LoraRegistry(settings.lora_output_dir).list())})\n"
            f"  outputs     {settings.output_dir.resolve()}\n"
            f"  store       {settings.storage_url or 'none: the local folders alone'}\n"
            "try:  multimodal-engine send voice \"Hello, I'm Sarah!\"\n"
            "      multimodal-engine send image \"portrait in a cafe\" --lora sarah_v1 "
            "--width 256 --height 256 --steps 8\n"
            "(Ctrl-C stops)",
        )
        await _serve_until_signal(engine, signals)

