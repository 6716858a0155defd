"""Data for ssl-path: shard streams for pretraining and extraction, readers, augmentation."""
from ssl_path.data.loader import shard_dataset, shard_loader, shard_total, shard_urls

__all__ = ["shard_dataset", "shard_loader", "shard_total", "shard_urls"]
