#!/usr/bin/env python
"""Side-by-side check of ``SOLO.predict`` against mmdetection 3.3's ``inference_detector``.

    .venv/bin/python scripts/compare_mmdet.py --mmdet-python /work/.mmdet-venv/bin/python \
        --workdir /tmp/cmp [--configs solov2_r50_fpn ...] [--quick] [--reuse-mmdet]

The two libraries live in separate virtual environments, so this script runs twice:
stage 1 (``--stage mmdet``, re-invoked with ``--mmdet-python``) writes test images, builds
randomly initialised mmdetection models, saves their checkpoints and records mmdetection's
network input and predictions; stage 2 (this process, solo_fast's python) loads each
checkpoint with ``SOLO.from_mmdet`` and compares. Exit code 0 iff every network input is
bit-identical. Only stdlib, numpy, torch, cv2 and PIL are imported at module level: they
exist in both environments.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import torch
from PIL import Image

# solo_fast config name -> mmdetection config (relative to mmdet/.mim/configs).
CONFIGS = {
    "solov2_r50_fpn": "solov2/solov2_r50_fpn_1x_coco.py",
    "solo_r50_fpn": "solo/solo_r50_fpn_1x_coco.py",
    "decoupled_solo_r50_fpn": "solo/decoupled-solo_r50_fpn_1x_coco.py",
    "decoupled_solo_light_r50_fpn": "solo/decoupled-solo-light_r50_fpn_3x_coco.py",
    "solov2_light_r18_fpn": "solov2/solov2-light_r18_fpn_ms-3x_coco.py",
}
# name -> (stored height, width, kind). The sizes are odd on purpose; 800x1333 is exactly
# the R50 configs' test size (no resize there), 97x131 is upscaled.
IMAGES = {
    "rgb.png": (480, 640, "rgb"),
    "photo.jpg": (333, 517, "jpeg"),
    "exif6.jpg": (600, 401, "jpeg_exif6"),  # decodes to 401x600
    "gray.png": (97, 131, "gray"),
    "rgba.png": (800, 1333, "rgba"),
    "palette.png": (517, 333, "palette"),
    "gray16.png": (600, 401, "gray16"),
}
QUICK_CONFIGS = ["solov2_light_r18_fpn"]
QUICK_IMAGES = ["rgb.png", "exif6.jpg", "gray16.png"]
SEED = 0
# (cell, class) pairs above score_thr on the calibration image: few enough that
# mmdetection's post-processing stays fast, enough for tens of detections after NMS.
TARGET_CANDIDATES = 120
SCORE_THR = 0.1
MASK_WEIGHT_SCALE = 20.0


# ---------------------------------------------------------------------------- stage 1: mmdet

def _canvas(h: int, w: int, rng: np.random.RandomState) -> np.ndarray:
    """Smooth gradients plus a few filled shapes: structure for the network, some flat
    areas and hard edges for the resize, all deterministic."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([127.5 + 127.5 * np.sin(xx / w * np.pi * (1 + c) + yy / h * np.pi * (2 - c) + phase[c])
                    for c in range(3)], -1).astype(np.uint8)
    for _ in range(6):
        color = tuple(int(c) for c in rng.randint(0, 256, 3))
        cx, cy, r = int(rng.randint(0, w)), int(rng.randint(0, h)), int(rng.randint(4, max(5, min(h, w) // 3)))
        if rng.rand() < 0.5:
            cv2.circle(img, (cx, cy), r, color, -1)
        else:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r), color, -1)
    return np.ascontiguousarray(img)


def write_images(workdir: str, names) -> dict:
    rng = np.random.RandomState(SEED)
    paths = {}
    for name in IMAGES:  # every image, so the quick set gets the same pixels as the full one
        h, w, kind = IMAGES[name]
        rgb = _canvas(h, w, rng)
        alpha = np.linspace(0, 255, w, dtype=np.float32)[None].repeat(h, 0).astype(np.uint8)
        path = os.path.join(workdir, name)
        if name not in names:
            continue
        if kind == "rgb":
            Image.fromarray(rgb).save(path)
        elif kind == "jpeg":
            Image.fromarray(rgb).save(path, quality=90)
        elif kind == "jpeg_exif6":
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
            Image.fromarray(rgb).save(path, quality=90, exif=exif.tobytes())
        elif kind == "gray":
            Image.fromarray(rgb.mean(-1).astype(np.uint8), "L").save(path)
        elif kind == "rgba":
            Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
        elif kind == "palette":
            Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
        elif kind == "gray16":  # full 16-bit range, low byte not zero: decoders must shift, not clip
            cv2.imwrite(path, (rgb.mean(-1) * 257 + rng.randint(0, 257, (h, w))).clip(0, 65535).astype(np.uint16))
        paths[name] = path
    return paths


def _make_detecting(model, calib_path: str) -> None:
    """A randomly initialised head detects nothing: class scores ~0.01 everywhere (bias
    prior 0.01), SOLO's mask logits ~-4.6 (the same prior), SOLOv2's soft masks ~0.5 (tiny
    kernels: binary masks flip on rounding). Zero the mask biases and scale the mask convs
    so soft masks are far from mask_thr, make class scores feature-dependent, and shift
    the class bias so that TARGET_CANDIDATES pairs pass score_thr on one image."""
    from mmdet.apis import inference_detector

    head = model.mask_head
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        convs = [c for n in ("conv_mask_list", "conv_mask_list_x", "conv_mask_list_y") for c in getattr(head, n, [])]
        for conv in convs + ([head.conv_kernel] if hasattr(head, "conv_kernel") else []):  # SOLOv2: dynamic kernels
            conv.weight.mul_(MASK_WEIGHT_SCALE)
            conv.bias.zero_()
        head.conv_cls.weight.mul_(3)
        head.conv_cls.bias.copy_(torch.randn(head.conv_cls.bias.shape, generator=g) * 0.5 - 30)  # -30: nothing passes
    logits = []
    hook = head.conv_cls.register_forward_hook(lambda m, a, out: logits.append(out.detach().flatten()))
    inference_detector(model, calib_path)
    hook.remove()
    kth = torch.cat(logits).topk(TARGET_CANDIDATES).values[-1]
    with torch.no_grad():
        head.conv_cls.bias.add_(float(np.log(SCORE_THR / (1 - SCORE_THR))) - float(kth) + 1e-3)


def build_mmdet_model(name: str, calib_path: str, checkpoint: str):
    """mmdetection's model of solo_fast config ``name``, randomly initialised by mmdetection's
    own initialisers (seeded), made to detect on ``calib_path`` and saved to ``checkpoint``
    for ``SOLO.from_mmdet``. Runs in the mmdetection environment."""
    import logging
    import warnings

    import mmdet
    from mmdet.apis import init_detector
    from mmdet.evaluation import get_classes
    from mmengine.config import Config
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every parameter
    torch.manual_seed(SEED)
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", CONFIGS[name]))
    cfg.model.backbone.init_cfg = None  # nothing can be downloaded
    with warnings.catch_warnings(record=True):  # "checkpoint is None, use COCO classes": intended
        model = init_detector(cfg, checkpoint=None, device="cpu")
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # mmdet's generate_coordinate
    model.init_weights()  # mmdetection's own initialisers (init_detector leaves PyTorch's defaults)
    model.eval()
    _make_detecting(model, calib_path)
    # Plain types only in meta: solo_fast loads with weights_only=True.
    torch.save({"state_dict": model.state_dict(),
                "meta": {"dataset_meta": {"classes": [str(c) for c in get_classes("coco")]}}}, checkpoint)
    return model


def stage_mmdet(args) -> None:
    import mmdet
    from mmdet.apis import inference_detector

    paths = write_images(args.workdir, args.images)
    manifest = {"images": {n: {"path": p, "stored_hw": IMAGES[n][:2], "kind": IMAGES[n][2]} for n, p in paths.items()},
                "configs": {}, "mmdet": mmdet.__version__}
    for name in args.configs:
        ckpt = os.path.join(args.workdir, f"{name}.pth")
        model = build_mmdet_model(name, paths[args.images[0]], ckpt)
        entry = manifest["configs"][name] = {"mmdet_config": CONFIGS[name], "checkpoint": ckpt, "images": {}}
        inputs = []
        hook = model.backbone.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
        for img_name, path in paths.items():
            inputs.clear()
            t = time.time()
            sample = inference_detector(model, path)
            seconds = time.time() - t
            pred = sample.pred_instances
            masks = pred.masks.bool().numpy()
            out = os.path.join(args.workdir, f"{name}__{img_name}.npz")
            np.savez(out, input=inputs[0].numpy(), masks=np.packbits(masks, axis=-1), mask_shape=masks.shape,
                     scores=pred.scores.numpy(), labels=pred.labels.numpy())
            entry["images"][img_name] = {"npz": out, "img_shape": list(sample.metainfo["img_shape"]),
                                         "ori_shape": list(sample.metainfo["ori_shape"]),
                                         "num_dets": len(pred), "seconds": round(seconds, 2)}
            print(f"[mmdet] {name} {img_name}: {len(pred)} detections, {seconds:.1f} s", flush=True)
        hook.remove()
    with open(os.path.join(args.workdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


# ---------------------------------------------------------------------------- stage 2: solo_fast

def compare(ref: dict, x: torch.Tensor, res) -> dict:
    """One row of the table: the network inputs, then the detections index by index (both
    sides sort by score, so index i is the same detection when everything agrees)."""
    a = torch.from_numpy(ref["input"])
    row = {"input_shape": list(x.shape), "mmdet_input_shape": list(a.shape)}
    if a.shape == x.shape:
        diff = (a - x).abs()
        row.update(input_equal=bool(torch.equal(a, x)), input_max_abs=float(diff.max()),
                   input_num_diff=int((a != x).sum()))
    else:
        row.update(input_equal=False, input_max_abs=None, input_num_diff=None)
    shape = tuple(int(s) for s in ref["mask_shape"])
    m_ref = torch.from_numpy(np.unpackbits(ref["masks"], axis=-1, count=shape[-1]).astype(bool).reshape(shape))
    s_ref, l_ref = torch.from_numpy(ref["scores"]), torch.from_numpy(ref["labels"]).long()
    n_ref, n = len(s_ref), len(res.scores)
    k = min(n_ref, n)
    row.update(n_mmdet=n_ref, n_ours=n, labels_equal=n_ref == n and bool(torch.equal(l_ref, res.labels.cpu())))
    row["mask_shape_equal"] = tuple(res.masks.shape[1:]) == tuple(shape[1:])
    if k and row["mask_shape_equal"]:
        ours = res.masks[:k].cpu()
        inter = (m_ref[:k] & ours).flatten(1).sum(1).double()
        union = (m_ref[:k] | ours).flatten(1).sum(1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        row.update(max_dscore=float((s_ref[:k] - res.scores[:k].cpu()).abs().max()), min_iou=float(iou.min()),
                   diff_pixels=int((m_ref[:k] ^ ours).sum()))
    else:
        row.update(max_dscore=None, min_iou=None, diff_pixels=None)
    return row


def stage_solo_fast(args) -> int:
    import solo_fast

    with open(os.path.join(args.workdir, "manifest.json")) as f:
        manifest = json.load(f)
    rows = []
    for name in args.configs or list(manifest["configs"]):  # --reuse-mmdet: what stage 1 recorded
        entry = manifest["configs"][name]
        model = solo_fast.SOLO.from_mmdet(entry["checkpoint"], name).eval()
        report = model.load_report
        if report.missing or report.unexpected:
            print(f"[solo_fast] {name}: checkpoint did not load cleanly: {report}", flush=True)
        inputs = []
        model.backbone.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
        for img_name, meta in entry["images"].items():
            ref = dict(np.load(meta["npz"]))
            path = manifest["images"][img_name]["path"]
            for backend in ("auto", "reference"):
                inputs.clear()
                ctx = solo_fast.use_backend("reference") if backend == "reference" else contextlib.nullcontext()
                t = time.time()
                with ctx:
                    res = model.predict(path, batch_size=1)[0]
                row = {"config": name, "image": img_name, "backend": backend, "seconds": round(time.time() - t, 2),
                       "mmdet_seconds": meta["seconds"], "mmdet_img_shape": meta["img_shape"][:2],
                       "img_shape": list(model.transform.test_size(*res.masks.shape[1:])),
                       **compare(ref, inputs[0], res)}
                row["img_shape_equal"] = row["img_shape"] == row["mmdet_img_shape"]
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    ok_inputs = all(r["input_equal"] for r in rows)
    ok_dets = all(r["n_mmdet"] == r["n_ours"] and r["labels_equal"] and r["diff_pixels"] in (0, None)
                  and (r["max_dscore"] or 0.0) == 0.0 for r in rows)
    summary = {"all_inputs_bit_identical": ok_inputs, "all_detections_identical": ok_dets,
               "mmdet": manifest.get("mmdet"), "solo_fast": solo_fast.__version__, "torch": torch.__version__,
               "cv2": cv2.__version__}
    with open(os.path.join(args.workdir, "report.json"), "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    print(json.dumps(summary))
    return 0 if ok_inputs else 1


COLUMNS = ("config", "image", "backend", "input==", "in_ndiff", "dets mm/ours", "labels==", "max|dscore|",
           "min IoU", "diff px")


def print_row(r: dict, header: bool = False) -> None:
    fmt = "{:<28} {:<12} {:<9} {:<7} {:>8} {:>12} {:<8} {:>11} {:>8} {:>8}"
    if header:
        print(fmt.format(*COLUMNS))
    num = lambda v, f: "-" if v is None else format(v, f)
    eq = "yes" if r["input_equal"] else ("SHAPE" if r["input_max_abs"] is None else "NO")
    if not r["img_shape_equal"]:
        eq += "*"  # resized size differs from mmdetection's img_shape
    print(fmt.format(r["config"], r["image"], r["backend"], eq, num(r["input_num_diff"], "d"),
                     f"{r['n_mmdet']}/{r['n_ours']}", "yes" if r["labels_equal"] else "NO",
                     num(r["max_dscore"], ".2e"), num(r["min_iou"], ".6f"), num(r["diff_pixels"], "d")), flush=True)


# ---------------------------------------------------------------------------- driver

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--mmdet-python", help="python of the mmdetection 3.3 environment (stage 1)")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="solo_fast config names (default: all)")
    p.add_argument("--images", nargs="+", choices=list(IMAGES), help=argparse.SUPPRESS)  # set by the driver
    p.add_argument("--quick", action="store_true", help=f"only {QUICK_CONFIGS} on {QUICK_IMAGES}")
    p.add_argument("--reuse-mmdet", action="store_true", help="skip stage 1, use the workdir's manifest")
    p.add_argument("--stage", choices=("mmdet", "solo_fast"), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.stage == "solo_fast" or args.reuse_mmdet:
        return stage_solo_fast(args)
    args.configs = args.configs or (QUICK_CONFIGS if args.quick else list(CONFIGS))
    args.images = args.images or (QUICK_IMAGES if args.quick else list(IMAGES))
    if args.stage == "mmdet":
        stage_mmdet(args)
        return 0
    if not args.mmdet_python:
        p.error("--mmdet-python is required unless --reuse-mmdet is given")
    t = time.time()
    subprocess.run([args.mmdet_python, os.path.abspath(__file__), "--stage", "mmdet", "--workdir", args.workdir,
                    "--configs", *args.configs, "--images", *args.images], check=True)
    print(f"[mmdet] stage 1 took {time.time() - t:.0f} s", flush=True)
    return stage_solo_fast(args)


if __name__ == "__main__":
    sys.exit(main())
