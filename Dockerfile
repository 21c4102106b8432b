# syntax=docker/dockerfile:1
# The serving image: FastAPI + ONNX Runtime + FAISS, no PyTorch. The model bundle is mounted at
# /bundle (read-only), never baked in, so one image serves every retrained bundle.
#
#   docker build -t sidrec .                                    # CPU (default)
#   docker build --build-arg VARIANT=gpu -t sidrec:gpu .        # CUDA 12: the `gpu` extra
#   docker run -p 8000:8000 -v "$PWD/runs/ml-100k/bundle:/bundle:ro" sidrec
#   docker run --gpus all -p 8000:8000 -v "$PWD/runs/ml-100k/bundle:/bundle:ro" sidrec:gpu
#
# Settings are SIDREC_* variables (service/settings.py); docker-compose.yml and deploy/k8s set
# the Redis URL and the worker count.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
# cpu | gpu
ARG VARIANT=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
# Every folder pyproject's package-dir names; offline/ and model/ are installed but only
# imported by the training commands, which this image never runs.
COPY pyproject.toml README.md ./
# The locked versions CI tested (requirements/, `make lock`): base for CPU, gpu for the extra.
COPY requirements/base.txt requirements/gpu.txt ./requirements/
COPY sidrec ./sidrec
COPY model ./model
COPY offline ./offline
COPY service ./service
# The gpu extra adds onnxruntime-gpu and faiss-gpu-cu12 next to the CPU builds the base
# dependencies pull in. Each pair installs the same Python package (onnxruntime, faiss), so the
# CPU builds are removed and the GPU builds reinstalled over the files they shared.
RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install --no-cache-dir -c requirements/gpu.txt "/src[gpu]" \
        && pip freeze | grep -E '^(onnxruntime-gpu|faiss-gpu-cu12)==' > /tmp/gpu-builds.txt \
        && pip uninstall -y onnxruntime faiss-cpu \
        && pip install --no-cache-dir --force-reinstall --no-deps -r /tmp/gpu-builds.txt; \
    elif [ "$VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir -c requirements/base.txt /src; \
    else \
        echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1; \
    fi \
    && python -c "import onnxruntime, faiss, sidrec.service.app; print('providers:', onnxruntime.get_available_providers())"

FROM python:${PYTHON_VERSION}-slim AS runtime
ARG VARIANT=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="sidrec" \
      org.opencontainers.image.description="HSTU + Semantic ID recommendation service" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can check it without /etc/passwd.
# The GPU build's CUDA libraries come as pip wheels (nvidia-*); the loader is told where.
RUN groupadd --system --gid 10001 sidrec \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidrec \
    && mkdir /bundle \
    && if [ "$VARIANT" = "gpu" ]; then \
        find /opt/venv -type d -path '*/site-packages/nvidia/*/lib' > /etc/ld.so.conf.d/sidrec-nvidia.conf \
        && ldconfig; \
    fi
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDREC_BUNDLE=/bundle \
    SIDREC_HOST=0.0.0.0 \
    SIDREC_PORT=8000 \
    SIDREC_DEVICE=auto
USER 10001:10001
WORKDIR /tmp
VOLUME ["/bundle"]
EXPOSE 8000
# /healthz only says the process answers; readiness (/readyz: model, index, Redis) is the
# orchestrator's business. The model loads before the port opens, hence the start period.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = f\"http://127.0.0.1:{os.environ.get('SIDREC_PORT', '8000')}/healthz\"; sys.exit(urllib.request.urlopen(url, timeout=2).status != 200)"]
ENTRYPOINT ["python", "-m", "sidrec.service"]
