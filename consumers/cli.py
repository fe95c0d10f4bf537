"""The ``multimodal-engine`` command: serve | dev | send voice … | send image … | replay … |
docs"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from consumers.replay import ReplayWindow
    from consumers.security import KafkaSecurity
    from core.settings import Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal-engine",
        description="Event-driven image and voice generation for AI companions.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "serve", help="consumers + HTTP (production; needs KAFKA_BOOTSTRAP_SERVERS)",
        description="Run the Kafka consumers and the HTTP app, configured by the environment "
                    "and .env. Needs KAFKA_BOOTSTRAP_SERVERS; never falls back to a toy.",
    )
    commands.add_parser(
        "dev", help="everything on one machine (embedded broker, local voice)",
        description="Start an embedded Kafka-protocol broker unless KAFKA_BOOTSTRAP_SERVERS "
                    "is set, use the local voice unless an ElevenLabs key is set, and serve.",
    )
    dev_model = commands.add_parser(
        "dev-model", help="write the tiny development FLUX model to a folder",
        description="Build the real FLUX architecture with random weights and local "
                    "tokenizers (deterministic, well under a second) into PATH, so that "
                    "FLUX_MODEL_PATH=PATH works with `serve`. It is marked as the "
                    "development model in /health and in every event.",
    )
    dev_model.add_argument("path", type=Path)
    dev_model.add_argument("--seed", type=int, default=0)
    docs = commands.add_parser(
        "docs", help="write docs/asyncapi.yaml and docs/openapi.json from the code",
        description="Generate the AsyncAPI document of the topics and the OpenAPI document "
                    "of the HTTP API from the code and write them into FOLDER (default "
                    "docs). The tests fail while the checked-in files differ from these.",
    )
    docs.add_argument("folder", type=Path, nargs="?", default=Path("docs"), metavar="FOLDER")
    send = commands.add_parser(
        "send", help="publish one request and wait for its answer",
        description="Publish one request, wait for its generation.completed or "
                    "generation.failed event, print it; exit 0 (completed) or 1 (failed, "
                    "no answer in time, no broker); 2 for invalid arguments or settings.",
    )
    kinds = send.add_subparsers(dest="kind", required=True, metavar="KIND")
    voice = kinds.add_parser("voice", help="a voice request", description="Send a voice request.")
    voice.add_argument("text")
    voice.add_argument("--voice-id")
    voice.add_argument("--model-id")
    voice.add_argument("--stability", type=float)
    voice.add_argument("--similarity-boost", type=float)
    voice.add_argument("--style", type=float)
    voice.add_argument("--no-emotion", action="store_true", help="inject_emotion: false")
    image = kinds.add_parser("image", help="an image request", description="Send an image request.")
    image.add_argument("prompt")
    image.add_argument("--negative-prompt")
    image.add_argument("--lora", dest="character_lora_id")
    image.add_argument("--width", type=int)
    image.add_argument("--height", type=int)
    image.add_argument("--steps", dest="num_inference_steps", type=int)
    image.add_argument("--guidance", dest="guidance_scale", type=float)
    image.add_argument("--seed", type=int)
    image.add_argument("--no-optimize", action="store_true", help="optimize_prompt: false")
    for sub in (voice, image):
        sub.add_argument("--conversation-id", default="cli")
        sub.add_argument("--character-id")
        sub.add_argument("--request-id", help="default: a new UUID")
        sub.add_argument("--encoding", choices=["json", "avro"], default="avro")
        sub.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
        sub.add_argument("--priority", choices=["interactive", "background"])
        sub.add_argument("--deadline-in", type=float, metavar="SECONDS",
                         help="deadline this many seconds from now (EXPIRED if not started)")
    replay = commands.add_parser(
        "replay", help="publish a time window of a request topic again (regenerate)",
        description="Regenerate after a model or LoRA change: publish the records of "
                    "generation.requested.KIND (with KAFKA_TOPIC_PREFIX) whose Kafka "
                    "timestamp is in [--since, --until) again, to the same topic and "
                    "partition with the same key, value and headers, their original "
                    "timestamp, and replayed-from and replayed-at headers. The engine sees "
                    "them as old: "
                    "records older than REPLAY_AGE_SECONDS run as background work (unless "
                    "they say priority), so live conversations go first. Results whose "
                    "request, model and LoRA are unchanged are answered from the "
                    "remembered files. Reads up to the end of the topic as it is when the "
                    "command starts, in no consumer group: the "
                    "engine's group and its offsets are untouched, the engine keeps "
                    "running. Records without a value and earlier replays are skipped.",
    )
    replay.add_argument("kind", choices=["image", "voice", "lora"], metavar="KIND",
                        help="image, voice or lora")
    replay.add_argument("--since", required=True, type=_instant, metavar="ISO8601",
                        help="first timestamp replayed, e.g. 2026-03-01T12:00:00Z "
                             "(no offset means UTC)")
    replay.add_argument("--until", type=_instant, metavar="ISO8601",
                        help="replay records before this time (default: up to now)")
    replay.add_argument("--conversation", action="append", default=[], metavar="ID",
                        help="only records with this key (conversation id); repeatable")
    replay.add_argument("--dry-run", action="store_true",
                        help="count what would be replayed, publish nothing")
    return parser


def _instant(text: str) -> datetime:
    from schemas.events import parse_instant

    try:
        return parse_instant(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 date-time (e.g. 2026-03-01T12:00:00Z)") from None


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "docs":  # from the code alone: no settings, no .env
        from consumers.apidocs import write_documents

        for path in write_documents(args.folder):
            print(path)
        return
    if args.command == "replay":  # a bad window is refused before settings or a broker
        from consumers.replay import ReplayWindow

        try:
            window = ReplayWindow(args.since, args.until,
                                  frozenset(c.encode() for c in args.conversation))
        except ValueError as exc:
            print(f"multimodal-engine replay: error: {exc}", file=sys.stderr)
            sys.exit(2)
    from core.settings import ConfigurationError, load_settings

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        _say(str(exc))
        sys.exit(2)
    from core.telemetry import configure_logging

    keys = settings.api_keys.get_secret_value().split(",") if settings.api_keys else []
    configure_logging(settings.log_level, settings.log_format, secrets=[
        *(key.get_secret_value() for key in (settings.elevenlabs_api_key,
                                             settings.kafka_sasl_password,
                                             settings.schema_registry_user_info)
           if key is not None),
        *(key.strip() for key in keys)])
    _quiet_model_libraries()
    if args.command == "dev-model":
        from core.image.devmodel import build_dev_model

        print(build_dev_model(args.path, seed=args.seed))
        return
    if args.command in ("send", "replay"):
        # keep the reply readable: the command says in one line what went wrong, where
        # aiokafka logs an ERROR line for every retry while a broker is away
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            sys.exit(asyncio.run(_send(args, settings) if args.command == "send"
                                 else _replay(args.kind, window, args.dry_run, settings)))
        except ConfigurationError as exc:
            _say(str(exc))
            sys.exit(2)
    try:  # a Ctrl-C while the libraries load: nothing runs yet, one line says so
        from diffusers.utils import logging as diffusers_logging

        from consumers.serve import StartupError, StartupInterrupted, run_dev, run_serve
    except KeyboardInterrupt:
        _say("interrupted during start-up")
        sys.exit(130)
    # "Loading pipeline components" bars: no env variable turns them off, and a JSON log
    # pipeline reads every line of the output
    diffusers_logging.disable_progress_bar()
    try:
        asyncio.run(run_serve(settings) if args.command == "serve" else run_dev(settings))
    except StartupInterrupted as exc:  # SIGINT, SIGTERM or SIGHUP: 128 + the signal
        _say(str(exc))
        sys.exit(exc.exit_code)
    except (StartupError, ConfigurationError) as exc:
        _say(str(exc))
        sys.exit(2)


def _say(message: str) -> None:
    """``message`` on stderr as the command's one line, naming the variables in it whose
    value came from ``.env``: a ``.env`` copied for docker compose (``kafka:9092``,
    ``/app/models/…``) would otherwise mislead ``dev`` without a word about it."""
    import re

    from core.settings import env_file_values

    cited = [name for name, value in env_file_values().items()
             if re.search(rf"(?<![A-Z0-9_]){name}(?![A-Z0-9_])", message)
             or (len(value) >= 6 and any(c in value for c in "/:") and value in message)]
    where = f" ({', '.join(cited)} from {Path('.env').resolve()})" if cited else ""
    print(f"multimodal-engine: {message}{where}", file=sys.stderr)


def _quiet_model_libraries() -> None:
    """No network at run time, no progress bars or advice in the service's output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


