"""How a message becomes exactly one outcome: parse, check, apply (alone or in a batch), retry,
dead-letter; the consumer, the RabbitMQ ingress, the poison count and the payment-retry scan.

May import `storage`, `messages`, `models`, `brokers`, `operations`, `config` and `endpoints`;
never `tasks`, `cli`, `local` or `celery_app` (the tasks import this package, not the reverse).
"""
