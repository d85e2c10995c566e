# Deploy Reactor worker image.
#
#   docker build -t deploy-reactor .
#   docker run --rm -e REACTOR_MODE=distributed -e REACTOR_KAFKA_BOOTSTRAP=... deploy-reactor worker --role executor
#
# Stage 1 builds the project's wheel and installs it with its dependencies into a virtualenv;
# stage 2 copies only that virtualenv onto a clean base and runs it as an unprivileged user.

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY reactor/ ./reactor/

RUN python -m venv /opt/reactor \
 && /opt/reactor/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && /opt/reactor/bin/pip install --no-cache-dir /dist/*.whl


FROM python:3.11-slim

LABEL org.opencontainers.image.title="deploy-reactor" \
      org.opencontainers.image.description="Event-driven release orchestrator for mixed fleets of hosts and Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/reactor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REACTOR_STATE_DIR=/var/lib/reactor/state

RUN groupadd --system --gid 10001 reactor \
 && useradd --system --uid 10001 --gid reactor --home-dir /var/lib/reactor --create-home \
        --shell /usr/sbin/nologin reactor

COPY --from=build /opt/reactor /opt/reactor

USER 10001:10001
WORKDIR /var/lib/reactor

# GET /healthz (200 only when the bus and the store answer) and GET /metrics, on REACTOR_HTTP_PORT.
EXPOSE 8080

# The slim image has no curl: ask with the standard library. urlopen raises on anything but 2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REACTOR_HTTP_PORT', '8080'), timeout=4)"]

# The worker stops cleanly on SIGINT (asyncio.run cancels the consumers, offsets stay uncommitted for
# unfinished work); as PID 1 without a handler, SIGTERM would be ignored until the SIGKILL.
STOPSIGNAL SIGINT

ENTRYPOINT ["reactor"]
CMD ["worker", "--role", "all"]
