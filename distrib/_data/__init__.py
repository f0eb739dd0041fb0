"""Dataloader sharding: per-rank batch samplers, iterable-dataset shards, dispatch from rank 0."""
