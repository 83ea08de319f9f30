"""Per-model queues, dynamic batching and replica choice."""
