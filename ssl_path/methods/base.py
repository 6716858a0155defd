"""What a pretraining method adds to the loop's task contract: data hooks and card facts."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

from torch import Tensor

from ssl_path.training.task import TrainingTask


class PretrainingMethod(TrainingTask):
    """A self-supervised method on shard streams (see :class:`~ssl_path.training.task.TrainingTask`).

    Card facts, stated once here and read by :mod:`ssl_path.publish.card`:
    ``title`` (the method in a few words), ``citation`` (BibTeX), ``published`` (which of its
    networks the exported encoder is), ``known`` (what is known of its features that a user should
    weigh, or "").

    ``figure``: the file name of the PNG a run draws of what the method makes of a few of its
    images (``figure_panels``), at the end of the run and by ``python -m ssl_path.run_log``; "" for none.
    """

    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    published: ClassVar[str] = "the encoder"
    known: ClassVar[str] = ""
    figure: ClassVar[str] = ""

    def data_transform(self) -> Callable[[dict[str, Any]], Any]:
        """Runs in the data workers on each decoded sample ``{"image", "key", "index", ...}``."""
        raise NotImplementedError(f"{type(self).__name__} must define data_transform()")  # pragma: no cover

    def collate_fn(self) -> Callable[[Sequence[Any]], Any]:
        """Runs in the data workers on each batch of transformed samples."""
        raise NotImplementedError(f"{type(self).__name__} must define collate_fn()")  # pragma: no cover

    def figure_panels(self, images: Sequence[Tensor]) -> dict[str, Tensor]:
        """Named panels [N, 3, H, W] in [0, 1] for ``figure``, made from N uint8 RGB images [3, h, w]."""
        raise NotImplementedError(f"{type(self).__name__} names a figure but draws no panels")  # pragma: no cover
