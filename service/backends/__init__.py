"""What the dispatcher sends batches to: local worker processes (and, later, Triton servers)."""
