"""What the worker keeps in PostgreSQL: the engine, the unit of work (one transaction with its
inbox claim, outbox events and history), invoice numbering, bulk import's COPY, pruning, and the
schema's migrations.

May import `models`, `messages` (bulk import reads its entries), `config` and `endpoints`;
nothing that delivers, publishes or prints.
"""