async def _send(args: argparse.Namespace, settings: object) -> int:
    from datetime import UTC, datetime, timedelta

    from aiokafka.errors import KafkaConnectionError, KafkaError

    from consumers.schema_registry import registry_client, registry_framing
    from consumers.security import diagnose
    from consumers.send import send_and_wait
    from core.settings import Settings
    from schemas.codec import EventCodec
    from schemas.errors import InvalidRequestError
    from schemas.events import ImageRequested, VoiceRequested
    from schemas.registry import SchemaRegistryUnavailable

    assert isinstance(settings, Settings)
    broker = _broker(settings)
    if broker is None:
        return 1
    bootstrap, prefix, security = broker.bootstrap, broker.prefix, broker.security
    fields = {k: v for k, v in vars(args).items() if v is not None}
    body: dict[str, object] = {
        "request_id": args.request_id or str(uuid.uuid4()),
        "conversation_id": args.conversation_id,
    }
    if args.character_id:
        body["character_id"] = args.character_id
    if args.priority:
        body["priority"] = args.priority
    if args.deadline_in is not None:
        body["deadline"] = (datetime.now(UTC) + timedelta(seconds=args.deadline_in)).isoformat()
    if args.kind == "voice":
        body.update({k: fields[k] for k in ("text", "voice_id", "model_id", "stability",
                                            "similarity_boost", "style") if k in fields})
        body["inject_emotion"] = not args.no_emotion
        model: type[ImageRequested | VoiceRequested] = VoiceRequested
    else:
        body.update({k: fields[k] for k in ("prompt", "negative_prompt", "character_lora_id",
                                            "width", "height", "num_inference_steps",
                                            "guidance_scale", "seed") if k in fields})
        body["optimize_prompt"] = not args.no_optimize
        model = ImageRequested
    event: ImageRequested | VoiceRequested
    try:
        event = EventCodec().validate(model, body)
    except InvalidRequestError as exc:
        print(f"multimodal-engine: invalid request: {exc}", file=sys.stderr)
        return 2
    # with a registry the engine answers in its wire format: the answer is read with it too
    http = registry_client(settings)
    try:
        codec = EventCodec(framing=None if http is None else registry_framing(settings, http))
        reply = await send_and_wait(
            bootstrap, f"{prefix}generation.requested.{args.kind}", event,
            args.conversation_id, completed_topic=f"{prefix}generation.completed",
            failed_topic=f"{prefix}generation.failed",
            encoding=args.encoding, timeout=args.timeout, codec=codec, security=security,
        )
    except KafkaConnectionError as exc:
        await _say_unreachable(bootstrap, security, exc)
        return 1
    except KafkaError as exc:
        _say(f"request {body['request_id']} not sent to Kafka at {bootstrap}: {exc}")
        return 1
    except SchemaRegistryUnavailable as exc:
        print(f"multimodal-engine: cannot read the answer to request {body['request_id']}: "
              f"{exc}", file=sys.stderr)
        return 1
    finally:
        if http is not None:
            await http.aclose()
    if reply is None:
        why = await diagnose(bootstrap, security, timeout=3.0)  # a broker gone meanwhile
        _say(f"no answer to request {body['request_id']} within {args.timeout:.0f}s"
             + (f": cannot reach Kafka at {bootstrap}: {why}" if why else ""))
        return 1
    print(json.dumps(reply.event, indent=2, default=str))
    url = reply.event.get("url")
    if broker.dev_http_url is not None and isinstance(url, str) and url.startswith("/"):
        print(f"file: {broker.dev_http_url}{url}")
    return 0 if reply.completed else 1


