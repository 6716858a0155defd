"""A labelled set as tensors, for probes and heads: the records a reader returned, through a transform.

Every item is ``{"image": float [3, S, S], "target": class id (-1 unlabelled), "path": str, "error": "",
"set": the set's name}``. ``dataset[i]`` is the image through ``transform(path)``; ``dataset[(i, epoch)]``
(a training stream's draw) is ``augment(path, i, epoch)``, a random view drawn from its index and epoch.
An image that cannot be read comes back as a blank placeholder with its one-line reason in
``"error"``, so that the reason stays one line from a DataLoader worker process (which would wrap a
raised exception in a traceback) and the caller skips and counts it, or stops.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ssl_path.core.errors import UserError
from ssl_path.data.readers import LabelledSet


class LabelledImages(Dataset):
    """``data``'s records through ``transform`` (a path -> [3, size, size] tensor, e.g. ``eval_transform``)."""

    def __init__(
        self,
        data: LabelledSet,
        transform: Callable[[str], Tensor],
        size: int,
        augment: Callable[[str, int, int], Tensor] | None = None,
    ) -> None:
        self.paths = [r.path for r in data.records]
        self.targets = data.targets()
        self.transform, self.size, self.augment, self.name = transform, size, augment, data.name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = item if isinstance(item, tuple) else (item, None)
        path = self.paths[index]
        try:
            if epoch is None or self.augment is None:
                image = self.transform(path)
            else:
                image = self.augment(path, index, epoch)
            error = ""
        except UserError as err:
            image, error = torch.zeros(3, self.size, self.size), str(err)
        return {"image": image, "target": self.targets[index], "path": path, "error": error, "set": self.name}
