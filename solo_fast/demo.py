"""The built-in demo (``solo-fast demo``, README command 1): write a synthetic-shapes dataset,
train a small SOLOv2 on it from scratch on the CPU, evaluate it with pycocotools and draw
its predictions on validation images.

Nothing is downloaded: the backbone starts from random weights, so the recipe differs from
the published (ImageNet-pretrained, SGD) schedules in ways chosen for training from scratch:

- no frozen stages and live BatchNorm statistics (``frozen_stages=-1, norm_eval=False``) —
  frozen random layers and BatchNorm pinned to its initial statistics don't learn;
- AdamW, warmed up from 3% of its lr: under SGD's first steps (and Adam's at full lr)
  SOLOv2's dynamic kernels -- the output of a conv over 256 x 3 x 3 inputs -- grow until
  every mask logit saturates and the dice loss has no gradient left;
- 128x128 images with 1-4 shapes of 20-70% of the side each (the dataset writer's default
  spans 6-85%, sized for 448-800 px inputs: at 128 px its smallest shapes are a few
  pixels) and grids of (12, 10, 8, 6, 4) cells, so that an epoch takes under a minute on
  two CPU cores.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class DemoRecipe:
    config: str = "solov2_light_r18_fpn"
    image_size: int = 128
    num_grids: Tuple[int, ...] = (12, 10, 8, 6, 4)
    size_range: Tuple[float, float] = (0.2, 0.7)
    objects: Tuple[int, int] = (1, 4)
    max_occlusion: float = 0.3
    num_train: int = 400
    num_val: int = 50
    epochs: int = 12
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_iters: int = 100
    warmup_ratio: float = 0.03
    milestones: Tuple[int, ...] = (10,)
    seed: int = 0


RECIPE = DemoRecipe()
# A smoke run of the whole pipeline (tests, ``solo-fast demo --quick``); it learns little.
QUICK = replace(RECIPE, image_size=64, num_grids=(6, 5, 4, 3, 2), num_train=8, num_val=4, epochs=1,
                batch_size=4, warmup_iters=1, milestones=())


def _write_data(root: str, recipe: DemoRecipe) -> Dict[str, str]:
    """The dataset's json paths; written again only when the recipe's data settings changed."""
    from .data import write_shapes_dataset

    stamp_path = os.path.join(root, "recipe.json")
    data_keys = ("image_size", "size_range", "objects", "max_occlusion", "num_train", "num_val", "seed")
    # As json reads it back (tuples become lists), so that the comparison below is like for like.
    stamp = json.loads(json.dumps({k: v for k, v in asdict(recipe).items() if k in data_keys}))
    paths = {split: os.path.join(root, "annotations", f"instances_{split}.json") for split in ("train", "val")}
    if os.path.isfile(stamp_path) and all(os.path.isfile(p) for p in paths.values()):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return paths
    s = recipe.image_size
    shapes = dict(size_range=recipe.size_range, objects=recipe.objects, max_occlusion=recipe.max_occlusion)
    write_shapes_dataset(root, recipe.num_train, height=s, width=s, seed=recipe.seed, split="train", **shapes)
    write_shapes_dataset(root, recipe.num_val, height=s, width=s, seed=recipe.seed, split="val", **shapes)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return paths


def draw_predictions(model, dataset, path: str, *, num_images: int = 8, score_thr: float = 0.5,
                     scale: int = 2) -> str:
    """One picture: for the first ``num_images`` images of ``dataset``, the ground truth (top
    row) above the model's predictions with score >= ``score_thr`` (bottom row)."""
    import torch
    from PIL import Image

    from .results import SOLOResult, masks_to_boxes

    n = min(num_images, len(dataset))
    if n == 0:
        raise ValueError("dataset: has no images to draw")
    tiles = []
    for i in range(n):
        img, target = dataset[i]
        arr = img.permute(1, 2, 0).numpy()  # the dataset's uint8 CHW image, as HWC for drawing
        gt_masks = target["masks"].bool()
        gt = SOLOResult(gt_masks, torch.ones(len(gt_masks)), target["labels"], masks_to_boxes(gt_masks),
                        image=arr, class_names=model.class_names).draw()
        pred = model.predict(img)[0]
        tiles.append((gt, pred.draw(image=arr, score_thr=score_thr, class_names=model.class_names)))
    h, w = tiles[0][0].height * scale, tiles[0][0].width * scale
    sheet = Image.new("RGB", (w * n, h * 2), (255, 255, 255))
    for i, (gt, pred) in enumerate(tiles):
        sheet.paste(gt.resize((w, h), Image.NEAREST), (i * w, 0))
        sheet.paste(pred.resize((w, h), Image.NEAREST), (i * w, h))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path


