"""The pipeline engine: each worker builds its own stage from the Plan and trains it."""
