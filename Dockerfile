# syntax=docker/dockerfile:1.7
# lmpipe images. Two targets, both installing from pyproject.toml (no second dependency list):
#   train  CUDA runtime + the CUDA build of torch + onnxruntime-gpu; runs `dvc repro` on the repo
#          mounted at /work, each stage as `python stages/<stage>.py ...`, exactly as on the host.
#   serve  slim: onnxruntime, tokenizers, FastAPI, uvicorn and lmpipe's runtime, no torch; runs
#          `lmpipe serve` on the ONNX bundle mounted (or, target serve-bundled, copied) at /bundle.
# make docker-build / docker-repro / docker-serve wrap the commands (docs/containers.md).

# CUDA 12.8 with cuDNN 9: what the PyTorch cu128 wheels and onnxruntime-gpu's CUDA 12 build use.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG SERVE_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS train
# The torch of the Makefile's TORCH_SPEC, as a CUDA build from PyTorch's index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && git config --system --add safe.directory '*'
# Dependencies only, from pyproject.toml: the project's own code comes from the mounted repo
# (PYTHONPATH below), so an edit on the host is what `dvc repro` runs, as on the host.
COPY pyproject.toml README.md /build/
COPY src /build/src
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install "/build[gpu]" \
    && pip uninstall -y lmpipe onnxruntime \
    && python -c "import tomllib; d = tomllib.load(open('/build/pyproject.toml', 'rb')); print('\n'.join(d['project']['optional-dependencies']['gpu']))" > /tmp/gpu.txt \
    && pip install --force-reinstall --no-deps -r /tmp/gpu.txt \
    && rm -rf /build /tmp/gpu.txt
RUN useradd --create-home --uid 1000 lmpipe \
    && mkdir -p /work && chown lmpipe /work && chmod 1777 /home/lmpipe
ENV PYTHONPATH=/work/src \
    HOME=/home/lmpipe
USER 1000
WORKDIR /work
CMD ["dvc", "repro"]

# ---------------------------------------------------------------------------------------------
FROM ${SERVE_IMAGE} AS serve
# onnxruntime (CPU) by default; --build-arg ORT_GPU=1 swaps in onnxruntime-gpu with CUDA from pip.
ARG ORT_GPU=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
COPY pyproject.toml README.md /build/
COPY src /build/src
# The `serve` extra of pyproject.toml, then lmpipe itself without its training dependencies.
RUN python -c "import tomllib; d = tomllib.load(open('/build/pyproject.toml', 'rb')); extras = d['project']['optional-dependencies']; print('\n'.join(extras['serve'])); open('/tmp/gpu.txt', 'w').write('\n'.join(g + '[cuda,cudnn]' for g in extras['gpu']))" > /tmp/serve.txt \
    && pip install -r /tmp/serve.txt \
    && pip install --no-deps /build \
    && if [ "${ORT_GPU}" = "1" ]; then pip uninstall -y onnxruntime && pip install -r /tmp/gpu.txt; fi \
    && rm -rf /build /tmp/serve.txt /tmp/gpu.txt \
    && useradd --create-home --uid 1000 lmpipe
USER 1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# 0.0.0.0 inside the container so a published port reaches it; where it is published is the
# host's choice: `make docker-serve` publishes on 127.0.0.1 only. -e LMPIPE_API_KEY requires a key
# (`Authorization: Bearer`) on every endpoint but /health, which the HEALTHCHECK reads: it fails
# (503) while the server cannot admit a request.
ENTRYPOINT ["lmpipe", "serve", "/bundle", "--host", "0.0.0.0", "--port", "8000"]

# A self-contained serving image: docker build --target serve-bundled \
#   --build-context bundle=models/onnx/rl -t lmpipe-serve:rl .
FROM serve AS serve-bundled
# `bundle` is a named build context (--build-context), not a stage of this file.
# hadolint ignore=DL3022
COPY --from=bundle --chown=lmpipe . /bundle
