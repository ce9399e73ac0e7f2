"""Latency of every op of DESIGN.md §2 and of whole models, reference path vs fast paths.

    python benchmarks/latency.py                 # everything, on CUDA if present else CPU
    python benchmarks/latency.py --quick         # smaller inputs, fewer repeats
    python benchmarks/latency.py --ops matrix_nms,center_region_assign --device cpu
    python benchmarks/latency.py --ops e2e       # only the end-to-end model rows
    python benchmarks/latency.py --ops e2e_inference --mmdet-python /work/.mmdet-venv/bin/python

Each row is the median (and 20th/80th percentiles) of repeated runs after warm-up:
CUDA events on a GPU, synchronised ``time.perf_counter`` on the CPU. The speed-up is
against the reference row of the same case. A table goes to stdout and everything to a
JSON file (``--json``). The ``preprocess`` rows time the input transform instead: the float
path against the uint8 (OpenCV) path of a camera photo.

The ``e2e_inference`` rows run ``predict`` on one 800x1333 photo: ``reference``, ``auto``
(the fp32 fast path: on the CPU the channels-last network with BatchNorm folded) and
``bf16`` (``precision="bf16"``), each fast row with its agreement with the reference.
``--mmdet-python`` first runs ``mmdet_peer.py`` in that interpreter: mmdetection 3.3's
``inference_detector`` on its own randomly initialised model of each config, whose
checkpoint the solo_fast rows then load with ``SOLO.from_mmdet`` (same weights, same image,
same thread count), and adds its row and an "x mmdetection" note to each solo_fast row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
try:
    import resource
except ImportError:  # not on Windows
    resource = None
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import solo_fast  # installed into the venv by ./quickstart.sh (pip install -e .)
from solo_fast import _cpu, ops

# Dense tensor-core peaks (fp16 and int8 ops/s) and memory bandwidth (bytes/s), for the
# "implied floor" column (SXM parts).
GPU_PEAKS = {
    "H100": {"fp16": 989e12, "int8": 1979e12, "bw": 3.35e12},
    "H200": {"fp16": 989e12, "int8": 1979e12, "bw": 4.8e12},
    "A100": {"fp16": 312e12, "int8": 624e12, "bw": 2.0e12},
}


def matrix_nms_cost(n: int, height: int, width: int) -> dict:
    """Work of Matrix NMS's decay on N masks of height x width, counting the upper triangle only.

    ``ops``: 2 * N(N-1)/2 * H*W multiply-adds of 0/1 values (int8 tensor-core ops on the
    GPU); ``bytes``: the masks read once as bytes plus the N x N int32 intersections
    written once and read twice, the least the three-kernel Triton design moves.
    """
    pairs = n * (n - 1) // 2
    pixels = height * width
    return {"ops": 2 * pairs * pixels, "bytes": n * pixels + 3 * 4 * n * n}


def floor_ms(case: Dict, peak: Dict) -> float:
    """Lower bound of a case on a GPU: the slower of moving its bytes and doing its ops."""
    rate = peak[case.get("precision", "fp16")]
    return max(case.get("flops", 0) / rate, case.get("bytes", 0) / peak["bw"]) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, max_seconds: float) -> Dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    faults: List[int] = []  # CPU: page faults and kernel time of each run (fresh memory the OS hands out)
    sys_s: List[float] = []
    budget_end = time.perf_counter() + max_seconds
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            before = resource.getrusage(resource.RUSAGE_SELF) if resource else None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if before is not None:
                after = resource.getrusage(resource.RUSAGE_SELF)
                faults.append(after.ru_minflt - before.ru_minflt)
                sys_s.append(after.ru_stime - before.ru_stime)
        if time.perf_counter() > budget_end and len(times) >= 3:
            break
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    stats = {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "runs": len(times)}
    if faults:
        stats.update(page_faults=statistics.median(faults), sys_s=statistics.median(sys_s))
    return stats


# --------------------------------------------------------------------------------------
# inputs
def clustered_masks(n: int, h: int, w: int, device, seed: int = 0):
    """Rectangles in clusters of near-duplicates, as Matrix NMS sees after a SOLO head."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    centres = torch.rand(max(n // 8, 1), 2, generator=g)
    for i in range(n):
        cy, cx = centres[i % centres.shape[0]]
        sh, sw = (0.1 + 0.3 * torch.rand(2, generator=g)).tolist()
        jitter = (torch.rand(2, generator=g) - 0.5) * 0.05
        y0, x0 = int((cy + jitter[0] - sh / 2).clamp(0, 1) * h), int((cx + jitter[1] - sw / 2).clamp(0, 1) * w)
        masks[i, y0 : min(h, y0 + int(sh * h) + 1), x0 : min(w, x0 + int(sw * w) + 1)] = True
    labels = torch.randint(0, 3, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    return masks.to(device), labels.to(device), scores.to(device)


def scene_masks(m: int, h: int, w: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = torch.zeros(m, h, w, dtype=torch.uint8)
    for i in range(m):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        ry, rx = (torch.rand(2, generator=g) * torch.tensor([h, w]) * 0.25 + 8).tolist()
        masks[i] = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).to(torch.uint8)
    return masks.to(device), torch.randint(0, 80, (m,), generator=g).to(device)


def op_cases(device, quick: bool) -> List[Dict]:
    """(op, label, make() -> callable(backend)) for every op of §2."""
    cases = []
    mh, mw = (100, 168) if quick else (200, 336)
    for n in (100, 500):
        def make(n=n):
            masks, labels, scores = clustered_masks(n, mh, mw, device)
            return lambda b: ops.matrix_nms(masks, labels, scores, filter_thr=0.05, backend=b)
        # Upper-triangle intersections in int8 on tensor cores; masks read once as bytes.
        cost = matrix_nms_cost(n, mh, mw)
        cases.append(dict(op="matrix_nms", label=f"N={n} {mh}x{mw}", make=make,
                          flops=cost["ops"], bytes=cost["bytes"], precision="int8"))

    ph, pw = (416, 672) if quick else (800, 1344)

    def make_assign():
        batch = [scene_masks(15, ph, pw, device, seed=s) for s in range(2)]
        kw = dict(pad_shape=(ph, pw), num_grids=[40, 36, 24, 16, 12],
                  scale_ranges=[(1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)],
                  num_classes=80, mask_stride=[4, 4, 8, 16, 16])
        return lambda b: ops.center_region_assign_batch([x[0] for x in batch], [x[1] for x in batch], backend=b, **kw)

    cases.append(dict(op="center_region_assign", label=f"2 img x 15 inst {ph}x{pw}", make=make_assign,
                      bytes=2 * 15 * ph * pw))

    for k, e in ((500, 256),):
        def make_mp(k=k, e=e):
            g = torch.Generator().manual_seed(0)
            feats = torch.randn(e, mh, mw, generator=g).to(device)
            kern = (torch.randn(k, e, generator=g) * 0.05).to(device)
            return lambda b: ops.mask_predict(feats, kern, backend=b)
        cases.append(dict(op="mask_predict", label=f"K={k} E={e} {mh}x{mw}", make=make_mp,
                          flops=2 * k * e * mh * mw, bytes=2 * (e * mh * mw + k * mh * mw)))

    # The CPU fast network's layout: SOLOv2's mask features channels-last (fp32, and bf16
    # under precision="bf16"), read by the brgemm GEMM (mask_logits) as they lie.
    for dt in (torch.float32, torch.bfloat16):
        if device.type != "cpu" or not ops.winograd_usable(dt):
            continue

        def make_mp_cl(dt=dt):
            g = torch.Generator().manual_seed(0)
            feats = torch.randn(1, 256, mh, mw, generator=g).to(dt).contiguous(memory_format=torch.channels_last)[0]
            kern = (torch.randn(60, 256, generator=g) * 0.05).to(dt).float()
            return lambda b: ops.mask_predict(feats, kern, backend=b)
        cases.append(dict(op="mask_predict", label=f"K=60 E=256 {mh}x{mw} channels-last {str(dt)[6:]}",
                          make=make_mp_cl, flops=2 * 60 * 256 * mh * mw))

    def make_boxes():
        masks = torch.zeros(26, ph, pw - 11, dtype=torch.bool, device=device)
        for i in range(26):  # objects of assorted sizes and places
            y0, x0 = (37 * i) % (ph // 2), (53 * i) % (pw // 2)
            masks[i, y0 : y0 + ph // 3, x0 : x0 + pw // 4] = True
        return lambda b: ops.masks_to_boxes(masks, backend=b)
    cases.append(dict(op="masks_to_boxes", label=f"26 masks {ph}x{pw - 11}", make=make_boxes,
                      bytes=26 * ph * (pw - 11)))

    # Post-processing's last step for a photo resized to the test size: stride-4 soft masks
    # -> padded input (x4) -> crop to the resized image -> the photo's size, > 0.5.
    for pad, img, ori in (((448, 768), (448, 747), (800, 1333)), ((ph, pw), (ph, pw - 11), (ph, pw - 11))):
        if quick:
            pad, img, ori = tuple(v // 2 for v in pad), tuple(v // 2 for v in img), tuple(v // 2 for v in ori)
            pad = (pad[0] // 4 * 4, pad[1] // 4 * 4)

        def make_final(pad=pad, img=img, ori=ori):
            g = torch.Generator().manual_seed(0)
            soft = torch.rand(54, pad[0] // 4, pad[1] // 4, generator=g).to(device)
            return lambda b: ops.binary_masks_x4(soft, img, 0.5, ori, backend=b)
        cases.append(dict(op="binary_masks_x4", label=f"54 masks {pad[0] // 4}x{pad[1] // 4} -> {img[0]}x{img[1]} -> "
                                                      f"{ori[0]}x{ori[1]}", make=make_final,
                          bytes=54 * ori[0] * ori[1]))

    # Winograd against oneDNN's direct conv (the "reference" column here), channels-last,
    # weights cycled so that each call reads them from memory as in a model: the 3x3 layers
    # of SOLOv2 R50 at 800x1344 (half that with --quick).
    wino_shapes = [("FPN P2 out", 256, 256, mh, mw), ("mask feat P2", 256, 128, mh, mw),
                   ("kernel tower", 512, 512, 40, 40), ("ResNet layer3", 256, 256, ph // 16, pw // 16),
                   ("ResNet layer1", 64, 64, mh, mw)]
    for dt in (torch.float32, torch.bfloat16):
        if device.type != "cpu" or not ops.winograd_usable(dt):
            continue
        for name, c, o, h, w in wino_shapes:
            def make_wino(c=c, o=o, h=h, w=w, dt=dt):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(1, c, h, w, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
                ws = [torch.randn(o, c, 3, 3, generator=g) * 0.05 for _ in range(4)]
                direct = [w_.to(dt).contiguous(memory_format=torch.channels_last) for w_ in ws]
                packed = [ops.winograd_pack(w_, dt) for w_ in ws]
                bias = torch.randn(o, generator=g)
                turn = [0]

                def run(b):
                    i = turn[0] = (turn[0] + 1) % len(ws)
                    if b == "reference":
                        return torch.nn.functional.conv2d(x, direct[i], bias.to(dt), padding=1)
                    return ops.winograd_conv3x3(x, packed[i], bias)
                return run
            cases.append(dict(op="winograd_conv3x3", label=f"{name} {c}->{o} {h}x{w} {str(dt)[6:]}",
                              make=make_wino, flops=2 * o * c * 9 * h * w))

    conv_shapes = [("SOLO mask tower", 1, 256, 256, mh // 2, mw // 2, "xy", None),
                   ("SOLOv2 kernel branch", 1, 256, 512, 40, 40, "xy", (mh // 2, mw // 2)),
                   ("Decoupled x tower", 1, 256, 256, mh // 2, mw // 2, "x", None)]
    for name, b_, c, o, h, w, coords, src in conv_shapes:
        def make_cc(b_=b_, c=c, o=o, h=h, w=w, coords=coords, src=src):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b_, c, h, w, generator=g).to(device)
            wt = (torch.randn(o, c + len(coords), 3, 3, generator=g) * 0.02).to(device)
            bias = torch.randn(o, generator=g).to(device)
            return lambda b: ops.coord_conv2d(x, wt, bias, coords=coords, coord_src_size=src, backend=b)
        cases.append(dict(op="coord_conv2d", label=f"{name} {c}->{o} {h}x{w}", make=make_cc,
                          flops=2 * b_ * o * (c + len(coords)) * 9 * h * w))

    # DCNv2 3x3 convs of a DCN ResNet-50 at an 800x1344 input (half that with --quick):
    # c4 (256 -> 256 at stride 16, stride 1) and c3's first block (128 -> 128, stride 2
    # from the stride-4 map). Offsets ~N(0, 1) pixels, masks in (0, 1).
    dcn_shapes = [("c4 3x3", 256, 256, ph // 16, pw // 16, 1), ("c3 3x3 s2", 128, 128, ph // 4, pw // 4, 2)]
    for name, c, o, h, w, s in dcn_shapes:
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1

        def make_dcn(c=c, o=o, h=h, w=w, s=s, ho=ho, wo=wo):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, c, h, w, generator=g).to(device)
            off = torch.randn(1, 18, ho, wo, generator=g).to(device)
            mask = torch.rand(1, 9, ho, wo, generator=g).to(device)
            wt = (torch.randn(o, c, 3, 3, generator=g) * 0.02).to(device)
            bias = torch.randn(o, generator=g).to(device)
            return lambda b: ops.deform_conv2d(x, off, mask, wt, bias, stride=s, padding=1, backend=b)
        cases.append(dict(op="deform_conv2d", label=f"{name} {c}->{o} {h}x{w}", make=make_dcn,
                          flops=2 * o * c * 9 * ho * wo))
    return cases


E2E_MODELS = ("solo_r50_fpn", "solov2_r50_fpn", "solov2_light_r18_fpn")


def bench_image(h: int, w: int):
    """A photo-like HWC uint8 RGB image (smooth gradients, shapes, noise; as
    ``scripts/compare_mmdet.py`` draws them)."""
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    from compare_mmdet import _canvas

    return _canvas(h, w, np.random.RandomState(0))


def _detections(results) -> List[Dict]:
    return [{"scores": r.scores, "labels": r.labels, "masks": r.masks} for r in results]


def e2e_cases(device, quick: bool, models=E2E_MODELS, peer: Optional[Dict] = None) -> List[Dict]:
    """Whole models on one 800x1333 photo (each resized to its config's test size), and a
    training step. ``peer``: what ``mmdet_peer.py`` wrote; then the inference rows load its
    checkpoints with ``SOLO.from_mmdet`` and run on its image, as mmdetection did."""
    h, w = (416, 704) if quick else (800, 1333)
    size = dict(min_size=h, max_size=w) if quick else {}
    cases = []
    for name in models:
        def make_inf(name=name):
            torch.manual_seed(0)
            if peer and name in peer["configs"]:
                model = solo_fast.SOLO.from_mmdet(peer["configs"][name]["checkpoint"], name).to(device).eval()
                img = peer["image"]
            else:
                model = solo_fast.SOLO(name, num_classes=80, **size).to(device).eval()
                with torch.no_grad():
                    # An untrained classifier scores everything at the 0.01 prior; let one class
                    # fire on every cell so that post-processing has hundreds of candidates
                    # (after point NMS), as a trained model has on a busy image.
                    model.mask_head.conv_cls.bias[0] = -1.0
                    # SOLO's 1x1 mask convs start at the focal prior (bias -4.6): every mask would
                    # be empty and post-processing would stop at the area filter. Non-empty masks
                    # take it through Matrix NMS and the final resize, as on a real image.
                    for conv in getattr(model.mask_head, "conv_mask_list", ()):
                        conv.bias.zero_()
                        conv.weight.mul_(30)
                img = bench_image(h, w)

            def run(b):
                with solo_fast.use_backend("reference" if b == "reference" else "auto"):
                    return _detections(model.predict(img, precision="bf16" if b == "bf16" else "fp32"))
            run.conv_flops = network_conv_flops(model, img) if device.type == "cpu" else None
            return run
        cases.append(dict(op="e2e_inference", label=f"{name} {h}x{w}", make=make_inf, config=name))

        def make_train(name=name):
            torch.manual_seed(0)
            model = solo_fast.SOLO(name, num_classes=80, min_size=h, max_size=w).to(device).train()
            img = torch.rand(3, h, w, device=device)
            masks, labels = scene_masks(10, h, w, device)

            def run(b):
                with solo_fast.use_backend("reference" if b == "reference" else "auto"):
                    losses = model([img], [{"masks": masks, "labels": labels}])
                    sum(losses.values()).backward()
                model.zero_grad(set_to_none=True)
            return run
        cases.append(dict(op="e2e_train_step", label=f"{name} {h}x{w}", make=make_train, config=name))
    return cases


def run_peer(mmdet_python: str, models: List[str], quick: bool, repeats: int, workdir: str) -> Dict:
    """Runs ``mmdet_peer.py`` in mmdetection's interpreter on the e2e image, before any
    solo_fast row (the two never share the cores)."""
    import subprocess

    import cv2

    h, w = (416, 704) if quick else (800, 1333)
    os.makedirs(workdir, exist_ok=True)
    image = os.path.join(workdir, f"photo_{h}x{w}.png")
    cv2.imwrite(image, bench_image(h, w)[..., ::-1])  # RGB -> OpenCV's BGR
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmdet_peer.py")
    subprocess.run([mmdet_python, script, "--workdir", workdir, "--image", image, "--configs", *models,
                    "--repeats", str(repeats), "--threads", str(torch.get_num_threads())], check=True)
    with open(os.path.join(workdir, "peer.json")) as f:
        peer = json.load(f)
    peer["image"] = image
    return peer


PREPROCESS_PATHS = ("float", "uint8")


def preprocess_cases(device, quick: bool) -> List[Dict]:
    """The input transform of a camera photo to SOLO's (1333, 800) scale: the float path
    (what every image took before issue 12: a full-size float copy in [0, 1], then
    F.interpolate) against the uint8 path (OpenCV's resize of the uint8 image, then float),
    both from the decoded HWC uint8 array to the padded batch on ``device``."""
    import numpy as np

    h, w = (1500, 2000) if quick else (3000, 4000)
    rgb = (np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8)
    tf = solo_fast.SOLO("solo_r18_fpn", num_classes=1).transform

    def make():
        def run(path):
            if path == "float":
                return tf([torch.from_numpy(rgb).to(device).permute(2, 0, 1).float().div(255.0)], device=device)
            return tf([rgb], device=device)
        return run
    th, tw = tf.test_size(h, w)
    return [dict(op="preprocess", label=f"{h}x{w} photo -> {th}x{tw}", make=make)]


def output_agreement(ref: List[Dict], fast: List[Dict]) -> Dict:
    """How far the fast path's detections on one image are from the reference's.

    Detections are compared position by position, and also matched by mask (each
    reference detection to the fast one of its label with the highest mask IoU): two
    candidates whose scores are within rounding of each other can trade places, and
    Matrix NMS then decays each by the other in the other order, which moves their
    scores by more than the rounding itself."""
    r, f = ref[0], fast[0]
    n = min(r["scores"].numel(), f["scores"].numel())
    out = {
        "detections": [r["scores"].numel(), f["scores"].numel()],
        "labels_equal": r["labels"].shape == f["labels"].shape and torch.equal(r["labels"].cpu(), f["labels"].cpu()),
        "max_score_diff": float((r["scores"][:n] - f["scores"][:n]).abs().max()) if n else 0.0,
        "mask_pixels_differing": int((r["masks"][:n] != f["masks"][:n]).sum()),
        "mask_pixels": int(r["masks"][:n].numel()),
    }
    if r["scores"].numel() and f["scores"].numel():
        rm, fm = r["masks"].flatten(1).float(), f["masks"].flatten(1).float()
        inter = rm @ fm.t()
        iou = inter / (rm.sum(1)[:, None] + fm.sum(1)[None] - inter).clamp(min=1)
        iou = torch.where(r["labels"][:, None] == f["labels"][None], iou, torch.full_like(iou, -1.0))
        best = iou.argmax(1)
        out["moved"] = int((best != torch.arange(len(best), device=best.device)).sum())
        out["matched_max_score_diff"] = float((r["scores"] - f["scores"][best]).abs().max())
        out["matched_min_iou"] = float(iou.gather(1, best[:, None]).min())
    return out


def describe_agreement(a: Dict) -> str:
    nr, nf = a["detections"]
    same = f"same {nr} labels" if a["labels_equal"] else f"labels DIFFER ({nr} vs {nf} detections)"
    text = (f"{same}, |dscore| <= {a['max_score_diff']:.1e}, "
            f"{a['mask_pixels_differing']} of {a['mask_pixels']} mask pixels differ")
    if a.get("moved"):
        text += (f"; matched by mask: {a['moved']} at another position, |dscore| <= "
                 f"{a['matched_max_score_diff']:.1e}, IoU >= {a['matched_min_iou']:.6f}")
    return text


def allocator_settings() -> Dict[str, str]:
    """Environment that changes how the C allocator gives memory back: on the CPU, page
    faults from fresh large allocations are a large share of a model's time."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")}


def backends_for(case: Dict, device) -> List[str]:
    if case["op"] == "preprocess":
        return list(PREPROCESS_PATHS)
    if case["op"] == "e2e_inference":  # "auto" is the fp32 fast path, "bf16" the opt-in precision
        return ["reference", "auto", "bf16"]
    if case["op"].startswith("e2e"):
        return ["reference", "auto"]
    if case["op"] == "winograd_conv3x3":  # against oneDNN's direct conv; no backend registry
        return ["reference", "cpu"]
    avail = ops.available_backends(case["op"], device)
    return ["reference"] + [b for b in avail if b != "reference"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu.cpu_model()} [{_cpu.isa_summary()}] ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def cpu_conv_rate(dtype: torch.dtype) -> float:
    """FLOP/s of the CPU's best convolution here: the channels-last 3x3 256->256 conv of the
    FPN's stride-4 output at 800x1344 (the largest layer of every R50 model), best of 5."""
    x = torch.randn(1, 256, 200, 336).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad():
        for i in range(7):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            if i >= 2:
                best = min(best, time.perf_counter() - t)
    return 2 * 256 * 256 * 9 * 200 * 336 / best


def network_conv_flops(model, image) -> int:
    """FLOPs of the convolutions of ``model``'s network (backbone, FPN, head) on ``image``'s
    padded input: every one of them runs whichever path runs the network."""
    from torch.utils.flop_counter import FlopCounterMode

    from solo_fast.modeling.images import load_images

    inputs, _ = load_images(image)
    with torch.no_grad():
        batch, _ = model.transform(inputs, device=next(model.parameters()).device)
        with FlopCounterMode(display=False) as counter:
            model.mask_head(model.neck(model.backbone(batch)))
    return sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats")
    p.add_argument("--ops", default="all",
                   help="comma-separated: matrix_nms, center_region_assign, mask_predict, coord_conv2d, "
                        "preprocess, e2e (= e2e_inference,e2e_train_step) (or all)")
    p.add_argument("--models", default=",".join(E2E_MODELS), help="comma-separated configs of the e2e rows")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default="benchmarks/latency.json")
    p.add_argument("--mmdet-python", help="python of an mmdetection 3.3 environment: adds its inference_detector "
                                          "row to e2e_inference, on the same checkpoint and image (mmdet_peer.py)")
    p.add_argument("--peer-workdir", default="benchmarks/peer", help="where the peer's checkpoints and image go")
    p.add_argument("--reuse-peer", action="store_true", help="take the peer row, checkpoints and image from "
                                                             "--peer-workdir (an earlier --mmdet-python run)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="first call solo_fast._cpu.keep_freed_memory(), as solo-fast predict/eval do")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    wanted = set(args.ops.split(","))
    cases = [c for c in op_cases(device, args.quick) + preprocess_cases(device, args.quick)
             if "all" in wanted or c["op"] in wanted]
    repeats = args.repeats or (5 if args.quick else 20)
    models = [m for m in args.models.split(",") if m]
    peer = None
    if args.reuse_peer:
        with open(os.path.join(args.peer_workdir, "peer.json")) as f:
            peer = json.load(f)
        h, w = (416, 704) if args.quick else (800, 1333)
        peer["image"] = os.path.join(args.peer_workdir, f"photo_{h}x{w}.png")
    elif args.mmdet_python and wanted & {"all", "e2e", "e2e_inference"}:
        peer = run_peer(args.mmdet_python, models, args.quick, min(repeats, 5), args.peer_workdir)
    if args.keep_freed_memory:
        if not _cpu.keep_freed_memory():
            raise SystemExit("--keep-freed-memory: not possible here (not glibc)")
    if wanted & {"all", "e2e", "e2e_inference", "e2e_train_step"}:
        cases += [c for c in e2e_cases(device, args.quick, models, peer) if wanted & {"all", "e2e", c["op"]}]

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "solo_fast": solo_fast.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "argv": sys.argv[1:],
            "allocator": allocator_settings(), "keep_freed_memory": args.keep_freed_memory, "mmdet_peer": peer}
    try:
        import subprocess
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        info["commit"] = None
    peak = next((v for k, v in GPU_PEAKS.items() if k in info["device"]), None) if device.type == "cuda" else None
    conv_rates = {}
    if device.type == "cpu" and any(c["op"] == "e2e_inference" for c in cases):
        conv_rates = {"fp32": cpu_conv_rate(torch.float32)}
        if _cpu.native_bf16():
            conv_rates["bf16"] = cpu_conv_rate(torch.bfloat16)
        info["conv_rate_gflops"] = {k: v / 1e9 for k, v in conv_rates.items()}
        print("# best conv here (channels-last 3x3 256->256 at 200x336): "
              + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in conv_rates.items())
              + "; an e2e row's 'direct conv floor' is its network's conv FLOPs at that rate (Winograd's 3x3"
              + " layers compute fewer FLOPs, so a fast row can go below it)")
    print(f"# {info['device']} | torch {info['torch']} | triton {triton_version} | commit {info['commit']} | {info['date']}"
          f" | allocator env {info['allocator'] or 'default'}"
          f"{' | keep_freed_memory()' if args.keep_freed_memory else ''}")
    header = f"{'op':<22} {'case':<36} {'backend':<10} {'median ms':>10} {'p20':>9} {'p80':>9} {'speed-up':>9}  notes"
    print(header)
    print("-" * len(header))
    rows = []
    for case in cases:
        run = case["make"]()
        ref_ms = None
        peer_entry = peer and peer["configs"].get(case.get("config")) if case["op"] == "e2e_inference" else None
        if peer_entry:
            t = sorted(peer_entry["times_ms"])
            q = lambda f: t[min(len(t) - 1, int(f * len(t)))]  # noqa: E731
            rows.append({"op": case["op"], "case": case["label"], "backend": "mmdet", "median_ms": peer_entry["median_ms"],
                         "times_ms": t, "detections": peer_entry["detections"]})
            print(f"{case['op']:<22} {case['label']:<36} {'mmdet':<10} {peer_entry['median_ms']:>10.3f} "
                  f"{q(0.2):>9.3f} {q(0.8):>9.3f} {'-':>9}  mmdetection {peer['mmdet']} inference_detector, "
                  f"{peer_entry['detections']} detections, {len(t)} runs", flush=True)
        outputs = {}
        for backend in backends_for(case, device):
            heavy = case["op"].startswith("e2e")
            stats = measure(lambda: outputs.__setitem__(backend, run(backend)), device, warmup=1 if heavy else 2,
                            repeats=min(repeats, 5) if heavy else repeats, max_seconds=60 if heavy else 20)
            if ref_ms is None:  # the first path is the baseline: the reference, or the float preprocessing
                ref_ms = stats["median_ms"]
            notes = []
            if heavy and "page_faults" in stats:
                notes.append(f"{stats['page_faults'] / 1e3:.0f}k page faults, {stats['sys_s']:.1f} s in the kernel per run")
            if "flops" in case:
                notes.append(f"{case['flops'] / 1e9:.2f} GFLOP")
            if "bytes" in case:
                notes.append(f"{case['bytes'] / 1e6:.1f} MB min")
            if peak and ("flops" in case or "bytes" in case):
                notes.append(f"floor {floor_ms(case, peak) * 1e3:.1f} us")
            conv_flops = getattr(run, "conv_flops", None)
            rate = conv_rates.get("bf16" if backend == "bf16" else "fp32")
            if case["op"] == "e2e_inference" and conv_flops and rate and backend != "reference":
                notes.append(f"{conv_flops / 1e9:.0f} GFLOP of direct convs: direct conv floor {conv_flops / rate * 1e3:.0f} ms")
                stats = {**stats, "conv_gflop": conv_flops / 1e9, "conv_floor_ms": conv_flops / rate * 1e3}
            if case["op"] == "e2e_inference" and backend != "reference":
                agreement = output_agreement(outputs["reference"], outputs[backend])
                notes.append(describe_agreement(agreement))
                stats = {**stats, "agreement": agreement}
            row = {"op": case["op"], "case": case["label"], "backend": backend, **stats,
                   "speedup": ref_ms / stats["median_ms"] if ref_ms else None,
                   "flops": case.get("flops"), "bytes": case.get("bytes")}
            peer_ms = peer and peer["configs"].get(case.get("config"), {}).get("median_ms")
            if case["op"] == "e2e_inference" and peer_ms:
                notes.insert(0, f"{peer_ms / stats['median_ms']:.2f}x mmdetection")
                row["vs_mmdet"] = peer_ms / stats["median_ms"]
            rows.append(row)
            sp = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
            print(f"{case['op']:<22} {case['label']:<36} {backend:<10} {stats['median_ms']:>10.3f} "
                  f"{stats['p20_ms']:>9.3f} {stats['p80_ms']:>9.3f} {sp:>9}  {', '.join(notes)}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
