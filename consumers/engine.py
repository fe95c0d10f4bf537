"""One engine process: the consume loop and the HTTP app, started and stopped together.

Built once from :class:`~core.settings.Settings` at the entry point; every component gets
its part through its constructor.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumers.control import ControlReader
from consumers.flow import FlowLimits
from consumers.handlers import ImageHandler, LoraHandler, VoiceHandler
from consumers.kafka import (
    build_consumer,
    build_control_consumer,
    build_producer,
    resolve_idempotence,
    stop_within,
)
from consumers.login_backoff import install_login_backoff
from consumers.publisher import EventPublisher
from consumers.retry import RetryPolicy
from consumers.routes import Route
from consumers.runtime import ConsumeLoop, DeliveryConfig, ResultTopics
from consumers.schema_registry import registry_client, registry_framing
from consumers.security import KafkaSecurity, diagnose
from core.health import EngineHealth, ImageModelInfo, probe_gpu
from core.image.factory import build_image_service
from core.image.service import ImageService
from core.image.worker import GpuWorker
from core.metrics import EngineMetrics, VoiceQuotaFigures
from core.outputs import OutputStore
from core.scheduling import build_scheduling
from core.settings import ConfigurationError, Settings
from core.storage import SharedOutputs, build_object_store
from core.telemetry import ObservedClient, UpstreamNames, build_spans
from core.telemetry.gpu import cuda_memory
from core.training import TrainingService, build_training_service
from core.version import engine_version
from core.voice import build_voice_service
from http_files import AppServices, create_app
from http_files.auth import access_policy, warn_if_open
from http_files.serving import app_runner
from http_files.uploads import upload_limits
from schemas.codec import EventCodec
from schemas.events import (
    Event,
    GenerationCompleted,
    GenerationControl,
    GenerationFailed,
    GenerationProgress,
    ImageRequested,
    LoraTrainingRequested,
    VoiceRequested,
    utc_now_iso,
)
from schemas.registry import RegistryFraming, register_writer_schemas

__all__ = ["Engine", "EngineAddresses"]

# After SHUTDOWN_GRACE_SECONDS (the drain), what stopping may still take at most: leaving
# the group, flushing, checkpointing trainings, the GPU worker, HTTP. With the broker gone
# each of these would otherwise wait for ever; the orchestrator's kill comes after it.
_STOP_MARGIN = 10.0
_HURRY = 3.0  # seconds the rest of a stop may take once stop_now ended its grace
_CONTROL_CATCH_UP = 10.0  # seconds start-up waits for the recent cancels
_DIAGNOSE_EVERY = 30.0  # seconds between lookups of why the broker refuses us

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineAddresses:
    bootstrap_servers: str
    http_url: str


class Engine:
    """Consumers + HTTP in one process. ``start`` → ``wait_stopped`` → ``stop``."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        *,
        registry: CollectorRegistry | None = None,
        model_path: Path | None = None,
        http_host: str = "0.0.0.0",
        broker_watch_interval: float = 5.0,
    ) -> None:
        self._settings = settings
        self._bootstrap = bootstrap_servers
        # raises ConfigurationError naming the setting when a certificate cannot be used
        self.kafka_security = KafkaSecurity.from_settings(settings)
        self._http_host = http_host
        self._watch_interval = broker_watch_interval
        self._model_path = model_path
        self.image: ImageService | None = None
        self._worker: GpuWorker | None = None
        self.training: TrainingService | None = None
        self.metrics = EngineMetrics(registry or CollectorRegistry())
        self._registry_http = registry_client(settings)  # Avro in Confluent's wire format
        self.registry: RegistryFraming | None = None
        if self._registry_http is not None:
            self.registry = registry_framing(settings, self._registry_http,
                                             on_reachable=self._registry_seen)
        self.codec = EventCodec(framing=self.registry)
        self.objects = build_object_store(settings)  # None: the local folders alone
        try:
            self.store = OutputStore(
                settings.output_dir,
                public_base_url=settings.public_base_url,
                cleanup_delay=settings.cleanup_delay if settings.auto_cleanup else None,
                shared=SharedOutputs(self.objects, presign_ttl=settings.output_url_ttl_seconds
                                     if settings.output_urls == "presigned" else None)
                if self.objects is not None else None,
            )
        except OSError as exc:  # cannot create the folder: a file in the way, no permission
            raise ConfigurationError(f"OUTPUT_DIR={settings.output_dir}: {_reason(exc)}") \
                from exc
        self.http = _observed_client(settings, self.metrics)  # follows HTTP(S)_PROXY
        self.fetch_http = _observed_client(settings, self.metrics, direct=True)
        retries = self.metrics.retries.labels  # the HTTP requests' own budgets count there
        self.voice = build_voice_service(
            settings, self.store, self.http, objects=self.objects,
            on_retry=lambda error: retries("voice", error.code).inc())
        self.scheduling = build_scheduling(settings, self.metrics)
        self.health = EngineHealth(voice_backend=self.voice.backend.name,
                                   queues=self.scheduling.pending.depths,
                                   gpu_stuck_seconds=settings.liveness_gpu_stuck_seconds)
        self.health.kafka_security = self.kafka_security.describe(user=False)
        self.health.schema_registry_url = settings.schema_registry_url
        self._event_loop: asyncio.AbstractEventLoop | None = None  # the one start runs on
        if self.objects is not None:
            self.health.store_where = self.objects.where
            self.objects.on_reachable = self._store_seen
        self.spans = build_spans(settings.otel_exporter_otlp_endpoint, settings.service_name)
        self.metrics.set_build(version=engine_version(), model="none", development_model=False,
                               device="none")
        self.metrics.watch_gpu(lambda: cuda_memory(self._device()))
        self.metrics.watch_voice_quota(self._quota_figures)
        self._stop_requested = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._loop: ConsumeLoop | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._control_consumer: AIOKafkaConsumer | None = None
        self._control_lookups: AIOKafkaConsumer | None = None
        self.addresses: EngineAddresses | None = None
        self.crashed: BaseException | None = None
        self._stop_deadline: float | None = None  # event loop time; stop_now brings it in

    async def start(self) -> EngineAddresses:
        """Checks the shared store (raises :class:`~core.storage.StorageError`), starts
        HTTP (so ``/health`` answers "starting"), then Kafka."""
        settings = self._settings
        self._event_loop = asyncio.get_running_loop()
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        if self.objects is not None:  # unusable store: a clear error now, not per request
            await asyncio.to_thread(self.objects.probe)
        self.health.gpu = probe_gpu()
        services = AppServices(
            health=self.health, metrics=self.metrics, store=self.store,
            codec=self.codec, voice=self.voice, scheduling=self.scheduling,
        )
        access = access_policy(settings)
        app = create_app(services, upload_limits(settings), access)
        # a client that goes away cancels its own queued request; one that sends no whole
        # request header within IDLE_TIMEOUT s is closed (http_files/serving.py)
        self._runner = app_runner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._http_host, settings.service_port)
        try:
            await site.start()
        except OSError as exc:  # in use, not allowed (< 1024), no such address
            raise ConfigurationError(
                f"SERVICE_PORT={settings.service_port}: {_reason(exc)} "
                f"(on {self._http_host})") from exc
        port = self._runner.addresses[0][1]
        warn_if_open(self._http_host, port, access)
        host = "127.0.0.1" if self._http_host in ("0.0.0.0", "") else self._http_host
        http_url = f"http://{host}:{port}"

        if self._model_path is not None:
            self.health.image_model = ImageModelInfo(name=str(self._model_path), loaded=False)
            self.image, self._worker = await build_image_service(
                settings, self._model_path, self.store, self.http, self.metrics,
                objects=self.objects, health=self.health, fetch_http=self.fetch_http)
            services.image = self.image
            self.health.gpu_worker = self._worker.pulse  # for /health/live
            self.training = build_training_service(settings, self._worker, self.image,
                                                   self.fetch_http, self.objects)
            services.training = self.training
            self.health.image_model = ImageModelInfo(
                name=self.image.model.name, loaded=True,
                development_model=self.image.model.development_model,
                dtype=self._worker.model.dtype_name,
                acceleration={**self._worker.model.acceleration.describe(),
                              "compiled": self._worker.model.compiled,
                              "fused_qkv": self._worker.model.fused_qkv,
                              "attention_backend": self._worker.model.attention_backend})
            self.metrics.set_build(version=engine_version(), model=self.image.model.name,
                                   development_model=self.image.model.development_model,
                                   device=self._device())

        if self.registry is not None:  # raises SchemaRegistryError: serve.py says it in a line
            await register_writer_schemas(self.registry, self._published_schemas(), RetryPolicy(
                max_attempts=settings.retry_max_attempts, base_delay=settings.retry_base_delay,
                max_delay=settings.retry_max_delay))

        security = self.kafka_security
        install_login_backoff()  # a refused login is retried slowly (consumers/login_backoff.py)
        idempotent = await resolve_idempotence(settings, self._bootstrap, security=security)
        producer = self._producer = build_producer(settings, self._bootstrap,
                                                   idempotent=idempotent, security=security)
        consumer = self._consumer = build_consumer(settings, self._bootstrap, security=security)
        control = self._control_consumer = build_control_consumer(
            settings, self._bootstrap, security=security)
        lookups = self._control_lookups = build_control_consumer(
            settings, self._bootstrap, security=security, purpose="control-offsets")
        await producer.start()
        await consumer.start()
        await control.start()
        await lookups.start()
        codec = self.codec
        publisher = EventPublisher(producer, codec, settings.event_encoding)
        control_topic = settings.topic("generation.control")

        async def broadcast_cancel(conversation_id: str, request_id: str | None) -> None:
            await publisher.publish(control_topic, GenerationControl(
                action="cancel", request_id=request_id, conversation_id=conversation_id,
                created_at=utc_now_iso()), conversation_id.encode(), request_id)

        services.broadcast_cancel = broadcast_cancel
        reader = ControlReader(control, control_topic, codec, self.scheduling.pending,
                               lookback=settings.cancel_memory_seconds,
                               barrier_timeout=settings.cancel_barrier_seconds,
                               lookups=lookups)
        services.read_barrier = reader.mark
        voice = VoiceHandler(self.voice)
        routes: list[Route] = [] if settings.lora_training_only else [
            Route(settings.topic("generation.requested.voice"), "voice", VoiceRequested,
                  voice, voice.remembered),
        ]
        if self.image is not None and not settings.lora_training_only:
            image = ImageHandler(self.image)
            routes.append(Route(settings.topic("generation.requested.image"), "image",
                                ImageRequested, image, image.remembered))
        if self.training is not None and self.image is not None:
            routes.append(Route(
                settings.topic("generation.requested.lora"), "lora", LoraTrainingRequested,
                LoraHandler(self.training, model=self.image.model.name,
                            development_model=self.image.model.development_model)))
        self.metrics.serve(route.kind for route in routes)
        self._loop = ConsumeLoop(
            consumer, publisher, codec, routes,
            ResultTopics(
                completed=settings.topic("generation.completed"),
                failed=settings.topic("generation.failed"),
                progress=settings.topic("generation.progress"),
            ),
            config=DeliveryConfig(
                flow=FlowLimits(settings.max_buffered_records, settings.max_buffered_bytes),
                shutdown_grace=settings.shutdown_grace_seconds,
                rebalance_grace=settings.rebalance_grace_seconds,
            ),
            retry=RetryPolicy(
                max_attempts=settings.retry_max_attempts,
                base_delay=settings.retry_base_delay,
                max_delay=settings.retry_max_delay,
            ),
            metrics=self.metrics,
            health=self.health,
            scheduling=self.scheduling,
            spans=self.spans,
            read_barrier=reader.mark,
        )
        reading = asyncio.create_task(reader.run(), name="control-reader")
        try:  # recent cancels first, so that a redelivered request they name is not redone
            await asyncio.wait_for(reader.ready.wait(), timeout=_CONTROL_CATCH_UP)
        except TimeoutError:
            logger.warning("recent cancels not read within %.0fs; taking requests in anyway",
                           _CONTROL_CATCH_UP)
        self._tasks.append(asyncio.create_task(self._loop.run(), name="consume-loop"))
        self._tasks.append(reading)
        self._tasks.append(asyncio.create_task(self._watch_broker(), name="broker-watch"))
        if self.voice.quota is not None:
            self._tasks.append(asyncio.create_task(
                self.voice.quota.run(self.health, self._stop_requested), name="voice-quota"))
        if settings.auto_cleanup:
            self._tasks.append(asyncio.create_task(
                self.store.run_cleanup(min(60.0, settings.cleanup_delay / 4),
                                       self._stop_requested),
                name="cleanup"))
        for task in self._tasks[1:]:
            task.add_done_callback(self._background_ended)
        if self.training is not None:
            await self.training.resume_pending()
        self.health.started = True
        self.addresses = EngineAddresses(self._bootstrap, http_url)
        return self.addresses

    def request_stop(self) -> None:
        """Begins a graceful stop (safe to call from a signal handler): readiness turns
        false at once, before the drain."""
        self.health.draining = True
        self._stop_requested.set()
        if self._loop is not None:
            self._loop.request_stop()
        if self.training is not None:
            self.training.request_stop()  # trainings checkpoint at their next step

    def stop_now(self) -> None:
        """Ends the grace of a stop at once (safe to call from a signal handler, before or
        during :meth:`stop`): in-flight work is cancelled and left uncommitted, so it is
        redelivered, as after a grace that runs out; what the stop still waits for
        (commits, leaving the group, trainings' checkpoints, the GPU worker) gets a few
        seconds in all."""
        self.request_stop()
        clock = asyncio.get_running_loop().time
        self._stop_deadline = min(self._stop_deadline or float("inf"), clock() + _HURRY)
        if self._loop is not None and self._consumer is not None:
            self._loop.drop(self._consumer.assignment())

    async def wait_stopped(self) -> None:
        """Returns when a stop was requested or the consume loop ended on its own."""
        loop_task = self._tasks[0] if self._tasks else None
        waiter = asyncio.create_task(self._stop_requested.wait())
        waits: set[asyncio.Future[object]] = {waiter}  # type: ignore[arg-type]
        if loop_task is not None:
            waits.add(loop_task)  # type: ignore[arg-type]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    async def stop(self) -> None:
        """Drains in-flight work, commits, leaves the group (a static member,
        KAFKA_GROUP_INSTANCE_ID, does not: its partitions wait KAFKA_SESSION_TIMEOUT_MS for
        its return), closes HTTP; all of it within
        SHUTDOWN_GRACE_SECONDS plus a few seconds, even with the broker gone (what is not
        published then stays uncommitted, and is redelivered)."""
        self.request_stop()
        clock = asyncio.get_running_loop().time
        self._stop_deadline = min(self._stop_deadline or float("inf"),
                                  clock() + self._settings.shutdown_grace_seconds + _STOP_MARGIN)

        def left(cap: float) -> float:
            assert self._stop_deadline is not None
            return max(0.1, min(cap, self._stop_deadline - clock()))

        if self._tasks:
            loop_task, *others = self._tasks
            try:
                await loop_task
            except Exception as exc:
                logger.exception("consume loop ended with an error")
                self.crashed = exc
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        # bounded: with the broker gone, leaving the group or flushing would wait forever
        for client, what in ((self._consumer, "leave the group"),
                             (self._control_consumer, "stop reading cancels"),
                             (self._control_lookups, "stop looking up cancels"),
                             (self._producer, "flush")):
            if client is None:
                continue
            why = await stop_within(client, left(3.0))
            if why is not None:
                logger.warning("could not %s %s; stopping anyway", what, why)
        if self.training is not None:
            try:  # trainings checkpoint at their next step
                await asyncio.wait_for(self.training.close(), timeout=left(30.0))
            except TimeoutError:
                logger.warning("trainings did not checkpoint in time; they resume from "
                               "their last checkpoint")
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop, left(30.0) / 2)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.http.aclose()
        await self.fetch_http.aclose()
        if self._registry_http is not None:
            await self._registry_http.aclose()
        try:  # what spans are pending go to the collector, bounded (it may be gone)
            await asyncio.wait_for(asyncio.to_thread(self.spans.shutdown), timeout=left(5.0))
        except TimeoutError:
            logger.warning("spans not exported in time; dropping them")

    def _published_schemas(self) -> list[tuple[str, str, str]]:
        """``(topic, schema name, writer schema)`` of every event this engine publishes."""
        topic = self._settings.topic
        published: list[tuple[str, type[Event]]] = [
            ("generation.completed", GenerationCompleted),
            ("generation.failed", GenerationFailed),
            ("generation.progress", GenerationProgress),
            ("generation.control", GenerationControl)]
        return [(topic(name), event.avro_name, self.codec.current_schema(event.avro_name))
                for name, event in published]

    def _store_seen(self, reachable: bool) -> None:
        """Told by the store after each call, from the event loop or a worker thread:
        ``/health`` turns degraded while it fails, ok again at its next answer."""
        if reachable is self.health.store_reachable:
            return
        if self._event_loop is None:  # before start: no waiters to wake
            self._set_store_reachable(reachable)
        else:  # EngineHealth wakes asyncio waiters: change it on its loop
            self._event_loop.call_soon_threadsafe(self._set_store_reachable, reachable)

    def _set_store_reachable(self, reachable: bool) -> None:
        if reachable is self.health.store_reachable:
            return
        self.health.store_reachable = reachable
        if reachable:
            logger.info("the object store at %s answers again", self.health.store_where)
        else:
            logger.warning("the object store at %s is failing; outputs, LoRAs and trainings "
                           "that need it fail (retryable) meanwhile", self.health.store_where)

    def _registry_seen(self, reachable: bool) -> None:
        self.health.schema_registry_reachable = reachable
        if not reachable:
            logger.warning("the Schema Registry at %s is unreachable; records in its wire "
                           "format wait for it", self._settings.schema_registry_url)

    def _device(self) -> str:
        """Where the image model computes (``cuda:0``, ``cpu``), or ``none``."""
        return self._worker.model.device if self._worker is not None else "none"

    def _quota_figures(self) -> VoiceQuotaFigures | None:
        quota = self.health.voice_quota
        if quota is None or quota.used is None or quota.limit is None:
            return None
        return VoiceQuotaFigures(used=quota.used, limit=quota.limit)

    def _background_ended(self, task: asyncio.Task[None]) -> None:
        """A background task that ends before the stop is a fault to see, not to lose."""
        if task.cancelled() or self._stop_requested.is_set():
            return
        error = task.exception()
        if error is not None:
            logger.error("background task %s failed: %r", task.get_name(), error,
                         exc_info=error)

    async def _watch_broker(self) -> None:
        """Keeps ``/health`` honest about the broker: a metadata request every interval,
        and while it fails, why (refused credentials, TLS, unreachable): looked up at the
        outage's start and again every ``_DIAGNOSE_EVERY`` seconds, one login each."""
        assert self._consumer is not None
        interval = self._watch_interval
        diagnosed_at: float | None = None
        while not self._stop_requested.is_set():
            try:
                await asyncio.wait_for(self._consumer.topics(), timeout=interval)
                self.health.kafka_connected = True
                self.health.kafka_problem = None
                diagnosed_at = None
            except Exception as exc:  # noqa: BLE001 - any failure means "unreachable" for /health
                self.health.kafka_connected = False
                now = asyncio.get_running_loop().time()
                if diagnosed_at is None or now - diagnosed_at >= _DIAGNOSE_EVERY:
                    first, diagnosed_at = diagnosed_at is None, now
                    problem = await self._diagnose(interval)
                    if first or problem != self.health.kafka_problem:
                        logger.warning("broker %s unreachable: %s", self._bootstrap,
                                       problem or exc)
                    self.health.kafka_problem = problem
            try:
                await asyncio.wait_for(self._stop_requested.wait(), timeout=interval)
            except TimeoutError:
                pass

    async def _diagnose(self, timeout: float) -> str | None:
        try:
            return await diagnose(self._bootstrap, self.kafka_security, timeout=timeout)
        except Exception:  # a failed lookup of the reason must not end the watch
            logger.exception("could not find out why the broker is unreachable")
            return None


