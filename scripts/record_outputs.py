"""Records what the public API computes on small seeded models, to show that a refactoring
changed nothing (issue 15: ``predict``, export and training bit-identical before and after).

    python scripts/record_outputs.py record before.pt      # at the old commit
    python scripts/record_outputs.py record after.pt       # at the new one
    python scripts/record_outputs.py compare before.pt after.pt

Only public entry points are used (``SOLO``, ``predict``, ``use_backend``, train-mode
``forward`` + ``backward``, ``solo_fast.export.ExportableSOLO``), so the script runs
unchanged on both sides of a refactoring. ``compare`` exits 1 unless every tensor is
bit-identical.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict

import numpy as np
import torch

CONFIGS = ("solo_r18_fpn", "decoupled_solo_r18_fpn", "decoupled_solo_light_r18_fpn", "solov2_r18_fpn",
           "solov2_light_r18_fpn")
SMALL = dict(min_size=96, max_size=128, num_grids=(8, 6, 5, 4, 3), fpn_channels=64, feat_channels=64,
             stacked_convs=2, flip_prob=0.0)
SIZES = ((96, 128), (75, 113), (130, 90))


def _model(name: str):
    import solo_fast

    torch.manual_seed(0)
    kw = dict(SMALL)
    if name.startswith("solov2"):
        kw.update(mask_feat_channels=32, mask_out_channels=64)
    model = solo_fast.SOLO(name, num_classes=3, **kw).eval()
    with torch.no_grad():  # detections (random class biases) with non-empty masks
        model.mask_head.conv_cls.bias.normal_(0.0, 1.5)
        for attr in ("conv_mask_list", "conv_mask_list_x", "conv_mask_list_y"):
            for conv in getattr(model.mask_head, attr, ()):
                conv.bias.fill_(2.0 if attr != "conv_mask_list" else 0.0)
                conv.weight.mul_(30)
    return model


def _images():
    rs = np.random.RandomState(0)
    return [(rs.rand(h, w, 3) * 255).astype(np.uint8) for h, w in SIZES]


def _scene(h: int, w: int):
    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, h, w, generator=g)
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 5:50, 4:60] = 1
    masks[1, 30:90, 50:120] = 1
    masks[2, 60:95, 10:40] = 1
    return img, {"masks": masks, "labels": torch.tensor([0, 2, 1])}


def record() -> Dict[str, torch.Tensor]:
    import solo_fast
    from solo_fast.export import ExportableSOLO

    out: Dict[str, torch.Tensor] = {}
    images = _images()
    for name in CONFIGS:
        model = _model(name)
        for backend in ("reference", "auto"):
            with solo_fast.use_backend(backend):
                results = model.predict(images + [torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255],
                                        batch_size=2, score_thr=0.05)
            for i, r in enumerate(results):
                for field in ("masks", "scores", "labels", "boxes"):
                    out[f"{name}/{backend}/predict{i}/{field}"] = getattr(r, field)
        h, w = SIZES[1]
        exported = ExportableSOLO(model, (h, w), score_thr=0.05)
        image = torch.from_numpy(images[1]).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            for field, value in zip(("masks", "scores", "labels", "num_valid"), exported(image)):
                out[f"{name}/export/{field}"] = value
        model.train()
        img, target = _scene(96, 128)
        for backend in ("reference", "auto"):
            model.zero_grad(set_to_none=True)
            with solo_fast.use_backend(backend):
                losses = model([img], [target])
                sum(losses.values()).backward()
            for k, v in losses.items():
                out[f"{name}/{backend}/train/{k}"] = v.detach()
            for pname, p in model.named_parameters():
                if p.grad is not None:
                    out[f"{name}/{backend}/grad/{pname}"] = p.grad.detach().clone()
        model.eval()
    return out


def compare(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> int:
    bad = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"only in {'before' if key in a else 'after'}: {key}")
            bad += 1
            continue
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else float("nan")
            print(f"DIFFERS {key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}, max |d| {diff:.3g}")
            bad += 1
    print(f"{len(set(a) | set(b))} tensors, {bad} differ")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("path")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one blocking of every conv, whatever the machine
    if args.cmd == "record":
        out = record()
        torch.save(out, args.path)
        print(f"wrote {len(out)} tensors to {args.path}")
        return 0
    return compare(torch.load(args.before, weights_only=True), torch.load(args.after, weights_only=True))


if __name__ == "__main__":
    sys.exit(main())
