# syntax=docker/dockerfile:1
# multimodal-engine: `multimodal-engine serve` on one NVIDIA GPU.
#
#   docker build -t multimodal-engine .          (or: docker compose build)
#
# CUDA: torch 2.13.0 from PyPI is the CUDA 13.0 build and brings its own CUDA runtime, cuBLAS
# and cuDNN as pip packages (nvidia-*/cuda-toolkit wheels), so the base image only needs to
# be a CUDA "base" image of the same major version: it sets NVIDIA_REQUIRE_CUDA and the
# driver capabilities for the NVIDIA Container Toolkit. The host needs an NVIDIA driver
# >= 580 (CUDA 13.0).
# Older driver (e.g. 550/570)? Build a CUDA 12 variant, both arguments together:
#   --build-arg CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04 \
#   --build-arg TORCH_INDEX_URL=<PyTorch's wheel index for CUDA 12.8 (its "cu128" index)>
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04
FROM ${CUDA_BASE_IMAGE}

# The torch that `make install` pins locally (there the CPU build), here the CUDA build.
ARG TORCH_VERSION=2.13.0
# empty: pip's own default index (or what PIP_INDEX_URL / pip.conf name)
ARG TORCH_INDEX_URL=
ARG APP_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 (the project's version) from the deadsnakes PPA; Ubuntu 22.04's own is 3.10.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini \
    && apt-get purge -y --auto-remove software-properties-common gnupg \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip setuptools wheel

# torch first, in its own layer (≈ 3 GB with its CUDA wheels): rebuilt only when the version
# changes, and the project's `torch>=2.4` is then already satisfied.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"

# The project with the `gpu` extra (xformers, whose current release needs torch >= 2.10).
# Naming torch again keeps the resolver from replacing the build installed above.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumers ./consumers
COPY core ./core
COPY http_files ./http_files
COPY schemas ./schemas
RUN pip install ".[gpu]" "torch==${TORCH_VERSION}" \
    && multimodal-engine --help > /dev/null

# Non-root user; the directories the compose volumes mount on belong to it, so that named
# volumes start out writable. Weights are mounted read-only at /app/models.
RUN useradd --create-home --uid "${APP_UID}" --shell /usr/sbin/nologin engine \
    && mkdir -p /app/models /app/lora_models /app/outputs /app/temp /app/.cache \
    && chown -R engine:engine /app
WORKDIR /app
USER engine

# No network at run time: weights come from FLUX_MODEL_PATH, never from the Hub.
ENV HF_HOME=/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    FLUX_MODEL_PATH=/app/models/FLUX.1-dev \
    LORA_OUTPUT_DIR=/app/lora_models \
    OUTPUT_DIR=/app/outputs \
    TEMP_DIR=/app/temp

EXPOSE 8000

# The engine stops gracefully on SIGTERM (stop fetching, finish in-flight work within
# SHUTDOWN_GRACE_SECONDS, publish, commit, leave the group). tini forwards it and reaps.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["multimodal-engine", "serve"]
