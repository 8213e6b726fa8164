# The README's commands. Each one creates .venv when missing and installs the project.
# (The install prints setuptools' "BuildBackendWarning: Editable installation": information that an
# editable install finds the packages in this directory, which is what it is for; harmless.)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-rabbitmq test-rabbitmq-quorum test-cluster bench bench-brokers migrate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/invoice-worker run

test: $(STAMP)
	$(BIN)/python -m pytest

# The end-to-end and fault suites on a throwaway RabbitMQ node (installed with apt-get when missing).
test-rabbitmq: $(STAMP)
	$(BIN)/python -m worker.local.rabbitmq_node test tests/end_to_end tests/faults tests/hostile $(PYTEST_ARGS)

# Quorum queues (RABBITMQ_QUEUE_TYPE=quorum, a cluster's): the queues' type, retries with back-off,
# the invoice wait and the payment-retry schedule, on a throwaway node of their own.
test-rabbitmq-quorum: $(STAMP)
	RABBITMQ_QUEUE_TYPE=quorum $(BIN)/python -m worker.local.rabbitmq_node test tests/end_to_end/test_queue_type.py \
		tests/end_to_end/test_payments.py tests/end_to_end/test_payment_retries.py tests/faults/test_out_of_order.py $(PYTEST_ARGS)

# Several hosts on this machine (network namespaces; root needed): a three-node RabbitMQ cluster with
# quorum queues, PostgreSQL, workers and relays on two hosts; the cluster scenarios (tests/cluster/)
# through the fault ledger, rows in RELIABILITY.md section "Cluster". Everything started and stopped
# by the run; rabbitmq-server installed with apt-get when missing. At most 15 minutes.
test-cluster: $(STAMP)
	INVOICE_CLUSTER_TESTS=1 RABBITMQ_QUEUE_TYPE=quorum timeout --signal=INT 900 \
		$(BIN)/python -m pytest tests/cluster -v $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

# End to end and latency on the embedded Valkey and on a throwaway RabbitMQ node, side by side.
bench-brokers: $(STAMP)
	$(BIN)/python -m bench.brokers

migrate: $(STAMP)
	$(BIN)/invoice-worker migrate

clean:
	rm -rf $(VENV) .data .pytest_cache
