# syntax=docker/dockerfile:1
# The storage node: contiguouskv without torch. Build from the repository root:
#   docker build -f deploy/docker/cache.Dockerfile -t contiguouskv-cache:0.1.0 .
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 ckv \
    && useradd --system --uid 10001 --gid ckv --home-dir /home/ckv --create-home \
       --shell /usr/sbin/nologin ckv \
    && mkdir -p /var/lib/contiguouskv \
    && chown ckv:ckv /var/lib/contiguouskv \
    && python -m venv /opt/venv

# The source is bind-mounted, not copied: the image keeps only the installed package.
# rw: setuptools writes build/ and *.egg-info next to the source; those writes are discarded.
RUN --mount=type=bind,source=.,target=/src,rw pip install "/src[otel]"

# Defaults only; flags and the Kubernetes manifests override them (flags > CKV_* env > --config).
ENV CKV_HOST=0.0.0.0 \
    CKV_PORT=50051 \
    CKV_METRICS_PORT=9090 \
    CKV_ROOT=/var/lib/contiguouskv/store

USER 10001:10001
WORKDIR /home/ckv
EXPOSE 50051 9090

# Docker only (Kubernetes uses the grpc probes in deploy/k8s): ask the gRPC health service (on the plaintext
# health-only port when CKV_HEALTH_PORT is set, as for a server that serves TLS).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + (os.environ.get('CKV_HEALTH_PORT') or os.environ.get('CKV_PORT', '50051')))).Check(h.HealthCheckRequest(service='contiguouskv.v1.CacheService'), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]

# `python -m contiguouskv.cache_server` takes the same flags as `contiguouskv serve cache`; the
# `contiguouskv` command itself imports the compute server's parser, which needs torch.
ENTRYPOINT ["python", "-m", "contiguouskv.cache_server"]
