"""The peer row of ``benchmarks/latency.py``: mmdetection 3.3's ``inference_detector``.

Runs in mmdetection's own interpreter (``latency.py --mmdet-python PATH`` starts it;
``../shared/peers/mmdet_env.sh`` builds a CPU environment that works):

    /work/.mmdet-venv/bin/python benchmarks/mmdet_peer.py --workdir W --image IMG \
        --configs solo_r50_fpn solov2_r50_fpn --repeats 3 --threads 2

For each solo_fast config name it builds mmdetection's model of the published config,
randomly initialised by mmdetection's initialisers and made to detect on ``IMG``
(``scripts/compare_mmdet.py``), saves the checkpoint that ``latency.py`` then loads with
``SOLO.from_mmdet``, and times ``inference_detector(model, IMG)``: one warm-up run, then
``--repeats`` runs. Writes ``W/peer.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from compare_mmdet import CONFIGS, build_mmdet_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--configs", nargs="+", required=True, choices=sorted(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    import mmdet
    from mmdet.apis import inference_detector

    torch.set_num_threads(args.threads)
    out = {"mmdet": mmdet.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(), "configs": {}}
    for name in args.configs:
        ckpt = os.path.join(args.workdir, f"{name}.pth")
        model = build_mmdet_model(name, args.image, ckpt)
        times = []
        with torch.no_grad():
            sample = inference_detector(model, args.image)  # warm-up
            for _ in range(args.repeats):
                t = time.perf_counter()
                sample = inference_detector(model, args.image)
                times.append((time.perf_counter() - t) * 1e3)
        out["configs"][name] = {"checkpoint": ckpt, "times_ms": times, "median_ms": statistics.median(times),
                                "detections": len(sample.pred_instances)}
        print(f"[mmdet] {name}: median {statistics.median(times):.0f} ms of {args.repeats}, "
              f"{len(sample.pred_instances)} detections", flush=True)
    with open(os.path.join(args.workdir, "peer.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
