#!/bin/sh
# Prepares the compose MinIO for the engine (run by the `minio-init` one-shot service,
# minio/mc image, after MinIO is healthy). Idempotent: every `docker compose up` runs it
# again and ends in the same state.
#
# - the bucket of STORAGE_URL;
# - its lifecycle (ILM) rules: objects under {prefix}outputs/ expire OUTPUTS_EXPIRE_DAYS
#   after they were written, under {prefix}results/ (the result caches) after
#   RESULTS_EXPIRE_DAYS. Deleting expired outputs is the store's job: no engine instance
#   scans for them (it only refuses to serve a file past the expiry it was written with).
#   The rules are imported whole: they replace any others on the bucket;
# - the engine's own user, whose policy reaches only STORAGE_URL's bucket and prefix (the
#   engine never gets the root credentials).
#
# POSIX sh and mc only: the minio/mc image has no package manager.
#
# Environment:
#   MINIO_ENDPOINT        the S3 API                                  (default http://minio:9000)
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD   MinIO's administrator      (required)
#   STORAGE_URL           the engine's s3://bucket[/prefix]           (default s3://multimodal-engine)
#   ENGINE_ACCESS_KEY, ENGINE_SECRET_KEY   the engine's user: its AWS_ACCESS_KEY_ID and
#                         AWS_SECRET_ACCESS_KEY (MinIO: key >= 3, secret >= 8 characters)
#   ENGINE_POLICY         name of the engine's policy                 (default multimodal-engine)
#   OUTPUTS_EXPIRE_DAYS   days an output is kept; at least CLEANUP_DELAY (default 1)
#   RESULTS_EXPIRE_DAYS   days a result-cache entry is kept           (default 30)
set -eu

endpoint="${MINIO_ENDPOINT:-http://minio:9000}"
storage_url="${STORAGE_URL:-s3://multimodal-engine}"
policy="${ENGINE_POLICY:-multimodal-engine}"
outputs_days="${OUTPUTS_EXPIRE_DAYS:-1}"
results_days="${RESULTS_EXPIRE_DAYS:-30}"
: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is required}"
: "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is required}"
: "${ENGINE_ACCESS_KEY:?ENGINE_ACCESS_KEY is required}"
: "${ENGINE_SECRET_KEY:?ENGINE_SECRET_KEY is required}"

fail() {
    echo "minio-init: $*" >&2
    exit 1
}

case "$storage_url" in
    s3://?*) ;;
    *) fail "STORAGE_URL must be s3://bucket[/prefix], got '$storage_url'" ;;
esac
for days in "$outputs_days" "$results_days"; do
    case "$days" in
        '' | *[!0-9]* | 0) fail "OUTPUTS_EXPIRE_DAYS and RESULTS_EXPIRE_DAYS must be whole days >= 1, got '$days'" ;;
    esac
done

# s3://bucket/some/prefix/ -> bucket "bucket", key prefix "some/prefix/" (empty without one)
location="${storage_url#s3://}"
bucket="${location%%/*}"
prefix="${location#"$bucket"}"
prefix="${prefix#/}"
prefix="${prefix%/}"
if [ -n "$prefix" ]; then
    prefix="$prefix/"
fi

mc alias set store "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "store/$bucket"

mc ilm import "store/$bucket" <<EOF
{
  "Rules": [
    {"ID": "expire-outputs", "Status": "Enabled",
     "Filter": {"Prefix": "${prefix}outputs/"}, "Expiration": {"Days": $outputs_days}},
    {"ID": "expire-results", "Status": "Enabled",
     "Filter": {"Prefix": "${prefix}results/"}, "Expiration": {"Days": $results_days}}
  ]
}
EOF

policy_file="${TMPDIR:-/tmp}/engine-policy.json"
cat >"$policy_file" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$bucket"]},
    {"Effect": "Allow",
     "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
     "Resource": ["arn:aws:s3:::$bucket/${prefix}*"]}
  ]
}
EOF
mc admin user add store "$ENGINE_ACCESS_KEY" "$ENGINE_SECRET_KEY" >/dev/null
mc admin policy create store "$policy" "$policy_file" >/dev/null
# attaching a policy that is already attached is an error to MinIO; only that one is fine
if ! attached=$(mc admin policy attach store "$policy" --user "$ENGINE_ACCESS_KEY" 2>&1); then
    case "$attached" in
        *"already in effect"*) ;;
        *) fail "cannot attach policy $policy to $ENGINE_ACCESS_KEY: $attached" ;;
    esac
fi
rm -f "$policy_file"

echo "store ready: $storage_url (outputs/ expire after $outputs_days day(s), results/ after $results_days; user $ENGINE_ACCESS_KEY)"
