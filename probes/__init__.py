"""Frozen-encoder evaluation: feature cache, kNN, linear and few-label probes, embeddings."""
