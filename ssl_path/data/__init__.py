"""Data for ssl-path: shard streams for pretraining and extraction, readers, augmentation."""

from ssl_path.data.loader import (
    StreamPosition,
    shard_dataset,
    shard_loader,
    shard_total,
    shard_urls,
)

__all__ = ["StreamPosition", "shard_dataset", "shard_loader", "shard_total", "shard_urls"]
