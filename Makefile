# The README's commands. Each one creates .venv when missing and installs the project from the lock
# (uv.lock: every package's exact version and hashes; `make lock` refreshes it, `make outdated` shows
# what a refresh would change). uv itself comes from PyPI into the venv, at the version below.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV_VERSION := 0.13.9
UV := $(BIN)/uv

.PHONY: run test test-oldest test-rabbitmq test-rabbitmq-quorum test-cluster bench bench-brokers migrate lock outdated clean

$(UV):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

# --locked: install exactly what uv.lock holds, and fail when pyproject.toml asks for something the
# lock does not hold (after a dependency is added: `.venv/bin/uv lock`, or `make lock`); --inexact:
# keep pip and uv.
$(STAMP): pyproject.toml uv.lock $(UV)
	$(UV) sync --quiet --locked --inexact --extra test --extra bench
	touch $(STAMP)

# Re-resolve every package to the newest version pyproject.toml allows, and write uv.lock (review the
# diff; `.venv/bin/uv lock` alone changes only what pyproject.toml's changes need).
lock: $(UV)
	$(UV) lock --upgrade

# What `make lock` would change (the lock against the newest allowed), then the direct dependencies
# against the newest released (beyond the declared ranges too).
outdated: $(UV)
	$(UV) lock --upgrade --dry-run
	$(UV) tree --frozen --outdated --depth 1

run: $(STAMP)
	$(BIN)/invoice-worker run

# The console's browser tests drive Debian's chromium: installed here when missing (as root with
# apt-get), outside pytest's per-test timeout; tests/console/conftest.py installs it otherwise.
test: $(STAMP)
	test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(BIN)/python -m pytest

# The lowest versions pyproject.toml allows of the libraries the worker leans on (tests/oldest.txt:
# celery, kombu, redis, SQLAlchemy, psycopg, pydantic, OpenTelemetry; the rest resolves to the newest
# allowed), in a venv of their own, on the tests that exercise them: unit, integration, the Redis
# transport's reads, the batching (which uses Celery's consumer internals) and tracing.
OLDEST := .venv-oldest
test-oldest: $(UV)
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(UV) pip install --quiet --python $(OLDEST)/bin/python --constraint tests/oldest.txt -e '.[test]'
	$(OLDEST)/bin/python -m pytest tests/unit tests/integration tests/faults/test_lost_read.py \
		tests/end_to_end/test_batching.py tests/faults/test_batch_commit.py tests/end_to_end/test_tracing.py $(PYTEST_ARGS)

# The end-to-end and fault suites on a throwaway RabbitMQ node (installed with apt-get when missing).
test-rabbitmq: $(STAMP)
	$(BIN)/python -m worker.local.rabbitmq_node test tests/end_to_end tests/faults tests/hostile $(PYTEST_ARGS)

# Quorum queues (RABBITMQ_QUEUE_TYPE=quorum, a cluster's): the queues' type, retries with back-off,
# the invoice wait and the payment-retry schedule, on a throwaway node of their own.
test-rabbitmq-quorum: $(STAMP)
	RABBITMQ_QUEUE_TYPE=quorum $(BIN)/python -m worker.local.rabbitmq_node test tests/end_to_end/test_queue_type.py \
		tests/end_to_end/test_payments.py tests/end_to_end/test_payment_retries.py tests/faults/test_out_of_order.py \
		tests/end_to_end/test_retry_unsent.py $(PYTEST_ARGS)

# Several hosts on this machine (network namespaces; root needed): a three-node RabbitMQ cluster with
# quorum queues, PostgreSQL, workers and relays on two hosts; the cluster scenarios (tests/cluster/)
# through the fault ledger, rows in RELIABILITY.md section "Cluster". Everything started and stopped
# by the run; rabbitmq-server installed with apt-get when missing. At most 15 minutes.
test-cluster: $(STAMP)
	INVOICE_CLUSTER_TESTS=1 RABBITMQ_QUEUE_TYPE=quorum timeout --signal=INT 900 \
		$(BIN)/python -m pytest tests/cluster -v --durations=8 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

# End to end and latency on the embedded Valkey and on a throwaway RabbitMQ node, side by side.
bench-brokers: $(STAMP)
	$(BIN)/python -m bench.brokers

migrate: $(STAMP)
	$(BIN)/invoice-worker migrate

clean:
	rm -rf $(VENV) .venv-oldest .data .pytest_cache
