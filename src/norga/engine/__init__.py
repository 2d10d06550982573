"""The engine: task loop, training phases, checkpoints, seeding and the run directory."""
