FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# /metrics, /healthz and /readyz reachable from outside the container (the default is loopback only).
ENV METRICS_ADDRESS=0.0.0.0
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
COPY messages ./messages
# The ops extra brings Flower (the flower service of docker-compose.yml).
RUN pip install ".[ops]"
COPY examples ./examples
# Run as an unprivileged user.
RUN useradd --create-home invoice && chown -R invoice /app
USER invoice
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO", "-Q", "invoices.orders,invoices.payments,invoices.commands,invoices.imports,invoices.maintenance"]
