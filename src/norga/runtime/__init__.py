"""What methods use while they run: the run context, seeding, frozen-feature caches, optimisers and schedules,
the divergence guard, data parallelism, precision and the phase-training mixin. Below the methods; imports nothing
above them."""
