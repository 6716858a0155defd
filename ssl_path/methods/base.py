"""What a pretraining method adds to the loop's task contract: data hooks and card facts."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

from ssl_path.training.task import TrainingTask


class PretrainingMethod(TrainingTask):
    """A self-supervised method on shard streams (see :class:`~ssl_path.training.task.TrainingTask`).

    Card facts, stated once here and read by :mod:`ssl_path.publish.card`:
    ``title`` (the method in a few words), ``citation`` (BibTeX), ``published`` (which of its
    networks the exported encoder is).
    """

    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    published: ClassVar[str] = "the encoder"

    def data_transform(self) -> Callable[[dict[str, Any]], Any]:
        """Runs in the data workers on each decoded sample ``{"image", "key", "index", ...}``."""
        raise NotImplementedError(f"{type(self).__name__} must define data_transform()")  # pragma: no cover

    def collate_fn(self) -> Callable[[Sequence[Any]], Any]:
        """Runs in the data workers on each batch of transformed samples."""
        raise NotImplementedError(f"{type(self).__name__} must define collate_fn()")  # pragma: no cover
