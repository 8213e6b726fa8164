"""`invoice-worker run` on one machine: the embedded PostgreSQL and Valkey, the supervised worker,
beat and relay processes, and a throwaway RabbitMQ node for tests and benchmarks.

May import `storage`, `brokers`, `operations`, `config` and `endpoints`;
never `cli` (which imports it), `tasks` or `delivery`.
"""
