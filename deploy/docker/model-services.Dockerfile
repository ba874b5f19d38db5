# The model-service images: detector, lipsync and enhancer are one package with three entry modules, so one
# file builds all six images, CPU and GPU, by target:
#   docker build -f deploy/docker/model-services.Dockerfile --target lipsync-cpu -t ghcr.io/superwav2lip/lipsync:0.1.0-cpu .
#   docker build -f deploy/docker/model-services.Dockerfile --target lipsync-gpu -t ghcr.io/superwav2lip/lipsync:0.1.0-gpu .
# The GPU stack goes together: by default onnxruntime-gpu 1.31 (PyPI's builds are for CUDA 13 from 1.27 on) with
# CUDA 13.0, cuDNN 9 for CUDA 13 and TensorRT 10.15 (the version onnxruntime's CUDA 13 packages are built with);
# CUDA 13 needs NVIDIA driver 580 or newer. For nodes on older drivers (525 to 575), the same targets build the
# CUDA 12 line with the arguments `make images` passes for the "cuda12-gpu" tags:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#   --build-arg GPU_EXTRA=gpu-cuda12 --build-arg TENSORRT_LIBS=tensorrt-cu12-libs==10.15.*
# (the gpu-cuda12 extra pins onnxruntime-gpu 1.26, the last on PyPI built for CUDA 12). Base images are pinned by exact version; pin by
# digest in your mirror.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG GPU_EXTRA=gpu
ARG TENSORRT_LIBS=tensorrt-cu13-libs==10.15.*

# ---- CPU: onnxruntime on the slim Python image
FROM ${PYTHON_IMAGE} AS cpu-build
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
RUN /opt/venv/bin/pip install ".[cpu]"

FROM ${PYTHON_IMAGE} AS cpu-runtime
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin superwav2lip
COPY --from=cpu-build /opt/venv /opt/venv
# The manifest (names, sizes, sha256) is part of the image; the weights come from the models volume.
COPY models/manifest.json /app/models/manifest.json
# glibc: two arenas, large tensors mapped and unmapped (tools/run_stack.py allocator_env says why).
# OPENBLAS_NUM_THREADS: numpy's BLAS in one thread from the first import (run_service also limits it at start).
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576 OPENBLAS_NUM_THREADS=1
WORKDIR /app
USER 10001:10001

FROM cpu-runtime AS detector-cpu
EXPOSE 50052 9102
ENTRYPOINT ["python", "-m", "services.detector"]

FROM cpu-runtime AS lipsync-cpu
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "services.lipsync"]

FROM cpu-runtime AS enhancer-cpu
EXPOSE 50054 9104
ENTRYPOINT ["python", "-m", "services.enhancer"]

# ---- GPU: onnxruntime-gpu and TensorRT on NVIDIA's CUDA + cuDNN runtime image
FROM ${CUDA_IMAGE} AS gpu-build
ARG GPU_EXTRA
ARG TENSORRT_LIBS
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Package versions follow the pinned base image's Ubuntu release; the Python packages are pinned below.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service_runtime ./service_runtime
COPY services ./services
COPY gateway ./gateway
COPY client ./client
COPY deploy ./deploy
COPY webui ./webui
RUN /opt/venv/bin/pip install ".[${GPU_EXTRA}]" "${TENSORRT_LIBS}"

FROM ${CUDA_IMAGE} AS gpu-runtime
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin superwav2lip
COPY --from=gpu-build /opt/venv /opt/venv
COPY models/manifest.json /app/models/manifest.json
# TensorRT's libraries come from the tensorrt-cu13-libs (or -cu12-libs) wheel inside the virtual environment.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576 OPENBLAS_NUM_THREADS=1 \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/tensorrt_libs
WORKDIR /app
USER 10001:10001

FROM gpu-runtime AS detector-gpu
EXPOSE 50052 9102
ENTRYPOINT ["python", "-m", "services.detector"]

FROM gpu-runtime AS lipsync-gpu
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "services.lipsync"]

FROM gpu-runtime AS enhancer-gpu
EXPOSE 50054 9104
ENTRYPOINT ["python", "-m", "services.enhancer"]
