# reprmerge serving image: CPU by default, CUDA with `--build-arg TORCH_VARIANT=cu126`.
#   docker build -t reprmerge .                                   # CPU, default bundle built in the image
#   docker build -t reprmerge:cuda --build-arg TORCH_VARIANT=cu126 .
#   docker build --build-arg BUILD_BUNDLE=0 -t reprmerge:slim .    # bundle built at first start instead
# Offline or behind a TLS-inspecting proxy (deploy/docker/smoke.sh does this): a local base image with
# python3 (PYTHON_IMAGE), torch from a local wheel folder (TORCH_PIP_ARGS="--find-links URL")
# and the proxy's CA bundle as a build secret (`--secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt`).
# No `# syntax=` line: BuildKit would pull a frontend image; the built-in frontend is enough (RUN --mount).
# The CUDA wheels carry their own CUDA libraries, so both variants share one slim runtime base; the
# GPU driver comes from the host (NVIDIA container toolkit / device plugin).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/${TORCH_VARIANT}"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
# torch first, from the PyTorch index of the variant, at the project's pin (a plain `pip install`
# would pull the multi-GB CUDA build onto CPU images). The optional secret `pip_cert` is a CA bundle.
# torch is pinned; hadolint reads the unexpanded ${TORCH_PIP_ARGS} as an unpinned package:
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-cache-dir ${TORCH_PIP_ARGS} torch==2.13.0
COPY pyproject.toml README.md requirements-nodeps.txt ./
COPY reprmerge_core ./reprmerge_core
COPY reprmerge_cli ./reprmerge_cli
COPY service ./service
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

FROM builder AS bundle
# 1: build the embedded default bundle (the `starter` suite, TIES merge, as `make serve`) now; 0: at first start.
ARG BUILD_BUNDLE=1
# TOKENIZERS_PARALLELISM is a tokenizer switch, not a secret:
# hadolint ignore=DL3064
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false REPRMERGE_CACHE=/tmp/reprmerge-cache
RUN mkdir -p /opt/reprmerge \
    && if [ "$BUILD_BUNDLE" = 1 ]; then \
        reprmerge build --suite starter --merge ties --device cpu --out /opt/reprmerge/bundle \
        && rm -rf /tmp/reprmerge-cache; \
    fi

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="reprmerge" \
      org.opencontainers.image.description="Per-request Pareto trade-offs between the tasks of one merged backbone"
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid app --create-home --shell /usr/sbin/nologin app
COPY --from=builder /opt/venv /opt/venv
COPY --from=bundle --chown=app:app /opt/reprmerge /opt/reprmerge
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/reprmerge-entrypoint
# MALLOC_*_THRESHOLD_ fix glibc's thresholds as `reprmerge serve` does itself (service/server.py,
# tune_malloc), from the first allocation on: a fixed mmap threshold keeps RSS flat under many new
# preferences, and 32 MiB keeps each batch's activations in the arenas instead of page-faulting them in.
# REPRMERGE_BUNDLE is left unset: the entrypoint then serves the embedded bundle. Mount your own
# and set REPRMERGE_BUNDLE to its path to serve it instead.
# TOKENIZERS_PARALLELISM is a tokenizer switch, not a secret:
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/tmp/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    REPRMERGE_CACHE=/home/app/.cache/reprmerge \
    REPRMERGE_HOST=0.0.0.0 \
    REPRMERGE_PORT=8000 \
    PYTHONUNBUFFERED=1 \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=67108864
USER 10001:10001
WORKDIR /home/app
EXPOSE 8000
# /livez never touches the model; the start period covers warm-up (and a first-start bundle build).
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('REPRMERGE_PORT', '8000')}/livez\", timeout=2)"]
# SIGTERM starts the service's drain (readiness 503, queue answered, then exit).
STOPSIGNAL SIGTERM
ENTRYPOINT ["reprmerge-entrypoint"]
