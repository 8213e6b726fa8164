FROM python:3.11-slim
WORKDIR /app
# REMAP_SIGTERM: SIGTERM (docker stop) as Celery's cold shutdown, bounded by WORKER_SOFT_SHUTDOWN_SECONDS.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 REMAP_SIGTERM=SIGQUIT
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY tasks ./tasks
COPY models ./models
RUN pip install .
COPY examples ./examples
# Run as an unprivileged user.
RUN useradd --create-home invoice && chown -R invoice /app
USER invoice
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO", "-Q", "invoices.orders,invoices.payments,invoices.commands,invoices.imports,invoices.maintenance"]
