# syntax=docker/dockerfile:1.7
# The sdray image: the REST service, the controller, and the Ray head and workers of every RayJob
# (KubeRay starts Ray in it). Not built on the machine this was written on (no container engine there).
#   docker build -t sdray:0.1.0 .                                  CUDA 12.8 runtime, for GPU clusters
#   docker build --build-arg VARIANT=cpu -t sdray:0.1.0-cpu .      CPU only, much smaller
# Base images are pinned by tag; pin them by digest too with --build-arg PYTHON_IMAGE=…@sha256:… (and CUDA_IMAGE).
ARG VARIANT=cuda
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# -- build: the project as a wheel, and its dependency list (installed in a layer of its own) ------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml README.md ./
COPY sdray ./sdray
# (the dependencies and the tracking extra: the image's jobs may turn MLflow or W&B on)
RUN python -m build --wheel --outdir /dist \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['tracking']))" > /dist/requirements.txt

# -- the two runtime bases: each says where its torch build comes from -------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
# Ubuntu 24.04's own Python (3.12); torch's cu128 wheels match the CUDA 12.8 runtime of the base.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# -- runtime ------------------------------------------------------------------------------------------------
FROM base-${VARIANT} AS runtime
ARG TORCH_VERSION=2.13.0
# bash runs KubeRay's `ray start` command, wget its readiness probes, ca-certificates S3 over TLS. Ubuntu 24.04
# images come with a user "ubuntu" holding uid 1000, the uid the manifests run as: it makes room for sdray.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --uid 1000 --user-group --create-home --shell /bin/bash sdray \
 && python3 -m venv /opt/venv \
 && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/sdray.sh
# KubeRay runs `bash -lc`, whose /etc/profile resets PATH: the profile.d line above puts the venv back.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RAY_USAGE_STATS_ENABLED=0
# Largest and most stable first: torch, then the dependencies, then sdray itself (changes most often).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=build /dist/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=build /dist/*.whl /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/sdray-*.whl && rm -rf /tmp/wheels

USER 1000:1000
WORKDIR /home/sdray
EXPOSE 8000
# For `docker run … serve` (Kubernetes uses the chart's probes instead); other commands have no /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('SDRAY_HEALTH_URL', 'http://127.0.0.1:8000/healthz'), timeout=4)"]
ENTRYPOINT ["sdray"]
CMD ["--help"]
