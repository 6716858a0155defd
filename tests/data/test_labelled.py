"""Records to tensors for probes and heads: real patches through the eval transform, in worker processes."""

from __future__ import annotations

import shutil

from torch.utils.data import DataLoader

from ssl_path.data.labelled import LabelledImages
from ssl_path.data.readers import read_spec
from ssl_path.data.transforms import eval_transform


def test_images_and_targets_come_back_and_an_unreadable_image_is_one_line_from_a_worker(sample_data, tmp_path):
    for label in ("atypical", "normal"):
        (tmp_path / label).mkdir()
        for path in sorted((sample_data / "amibr" / "patches" / label).glob("*.png"))[:2]:
            shutil.copy(path, tmp_path / label / path.name)
    (tmp_path / "normal" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    data = read_spec(f"folder:{tmp_path}")
    items = LabelledImages(data, eval_transform(32), 32)
    batches = list(DataLoader(items, batch_size=5, num_workers=1))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["image"].shape == (5, 3, 32, 32)
    assert batch["target"].tolist() == data.targets() == [0, 0, 1, 1, 1]
    assert batch["path"] == [r.path for r in data.records] and batch["path"][4].endswith("zz_broken.png")
    assert batch["error"][:4] == [""] * 4
    reason = batch["error"][4]
    assert reason.startswith("cannot decode image") and "\n" not in reason
    assert batch["image"][4].abs().sum() == 0  # the placeholder of the unreadable one
