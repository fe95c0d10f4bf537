#!/usr/bin/env bash
# Creates the seven contract topics on the compose Kafka (run by the `create-topics` one-shot
# service, apache/kafka image, after the broker is healthy). Idempotent: --if-not-exists.
#
# Environment (all optional):
#   BOOTSTRAP_SERVER     broker to talk to                        (default kafka:9092)
#   TOPIC_PREFIX         the engine's KAFKA_TOPIC_PREFIX          (default empty)
#   TOPIC_PARTITIONS     partitions of every topic; bounds how many engine instances
#                        (one per GPU) can share the work         (default 6)
#   REPLICATION_FACTOR   1 on the single-node compose broker      (default 1)
#   PROGRESS_RETENTION_MS  generation.progress is transient       (default 86400000, 1 day)
#   LORA_MAX_MESSAGE_BYTES  LoRA requests may carry inline images: records up to 16 MiB,
#                        the engine's own max_request_size     (default 16777216)
#   KAFKA_BIN            where kafka-topics.sh lives              (default /opt/kafka/bin)
#
# The --config of each topic are those the engine itself gives the topics it creates where
# no script runs (Kubernetes): TOPIC_CONFIGS in consumers/topics.py. Keep the two the same
# (tests/deploy/test_deploy_files.py runs this script and compares).
set -euo pipefail

bootstrap="${BOOTSTRAP_SERVER:-kafka:9092}"
prefix="${TOPIC_PREFIX:-}"
partitions="${TOPIC_PARTITIONS:-6}"
replication="${REPLICATION_FACTOR:-1}"
progress_retention="${PROGRESS_RETENTION_MS:-86400000}"
lora_max_bytes="${LORA_MAX_MESSAGE_BYTES:-16777216}"
kafka_topics="${KAFKA_BIN:-/opt/kafka/bin}/kafka-topics.sh"

create() {
    local topic="${prefix}$1"
    shift
    "$kafka_topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
        --topic "$topic" --partitions "$partitions" --replication-factor "$replication" "$@"
    echo "topic ready: $topic"
}

# in: requests (key conversation_id / character_id)
create generation.requested.image
create generation.requested.voice
create generation.requested.lora --config "max.message.bytes=${lora_max_bytes}"
# in: cancels (key conversation_id); read by every instance, kept a day
create generation.control --config "retention.ms=${progress_retention}"
# out: results (same key as the request)
create generation.completed
create generation.failed
create generation.progress --config "retention.ms=${progress_retention}"

echo "all seven contract topics exist (prefix '${prefix}', ${partitions} partitions)"
