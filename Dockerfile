# Images for docker-compose.yml. Two targets:
#   cpu (the last stage, so `docker build .` gives it): migrate, web, worker and beat. torch and torchvision come from PyTorch's
#       CPU-only wheel index, so the image carries no CUDA libraries (the ONNX Runtime path
#       screens without torch at all; torch stays for training and export).
#   gpu: the `worker-gpu` service of the `gpu` profile. CUDA 12 torch wheels from PyPI and
#       FAISS GPU (the `gpu` extra) on NVIDIA's CUDA runtime image; needs the NVIDIA
#       container toolkit on the host.
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# The project's files, copied once and shared by both images.
FROM scratch AS source
WORKDIR /app
COPY pyproject.toml README.md ./
COPY moderation ./moderation
COPY workers ./workers
COPY admin ./admin
COPY policies ./policies

FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY --from=source /app /app
RUN pip install --no-cache-dir ".[gpu]" \
    && useradd --system --home /var/lib/moderation moderation \
    && mkdir -p /var/lib/moderation && chown moderation /var/lib/moderation
USER moderation
CMD ["moderation", "worker", "--concurrency", "1"]

FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY --from=source /app /app
# torch first from the CPU-only index; `pip install .` then finds the pinned versions installed.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir . \
    && useradd --system --home /var/lib/moderation moderation \
    && mkdir -p /var/lib/moderation && chown moderation /var/lib/moderation
USER moderation
EXPOSE 8000
CMD ["moderation", "serve", "--host", "0.0.0.0", "--port", "8000"]
