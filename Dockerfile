# syntax=docker/dockerfile:1
# The serving image: no PyTorch, bundle mounted at /bundle (not baked in).
#   docker build -t sidrec .
#   docker run -p 8000:8000 -v $PWD/runs/ml-100k/bundle:/bundle:ro sidrec
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY sidrec ./sidrec
COPY model ./model
COPY offline ./offline
COPY service ./service
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 sidrec
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SIDREC_BUNDLE=/bundle \
    SIDREC_HOST=0.0.0.0 \
    SIDREC_PORT=8000
USER sidrec
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["sidrec", "serve"]
