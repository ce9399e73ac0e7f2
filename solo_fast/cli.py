"""Command line: ``solo-fast demo | predict`` (also ``python -m solo_fast ...``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _model(args):
    import solo_fast

    if args.checkpoint:
        return solo_fast.SOLO.from_pretrained(args.checkpoint)
    return solo_fast.SOLO(args.config, num_classes=args.num_classes)


def cmd_demo(args) -> int:
    import torch

    import solo_fast
    from solo_fast.data import draw_scene
    from solo_fast.data.synthetic import SHAPES

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    img, masks, labels = draw_scene(args.height, args.width, num_objects=5, seed=args.seed)
    model = solo_fast.SOLO(args.config, num_classes=len(SHAPES), min_size=args.height, max_size=max(args.height, args.width))
    model.class_names = list(SHAPES)
    print(f"solo_fast {solo_fast.__version__}: {args.config} on {model.device}, backend {solo_fast.current_backend()}")
    print("NOTE: this demo runs a RANDOMLY INITIALISED model (no training yet, no pretrained weights can be "
          "downloaded here): it shows the full inference pipeline end to end, not meaningful masks.")
    # A random model scores every cell near the 0.01 prior; a low threshold lets masks through.
    t0 = time.perf_counter()
    result = model.predict(img, score_thr=args.score_thr, filter_thr=0.0, max_per_img=10)[0]
    dt = time.perf_counter() - t0
    path = os.path.join(args.out, "demo_prediction.png")
    result.draw().save(path)
    gt_path = os.path.join(args.out, "demo_ground_truth.png")
    solo_fast.SOLOResult(torch.from_numpy(masks).bool(), torch.ones(len(labels)), torch.from_numpy(labels),
                         solo_fast.results.masks_to_boxes(torch.from_numpy(masks)), image=img,
                         class_names=list(SHAPES)).draw().save(gt_path)
    print(f"image {args.height}x{args.width} with {len(labels)} shapes; predicted {len(result)} instances in {dt:.2f} s")
    print(f"wrote {path} (prediction) and {gt_path} (the generated ground truth)")
    return 0


def _collect_images(inputs: List[str]) -> List[str]:
    paths = []
    for p in inputs:
        if os.path.isdir(p):
            paths += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise FileNotFoundError(f"inputs: no image or folder at {p!r}")
    if not paths:
        raise ValueError(f"inputs: no images ({', '.join(IMAGE_EXTS)}) found in {inputs}")
    return paths


def cmd_predict(args) -> int:
    model = _model(args)
    paths = _collect_images(args.inputs)
    os.makedirs(args.out, exist_ok=True)
    from tqdm import tqdm

    coco = []
    for i, path in enumerate(tqdm(paths, desc="predict", unit="img")):
        r = model.predict(path, score_thr=args.score_thr)[0]
        stem = os.path.splitext(os.path.basename(path))[0]
        r.draw(score_thr=args.draw_thr).save(os.path.join(args.out, f"{stem}.png"))
        for d in r.to_coco(i):
            d["file_name"] = os.path.basename(path)
            coco.append(d)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(coco, f)
    print(f"wrote {len(paths)} overlays and results.json to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="solo-fast", description="SOLO-family instance segmentation")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the built-in demo")
    d.add_argument("--config", default="solov2_light_r18_fpn")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--height", type=int, default=384)
    d.add_argument("--width", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--score-thr", type=float, default=0.005)
    d.set_defaults(func=cmd_demo)
    q = sub.add_parser("predict", help="predict masks for images or folders of images")
    q.add_argument("inputs", nargs="+")
    q.add_argument("--checkpoint", help="a .safetensors file written by SOLO.save_pretrained")
    q.add_argument("--config", default="solov2_r50_fpn", help="config name when no checkpoint is given")
    q.add_argument("--num-classes", type=int, default=80)
    q.add_argument("--out", default="out/predict")
    q.add_argument("--score-thr", type=float, default=0.1)
    q.add_argument("--draw-thr", type=float, default=0.3)
    q.set_defaults(func=cmd_predict)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"solo-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
