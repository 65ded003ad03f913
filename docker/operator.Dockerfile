# syntax=docker/dockerfile:1
# The operator image: kopf, the Kubernetes client and the Redis protocol. No torch (the `operator` extra).
#   docker build -f docker/operator.Dockerfile -t alchemist/operator:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY worker/ worker/
COPY operator/ operator/
# The package holds all three parts (pure Python); only the operator's dependencies are installed. The build fails
# if anything pulled torch in.
RUN pip install ".[operator]" \
    && python -c "import importlib.util, sys; sys.exit('torch must not be installed' if importlib.util.find_spec('torch') else 0)" \
    && python -c "import alchemist_operator.cli" \
    && rm -rf /src

WORKDIR /
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["alchemist-operator"]