async def _replay(kind: str, window: ReplayWindow, dry_run: bool, settings: Settings) -> int:
    from aiokafka.errors import KafkaConnectionError

    from consumers.kafka import build_control_consumer, build_producer, resolve_idempotence
    from consumers.replay import Replayer, ReplayError, TopicNotFoundError

    broker = _broker(settings)
    if broker is None:
        return 1
    bootstrap, security = broker.bootstrap, broker.security
    topic = f"{broker.prefix}generation.requested.{kind}"
    try:
        producer = None if dry_run else build_producer(
            settings, bootstrap, security=security,
            idempotent=await resolve_idempotence(settings, bootstrap, security=security))
        consumer = build_control_consumer(settings, bootstrap, security=security,
                                          purpose="replay")
        async with Replayer(consumer, producer) as replayer:
            summary = await replayer.replay(topic, await replayer.bounds(topic, window),
                                            window)
    except KafkaConnectionError as exc:
        await _say_unreachable(bootstrap, security, exc)
        return 1
    except TopicNotFoundError as exc:
        print(f"multimodal-engine: {exc} at {bootstrap}", file=sys.stderr)
        return 2
    except ReplayError as exc:
        print(f"multimodal-engine: replay of {topic} stopped: {exc}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    return 0


async def _say_unreachable(bootstrap: str, security: KafkaSecurity, error: Exception) -> None:
    """The one line ``send`` and ``replay`` print when the broker cannot be reached."""
    from consumers.security import diagnose

    why = await diagnose(bootstrap, security)
    _say(f"cannot reach Kafka at {bootstrap}: {why or error}")


class _Broker(NamedTuple):
    bootstrap: str
    prefix: str
    security: KafkaSecurity
    dev_http_url: str | None  # a running ``dev``'s HTTP app, when it is that one


def _broker(settings: Settings) -> _Broker | None:
    """The broker ``send`` and ``replay`` talk to: the configured one, else the one of a
    running ``dev`` (plaintext, under its topic prefix); None, having said so, when there
    is neither."""
    from consumers.devstate import read_state
    from consumers.security import PLAINTEXT, KafkaSecurity

    if settings.kafka_bootstrap_servers is not None:
        return _Broker(settings.kafka_bootstrap_servers, settings.kafka_topic_prefix,
                       KafkaSecurity.from_settings(settings), None)
    state = read_state()
    if state is None:
        print("multimodal-engine: no broker: start `multimodal-engine dev` (make run) in "
              "another shell, or set KAFKA_BOOTSTRAP_SERVERS", file=sys.stderr)
        return None
    return _Broker(state.bootstrap_servers, state.topic_prefix, PLAINTEXT, state.http_url)