def _reason(error: OSError) -> str:
    """``address already in use`` for errno 98, whatever text the raiser wrapped it in."""
    text = os.strerror(error.errno) if error.errno else str(error)
    return text[:1].lower() + text[1:]


def _observed_client(settings: Settings, metrics: EngineMetrics, *, direct: bool = False
                     ) -> httpx.AsyncClient:
    """A client timed per upstream, carrying the trace to ours. The shared one (ElevenLabs,
    the Persona Engine) follows HTTP_PROXY/HTTPS_PROXY/NO_PROXY; ``direct``, the one that
    fetches requests' URLs (:class:`~core.net.SafeFetcher`), never does: a proxy would
    resolve the name again, past the fetcher's address check (and the fetcher sends to
    the checked IP, which breaks TLS through a tunnel and NO_PROXY by name). With a
    transport of its own a client takes no proxy from the environment; that transport
    still takes a CA bundle from SSL_CERT_FILE/SSL_CERT_DIR."""
    bases = [(settings.elevenlabs_api_url, "elevenlabs")]
    if settings.persona_engine_url:
        bases.append((settings.persona_engine_url, "persona_llm"))

    def observe(upstream: str, outcome: str, seconds: float) -> None:
        metrics.upstream_seconds.labels(upstream, outcome).observe(seconds)

    upstreams = UpstreamNames(bases, default="image_fetch")
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    if direct:
        return ObservedClient(upstreams=upstreams, observe=observe, trust_env=False,
                              transport=httpx.AsyncHTTPTransport(limits=limits))
    return ObservedClient(upstreams=upstreams, observe=observe, limits=limits)