def run_demo(out: str = "out/demo", *, recipe: Optional[DemoRecipe] = None, num_workers: int = 0) -> Dict:
    """Runs the demo into ``out``; returns the COCO segm stats, the paths written and the wall time."""
    import torch

    import solo_fast
    from .data import CocoDataset, shapes_image_dir
    from .engine import evaluate, train
    from .engine.train import MODEL_FILE

    recipe = recipe or RECIPE
    t0 = time.perf_counter()
    data_root = os.path.join(out, "data")
    print(f"solo_fast {solo_fast.__version__} demo: writing {recipe.num_train} + {recipe.num_val} synthetic "
          f"{recipe.image_size}x{recipe.image_size} shape images to {data_root}", flush=True)
    paths = _write_data(data_root, recipe)
    train_set = CocoDataset(paths["train"], shapes_image_dir(data_root, "train"))
    val_set = CocoDataset(paths["val"], shapes_image_dir(data_root, "val"))

    torch.manual_seed(recipe.seed)
    s = recipe.image_size
    model = solo_fast.SOLO(recipe.config, num_classes=len(train_set.cat_ids), min_size=s, max_size=s,
                           num_grids=tuple(recipe.num_grids), frozen_stages=-1, norm_eval=False)
    run_dir = os.path.join(out, "train")
    print(f"training {recipe.config} from scratch on {model.device} (backend {solo_fast.current_backend()}, "
          f"{torch.get_num_threads()} threads): {recipe.epochs} epochs of {recipe.num_train} images, "
          f"batch {recipe.batch_size}, AdamW lr {recipe.lr:g}; log: {os.path.join(run_dir, 'train.log')}", flush=True)
    train(model, train_set, out_dir=run_dir, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
          weight_decay=recipe.weight_decay, warmup_iters=recipe.warmup_iters, warmup_ratio=recipe.warmup_ratio,
          milestones=recipe.milestones,
          optimizer="adamw", num_workers=num_workers, log_every=10, seed=recipe.seed)
    t_train = time.perf_counter() - t0

    print(f"evaluating on {len(val_set)} validation images (COCOeval, segm):", flush=True)
    results_json = os.path.join(out, "val_predictions.json")
    model.eval()
    stats = evaluate(model, val_set, batch_size=8, out_json=results_json)
    picture = draw_predictions(model, val_set, os.path.join(out, "predictions.png"))
    wall = time.perf_counter() - t0
    checkpoint = os.path.join(run_dir, MODEL_FILE)
    summary = {"stats": stats, "wall_seconds": wall, "train_seconds": t_train, "checkpoint": checkpoint,
               "picture": picture, "predictions_json": results_json, "recipe": asdict(recipe)}
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nmask AP {stats['AP']:.3f} (AP50 {stats['AP50']:.3f}, AP75 {stats['AP75']:.3f}) on the validation "
          f"split; demo took {wall / 60:.1f} min ({t_train / 60:.1f} min data + training)")
    print(f"picture (top: ground truth, bottom: predictions): {picture}")
    print(f"checkpoint: {checkpoint}  (solo_fast.SOLO.from_pretrained, or solo-fast predict --checkpoint ...)")
    return summary
