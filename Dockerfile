FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# /metrics, /healthz and /readyz reachable from outside the container (the default is loopback only).
ENV METRICS_ADDRESS=0.0.0.0
COPY pyproject.toml uv.lock README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
COPY messages ./messages
# Exactly what uv.lock holds, every file checked against its hash (uv exports it; pip installs it with
# --require-hashes), then the project itself without resolving again. The ops extra brings Flower (the
# flower service of docker-compose.yml). uv leaves the image once the export is written.
RUN pip install uv==0.13.9 \
    && uv export --quiet --frozen --no-dev --no-emit-project --extra ops --output-file /tmp/requirements.txt \
    && pip uninstall --yes uv \
    && pip install --require-hashes --no-deps -r /tmp/requirements.txt \
    && pip install --no-deps . \
    && rm /tmp/requirements.txt
COPY examples ./examples
# Run as an unprivileged user.
RUN useradd --create-home invoice && chown -R invoice /app
USER invoice
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO", "-Q", "invoices.orders,invoices.payments,invoices.commands,invoices.imports,invoices.maintenance"]
