# The gateway image: the public gRPC API (no onnxruntime: the gateway runs no model).
#   docker build -f deploy/docker/gateway.Dockerfile -t ghcr.io/superwav2lip/gateway:0.1.0 .
# Pinned by exact version; pin by digest as well in your registry mirror.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service_runtime ./service_runtime
COPY services ./services
COPY gateway ./gateway
COPY client ./client
COPY deploy ./deploy
COPY webui ./webui
RUN /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin superwav2lip
COPY --from=build /opt/venv /opt/venv
# Read-only root file system: every write goes to /tmp or /data (volumes). OPENBLAS_NUM_THREADS: numpy's BLAS in one
# thread from the first import, lazily loaded copies included (run_service also limits it at start).
ENV PATH=/opt/venv/bin:$PATH \
    OPENBLAS_NUM_THREADS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    HOME=/tmp \
    MALLOC_ARENA_MAX=2 \
    SWL_GATEWAY_DATA_DIR=/data
WORKDIR /app
USER 10001:10001
EXPOSE 50051 9101
ENTRYPOINT ["python", "-m", "gateway"]
