"""`multimodal-engine replay` on the real broker: a time window of a request topic is
published again (same partition, key, value and headers, the original timestamp, plus
``replayed-from``), filtered by conversation, counted by ``--dry-run``, bounded by the
end offsets of its start, and answered again by a running engine."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from consumers.cli import main
from consumers.kafka import build_control_consumer, build_producer
from consumers.replay import REPLAYED_AT, REPLAYED_FROM, Replayer, ReplayWindow
from consumers.security import KafkaSecurity
from core.settings import Settings
from tests.support.dev_engine import dev_engine
from tests.support.kafka_client import Answer, PersonaPeer
from tests.support.kafka_security import client_options, security_env

pytestmark = pytest.mark.kafka

_create_time = pytest.mark.skipif(
    not os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    and os.environ.get("EMBEDDED_BROKER", "tansu") == "rdkafka-mock",
    reason="librdkafka's mock stamps every record with LogAppendTime 1234: there is no "
    "time window to replay")

REPO = Path(__file__).resolve().parents[2]
HOUR = 3_600_000  # ms
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass(frozen=True)
class Original:
    partition: int
    key: bytes
    value: bytes | None
    timestamp: int
    headers: tuple[tuple[str, bytes], ...] = ()
    offset: int = -1

    @property
    def origin(self) -> str:
        return f"{self.partition}/{self.offset}"


def instant(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


@pytest.fixture
def since() -> int:
    """The window's start: ten hours ago, so that the whole history lies in the past."""
    return (int(datetime.now(UTC).timestamp()) // 60 * 60 - 10 * 3600) * 1000


@asynccontextmanager
async def producer_for(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    assert settings.kafka_bootstrap_servers is not None
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                acks="all", **client_options(settings.kafka_bootstrap_servers))
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def publish(settings: Settings, records: Sequence[Original]) -> list[Original]:
    """Publishes ``records`` in order at their timestamps; returns them with their offsets."""
    topic = settings.topic("generation.requested.image")
    sent = []
    async with producer_for(settings) as producer:
        for r in records:
            meta = await producer.send_and_wait(
                topic, value=r.value, key=r.key, partition=r.partition,
                timestamp_ms=r.timestamp, headers=list(r.headers))
            assert meta.timestamp == r.timestamp  # CreateTime: the broker keeps it
            sent.append(Original(r.partition, r.key, r.value, r.timestamp, r.headers,
                                 meta.offset))
    return sent


async def read_topic(settings: Settings) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the image request topic, up to its end offsets now."""
    assert settings.kafka_bootstrap_servers is not None
    topic = settings.topic("generation.requested.image")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                group_id=None, enable_auto_commit=False, fetch_max_wait_ms=10,
                                **client_options(settings.kafka_bootstrap_servers))
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p)
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(30):
            while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


def replays(records: list[ConsumerRecord[bytes, bytes]], sent: list[Original]
            ) -> dict[str, ConsumerRecord[bytes, bytes]]:
    """The records after those ``sent`` (all replays), by ``partition/offset`` of their
    original, each once."""
    found: dict[str, ConsumerRecord[bytes, bytes]] = {}
    for record in records:
        if record.offset < sum(1 for s in sent if s.partition == record.partition):
            continue
        topic, _, where = dict(record.headers)[REPLAYED_FROM].decode().partition("/")
        assert topic == record.topic
        assert where not in found, f"{where} replayed twice"
        found[where] = record
    return found


def history(since: int) -> list[Original]:
    """Three partitions, three conversations; before, inside and after ``[since, since +
    1h)``, the edges exactly, a tombstone and an earlier replay inside."""
    image = b'{"request_id": "r-%d", "conversation_id": "conv", "prompt": "x"}'
    records = []
    for p in range(3):
        records += [
            Original(p, b"conv-a", image % (10 * p), since - 1),  # just before the window
            Original(p, b"conv-a", image % (10 * p + 1), since,  # the first instant in it
                     (("content-type", b"application/json"), ("request_id", b"r"))),
            Original(p, b"conv-b", image % (10 * p + 2), since + 60_000,
                     (("traceparent", TRACEPARENT),)),
            Original(p, b"conv-c", image % (10 * p + 3), since + HOUR - 1),  # the last
            Original(p, b"conv-a", image % (10 * p + 4), since + HOUR),  # until: left out
            Original(p, b"conv-b", image % (10 * p + 5), since + 2 * HOUR),
        ]
    records += [Original(0, b"conv-a", None, since + 5),  # a tombstone
                Original(1, b"conv-b", image % 99, since + 6,
                         ((REPLAYED_FROM, b"elsewhere/1/1"),))]  # an earlier replay
    return records


def in_window(sent: list[Original], since: int, keys: tuple[bytes, ...] = ()) -> list[Original]:
    return [r for r in sent if since <= r.timestamp < since + HOUR and r.value is not None
            and not any(name == REPLAYED_FROM for name, _ in r.headers)
            and (not keys or r.key in keys)]


async def run_replay(settings: Settings, *args: str,
                     bootstrap: str | None = None) -> tuple[int, str, str]:
    """``multimodal-engine replay ARGS`` as a process, configured by its environment."""
    bootstrap = bootstrap or settings.kafka_bootstrap_servers
    assert bootstrap is not None
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("KAFKA_", "SERVICE_", "API_KEYS"))}
    env.update(security_env(bootstrap), KAFKA_BOOTSTRAP_SERVERS=bootstrap,
               KAFKA_TOPIC_PREFIX=settings.kafka_topic_prefix, PYTHONPATH=str(REPO))
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("multimodal-engine")), "replay", *args,
        cwd=Path.cwd(), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@_create_time
async def test_the_window_is_published_again_as_it_was_with_replayed_from(
    settings: Settings, since: int
) -> None:
    sent = await publish(settings, history(since))
    topic = settings.topic("generation.requested.image")

    started_ms = int(time.time() * 1000)
    code, out, err = await run_replay(settings, "image", "--since", instant(since),
                                      "--until", instant(since + HOUR))

    assert code == 0, err
    wanted = in_window(sent, since)
    assert len(wanted) == 9
    lines = out.strip().splitlines()
    assert lines[-1] == f"replayed 9 records (2 skipped) from topic {topic}"
    assert [line.split(":")[0].split(" offsets")[0] for line in lines[:-1]] == [
        f"{topic} partition {p}" for p in range(3)]
    assert lines[0].endswith("replayed 3 (1 skipped)") and lines[1].endswith(
        "replayed 3 (1 skipped)") and lines[2].endswith("replayed 3 (0 skipped)")
    records = await read_topic(settings)
    copies = replays(records, sent)
    assert set(copies) == {r.origin for r in wanted}
    for original in wanted:
        copy = copies[original.origin]
        assert copy.partition == original.partition
        assert (copy.key, copy.value, copy.timestamp) == (
            original.key, original.value, original.timestamp)
        assert copy.timestamp_type == 0  # CreateTime: the engine sees how old it is
        *kept, (at_name, at_value) = tuple(copy.headers)
        assert tuple(kept) == (
            *original.headers, (REPLAYED_FROM, f"{topic}/{original.origin}".encode()))
        assert at_name == REPLAYED_AT  # its own publish time, for matching cancels
        assert started_ms <= int(at_value) <= time.time() * 1000
    assert len(records) == len(sent) + 9  # nothing else


@_create_time
async def test_conversation_keeps_only_those_keys(settings: Settings, since: int) -> None:
    sent = await publish(settings, history(since))

    code, out, err = await run_replay(
        settings, "image", "--since", instant(since), "--until", instant(since + HOUR),
        "--conversation", "conv-a", "--conversation", "conv-c")

    assert code == 0, err
    wanted = in_window(sent, since, keys=(b"conv-a", b"conv-c"))
    assert {r.key for r in wanted} == {b"conv-a", b"conv-c"} and len(wanted) == 6
    assert out.strip().splitlines()[-1].startswith("replayed 6 records (1 skipped)")
    copies = replays(await read_topic(settings), sent)
    assert set(copies) == {r.origin for r in wanted}


@_create_time
async def test_dry_run_counts_and_publishes_nothing(settings: Settings, since: int) -> None:
    sent = await publish(settings, history(since))

    code, out, err = await run_replay(settings, "image", "--since", instant(since),
                                      "--until", instant(since + HOUR), "--dry-run")

    assert code == 0, err
    topic = settings.topic("generation.requested.image")
    assert out.strip().splitlines()[-1] == (
        f"would replay 9 records (2 skipped) from topic {topic} (dry run: nothing published)")
    assert len(await read_topic(settings)) == len(sent)


@_create_time
async def test_records_published_after_it_started_are_not_replayed(
    settings: Settings, since: int
) -> None:
    """No --until: its own records (their timestamps in the window) and anything published
    while it runs lie beyond the end offsets pinned at its start."""
    bootstrap = settings.kafka_bootstrap_servers
    assert bootstrap is not None
    topic = settings.topic("generation.requested.image")
    sent = await publish(settings, [Original(p, b"conv-a", b"old %d" % p, since + p)
                                    for p in range(3)])
    window = ReplayWindow(datetime.fromtimestamp(since / 1000, UTC))
    security = KafkaSecurity.from_settings(settings)
    replayer = Replayer(
        build_control_consumer(settings, bootstrap, security=security, purpose="replay"),
        build_producer(settings, bootstrap, idempotent=False, security=security),
        batch_records=1)
    async with replayer:
        ranges = await replayer.bounds(topic, window)
        now = int(datetime.now(UTC).timestamp() * 1000)
        late = await publish(settings, [Original(p, b"conv-a", b"late %d" % p, now)
                                        for p in range(3)])
        summary = await replayer.replay(topic, ranges, window)

    assert (summary.replayed, summary.skipped) == (3, 0)
    records = await read_topic(settings)
    origins = [dict(r.headers)[REPLAYED_FROM] for r in records
               if REPLAYED_FROM in dict(r.headers)]
    assert sorted(origins) == sorted(f"{topic}/{r.origin}".encode() for r in sent)
    assert len(records) == len(sent) + len(late) + 3


@_create_time
async def test_a_replayed_image_request_is_answered_again(
    settings: Settings, peer: PersonaPeer, dev_model_dir: Path, tmp_path: Path
) -> None:
    request = {"request_id": str(uuid.uuid4()), "conversation_id": "conv-replayed",
               "prompt": "a portrait of a woman in a cafe", "width": 64, "height": 64,
               "num_inference_steps": 2, "optimize_prompt": False, "seed": 3}

    def answered(a: Answer) -> bool:
        return a.kind in ("completed", "failed") and a.event.get("request_id") == \
            request["request_id"]

    async with dev_engine(settings, dev_model_dir, tmp_path):
        started = datetime.now(UTC) - timedelta(minutes=1)
        await peer.publish("image", request)
        (first,) = await peer.wait_for(answered, timeout=60)
        assert first.kind == "completed", first.event

        code, out, err = await run_replay(settings, "image", "--since", started.isoformat(),
                                          "--conversation", "conv-replayed")

        assert code == 0, err
        assert out.strip().splitlines()[-1].startswith("replayed 1 records (0 skipped)")
        again = (await peer.wait_for(answered, count=2, timeout=60))[-1]
    assert again.kind == "completed", again.event
    assert again.event["url"] == first.event["url"]  # same model and LoRA: the same file


@pytest.mark.parametrize(("args", "says"), [
    (["image", "--since", "2026-03-02T00:00:00Z", "--until", "2026-03-01T00:00:00Z"],
     "must be after since"),
    (["image", "--since", "2026-03-02T00:00:00Z", "--until", "2026-03-02T00:00:00Z"],
     "must be after since"),
    (["image", "--since", "yesterday"], "'yesterday' is not an ISO-8601 date-time"),
    (["video", "--since", "2026-03-01T00:00:00Z"], "invalid choice: 'video'"),
])
def test_bad_arguments_exit_2_with_one_line_that_says_why(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["replay", *args])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("multimodal-engine replay: error: ") and says in last, last


async def test_an_unreachable_broker_exits_1_saying_so(settings: Settings) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"

    code, out, err = await run_replay(settings, "voice", "--since", "2026-03-01T00:00:00Z",
                                      bootstrap=closed)

    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1].startswith(
        f"multimodal-engine: cannot reach Kafka at {closed}: ")


async def test_a_topic_that_does_not_exist_exits_2_naming_it(settings: Settings) -> None:
    absent = f"absent{uuid.uuid4().hex[:6]}."
    elsewhere = settings.model_copy(update={"kafka_topic_prefix": absent})

    code, out, err = await run_replay(elsewhere, "lora", "--since", "2026-03-01T00:00:00Z")

    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"multimodal-engine: no topic {absent}generation.requested.lora "
                           "on the broker"), last
    assert "KAFKA_TOPIC_PREFIX" in last


def test_help_says_it_regenerates_as_background_work(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Regenerate after a model or LoRA change" in text
    assert "background work" in text and "consumer group" in text
