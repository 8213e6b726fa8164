"""Talking to brokers: the contract's queues and routes on each broker (`topology`), our Redis
transport, and the relay that publishes the outbox's events.

May import `operations`, `config` and `endpoints`; never `tasks`, `delivery`, `storage` or `cli`
(the relay reads the outbox with plain SQL).
"""
