"""What the test modules share: devices and backends to parametrise over, availability
markers, scene makers, and the comparisons more than one module makes.

Test modules import from here (``from helpers import ...``: pytest puts tests/ on
sys.path), never from each other; the torchrun script of test_engine.py imports it too.
"""
import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import solo_fast
from solo_fast import ops
from solo_fast.data.synthetic import SHAPES, draw_scene
from solo_fast.ops import reference
from solo_fast.ops._triton_support import triton_available

# --------------------------------------------------------------------------------------
# Devices and backends
# --------------------------------------------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Where the Triton kernels run here: the GPU, else the interpreter on CPU tensors
# (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = ("cpu", "cuda", "triton")  # every backend but "reference"


def available(op, device="cpu", among=FAST):
    """The backends of ``among`` (in that order) that ``op`` can run on ``device`` tensors here."""
    return [b for b in among if b in ops.available_backends(op, device)]


def device_backends(op, among=FAST, devices=DEVICES):
    """``(device, backend)`` params of :func:`available` backends on each device, for
    ``@pytest.mark.parametrize("device,backend", ...)``. A CPU param's id is the backend
    alone (the ids of the CPU-only parametrisations before), a CUDA one's ``cuda-<backend>``
    (marked ``cuda``)."""
    params = []
    for device in devices:
        for backend in available(op, device, among):
            if device == "cpu":
                params.append(pytest.param(device, backend, id=backend))
            else:
                params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=pytest.mark.cuda))
    return params


def on(device, *tensors):
    """The tensors on ``device`` (the same tensors on "cpu"; None stays None)."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def to_cpu(tensors):
    """A list of the tensors on the CPU (the same tensors where they are there already)."""
    return [t.cpu() for t in tensors]


@contextlib.contextmanager
def no_tf32():
    """fp32 convolutions and matmuls in full fp32 on CUDA: cuDNN's default rounds fp32 conv
    operands to TF32 (10 mantissa bits), far outside fp32 parity tolerances. No effect on
    CPU tensors."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


# --------------------------------------------------------------------------------------
# Availability markers
# --------------------------------------------------------------------------------------
HAVE_CPP = all("cpu" in ops.available_backends(op, "cpu") for op in ("matrix_nms", "center_region_assign"))
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason="solo_fast._C (the compiled CPU ops) is not built")


def needs_triton_on(device):
    """Skip unless the Triton kernels can run on ``device`` tensors here (triton installed, and
    a CUDA device or TRITON_INTERPRET=1)."""
    return pytest.mark.skipif(
        not triton_available(torch.device(device).type),
        reason=f"triton cannot run on {device} tensors here (needs triton and a CUDA device or TRITON_INTERPRET=1)",
    )


needs_triton = needs_triton_on("cpu")  # the Triton kernels on CPU tensors: the interpreter


def triton_devices(devices=DEVICES):
    """``device`` params for the Triton kernels: each device, skipped where triton cannot run
    on it; a CUDA one is marked ``cuda``."""
    return [pytest.param(d, marks=[needs_triton_on(d)] + ([pytest.mark.cuda] if d != "cpu" else []))
            for d in devices]


# --------------------------------------------------------------------------------------
# coord_conv2d
# --------------------------------------------------------------------------------------
def concat_conv(x, weight, bias, padding, coords, coord_src_size):
    """The definition of DESIGN.md §2, written out independently of the op under test."""
    b, _, h, w = x.shape
    maps = reference.coord_maps(h, w, coord_src_size=coord_src_size, device=x.device, dtype=x.dtype)
    sel = {"xy": maps, "x": maps[:, :1], "y": maps[:, 1:]}[coords]
    return F.conv2d(torch.cat([x, sel.expand(b, -1, -1, -1)], 1), weight, bias, padding=padding)


# --------------------------------------------------------------------------------------
# mask_predict
# --------------------------------------------------------------------------------------
def check_mask_predict(got, f, k, b, mask_thr, eps, soft_atol):
    """``got`` = mask_predict(f, k, b, mask_thr) of a fast path whose GEMM operands round by
    ``eps`` (relative), against the reference (see test_mask_predict.py's docstring): binary
    equal wherever the reference logit is farther than the error bound from the threshold's,
    area off by at most the ambiguous pixels, maskness (masks without ambiguous pixels) and
    soft within ``soft_atol``."""
    soft, binary, area, maskness = got
    ref_soft, ref_binary, ref_area, ref_maskness = reference.mask_predict(f, k, b, mask_thr=mask_thr)
    assert binary.dtype == torch.bool and area.dtype == torch.int64 and maskness.dtype == torch.float32
    assert soft.shape == ref_soft.shape == binary.shape
    if k.shape[0] == 0:
        assert area.shape == (0,) and maskness.shape == (0,)
        return
    e, h, w = f.shape
    f64 = f.double().reshape(e, -1)
    k64 = k.double()
    logit = (k64 @ f64).reshape(-1, h, w)
    bound = (eps * 2 * (k64.abs() @ f64.abs()) + 1e-5).reshape(-1, h, w)
    if b is not None:
        logit = logit + b.double()[:, None, None]
    thr_logit = math.log(mask_thr / (1 - mask_thr)) if 0 < mask_thr < 1 else math.copysign(math.inf, mask_thr - 0.5)
    ambiguous = (logit - thr_logit).abs() <= bound
    assert torch.equal(binary[~ambiguous], ref_binary[~ambiguous])
    n_amb = ambiguous.sum((1, 2))
    assert bool(((area - ref_area).abs() <= n_amb).all())
    clean = n_amb == 0
    torch.testing.assert_close(maskness[clean], ref_maskness[clean], atol=soft_atol, rtol=1e-5)
    torch.testing.assert_close(soft.float(), ref_soft, atol=soft_atol, rtol=0)


# --------------------------------------------------------------------------------------
# matrix_nms
# --------------------------------------------------------------------------------------
def assert_nms_matches_reference(out, ref, filter_thr=-1.0, rtol=1e-5):
    """A fast path's matrix_nms result ``out`` (any device) against the reference's ``ref``:
    the same result, up to orders between scores that tie up to rounding and masks whose
    score sits on ``filter_thr`` up to rounding."""
    s, lab, m, k = (t.cpu() for t in out)
    rs, rlab, rm, rk = ref
    assert (s.dtype, lab.dtype, m.dtype, k.dtype) == (rs.dtype, rlab.dtype, rm.dtype, rk.dtype)
    assert m.shape[1:] == rm.shape[1:]
    if torch.equal(k, rk):
        torch.testing.assert_close(s, rs, rtol=rtol, atol=1e-7)
        assert torch.equal(lab, rlab) and torch.equal(m, rm)
        return
    # Orders may differ only between scores that tie up to rounding, and the kept sets
    # only by scores that sit on filter_thr up to rounding.
    ref_score = dict(zip(rk.tolist(), rs.tolist()))
    got_score = dict(zip(k.tolist(), s.tolist()))
    for i in set(ref_score) ^ set(got_score):
        v = ref_score.get(i, got_score.get(i))
        assert filter_thr > 0 and math.isclose(v, filter_thr, rel_tol=10 * rtol), f"mask {i} kept by only one side"
    for i in set(ref_score) & set(got_score):
        assert math.isclose(got_score[i], ref_score[i], rel_tol=rtol, abs_tol=1e-7), (i, got_score[i], ref_score[i])
    gaps = (rs[:-1] - rs[1:]).abs() <= 10 * rtol * rs[:-1].abs()
    assert bool(gaps.any()), "keep_inds differ although the reference's scores have no near-ties"


# --------------------------------------------------------------------------------------
# center_region_assign
# --------------------------------------------------------------------------------------
def random_masks(g, M, H, W):
    """[M, H, W] uint8: ellipses, boxes, rings (centre of mass in the hole), hollow boxes,
    speckle, empty and full masks, often cut by the image border."""
    if M == 0:
        return torch.zeros(0, H, W, dtype=torch.uint8)
    yy = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xx = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    u = torch.rand(M, 6, generator=g)
    cy = ((u[:, 0] * 1.3 - 0.15) * H).view(M, 1, 1)  # centres past the border: cut masks
    cx = ((u[:, 1] * 1.3 - 0.15) * W).view(M, 1, 1)
    ry = ((u[:, 2] ** 2 * 0.6 + 0.01) * H).view(M, 1, 1)
    rx = ((u[:, 3] ** 2 * 0.6 + 0.01) * W).view(M, 1, 1)
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    r2 = dy**2 + dx**2
    inner = (dy.abs() <= 1) & (dx.abs() <= 1)
    shapes = torch.stack(
        [
            r2 <= 1,  # ellipse
            inner,  # box
            (r2 <= 1) & (r2 >= 0.36),  # ring
            inner & ~((dy.abs() <= 0.6) & (dx.abs() <= 0.6)),  # hollow box
            inner & (torch.rand(M, H, W, generator=g) < 0.3),  # speckle
            torch.zeros(M, H, W, dtype=torch.bool),  # empty
            torch.ones(M, H, W, dtype=torch.bool),  # whole image
            (r2 <= 1) & (torch.rand(M, H, W, generator=g) < 0.9),  # ragged ellipse
        ]
    )
    weights = torch.tensor([5, 4, 3, 2, 1, 1, 0.3, 1])
    kind = torch.multinomial(weights, M, replacement=True, generator=g)
    return shapes[kind, torch.arange(M)].to(torch.uint8)


def random_boxes(g, masks):
    """None (tight boxes from the masks), or jittered float boxes of either float dtype."""
    choice = int(torch.randint(0, 3, (1,), generator=g))
    if choice == 0:
        return None
    M, H, W = masks.shape
    x1 = torch.rand(M, generator=g, dtype=torch.float64) * W
    y1 = torch.rand(M, generator=g, dtype=torch.float64) * H
    w = torch.rand(M, generator=g, dtype=torch.float64) ** 2 * W
    h = torch.rand(M, generator=g, dtype=torch.float64) ** 2 * H
    if M:
        w[0] = 0.0  # a zero-size box: scale 0
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    return boxes.float() if choice == 1 else boxes


def two_box_scene():
    """Two boxes on a 32x32 image, their labels and boxes, and a two-level
    center_region_assign config: (masks uint8 [2, 32, 32], labels, boxes, cfg)."""
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 2:10, 3:12] = 1
    masks[1, 10:30, 5:31] = 1
    cfg = dict(pad_shape=(32, 32), num_grids=[4, 3], scale_ranges=[(1, 16), (8, 64)], num_classes=2, mask_stride=4)
    return masks, torch.tensor([0, 1]), torch.tensor([[3.0, 2, 12, 10], [5, 10, 31, 30]]), cfg


# --------------------------------------------------------------------------------------
# The overfit scene (test_overfit.py, test_amp.py)
# --------------------------------------------------------------------------------------
def overfit_scene():
    """A 128x128 image with a circle and two rectangles in three colours: (image, masks, labels)."""
    h = w = 128
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, h, w, generator=g) * 0.2 + 0.4
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = torch.stack([
        (yy - 40) ** 2 + (xx - 40) ** 2 < 22**2,  # circle
        (yy >= 70) & (yy < 118) & (xx >= 60) & (xx < 120),  # rectangle touching no border
        (yy >= 8) & (yy < 44) & (xx >= 78) & (xx < 120),  # rectangle
    ]).to(torch.uint8)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.1, 0.2, 0.9]])
    for m, c in zip(masks.bool(), colours):
        img[:, m] = c[:, None]
    return img, masks, torch.tensor([0, 1, 2])


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Running statistics and affine parameters of every BatchNorm drawn at random (a
    fresh backbone has mean 0, variance 1, weight 1, bias 0: folding it would be exact)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def train_on_overfit_scene(iters: int, config: str = "solov2_light_r18_fpn", batchnorm_seed=None):
    """``config`` (small grids) trained ``iters`` SGD steps on :func:`overfit_scene`;
    returns the model (in train mode) and the loss history. ``batchnorm_seed``: start from
    :func:`randomize_batchnorm` statistics."""
    img, masks, labels = overfit_scene()
    torch.manual_seed(0)
    model = solo_fast.SOLO(config, num_classes=3, min_size=128, max_size=128, flip_prob=0.0,
                           num_grids=(12, 10, 8, 6, 4))
    if batchnorm_seed is not None:
        randomize_batchnorm(model, batchnorm_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr, warmup = 0.003, 20
    opt = torch.optim.SGD(params, lr=base_lr, momentum=0.9)
    model.train()
    history = []
    for it in range(iters):
        # Linear warm-up from lr/3, as the published schedules; a from-scratch backbone
        # collapses some masks to 0 at full lr from the first step.
        for group in opt.param_groups:
            group["lr"] = base_lr * min(1.0, (1 + 2 * it / warmup) / 3)
        losses = model([img], [{"masks": masks, "labels": labels}])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 35)
        opt.step()
        history.append(float(loss))
    return model, history


def match_detections(ref, other):
    """Greedy, in ``ref``'s score order: each detection of ``ref`` (a SOLOResult) to the
    unmatched one of ``other`` with the same label and the highest mask IoU. Returns
    {i: (j, iou)}."""
    pairs, used = {}, set()
    for i in range(len(ref)):
        best, best_iou = None, -1.0
        for j in range(len(other)):
            if j in used or int(other.labels[j]) != int(ref.labels[i]):
                continue
            inter = float((ref.masks[i] & other.masks[j]).sum())
            union = float((ref.masks[i] | other.masks[j]).sum())
            iou = inter / union if union else 1.0
            if iou > best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            pairs[i] = (best, best_iou)
    return pairs


def assert_fp32_contract(ref, fast, stride: int = 4):
    """The fp32 fast path's contract (issue 16): the same number of detections and labels,
    each matched (by label and mask) detection's score within 1e-4 and mask IoU >= 0.999.

    At test sizes a mask can have fewer than 1000 pixels, where one flipped pixel already
    takes IoU below 0.999, and a pixel whose soft value is within fp32 rounding of
    mask_thr flips under any other summation order: such a mask may differ in one pixel
    (measured: 1-2 masks of 100 on random SOLOv2 weights, none on trained ones).

    The same flip moves scores. A stride-4 mask of ``a`` pixels that gains or loses one
    changes its maskness by at most 1/a relative, and the Matrix NMS decay it causes by
    about as much. At 800x1333 that is ~1e-5; on a 96x128 test image, where ``a`` is
    ~200, it is ~5e-3. Every detection that uses the cell gets the change (one cell, many
    classes). So a score may differ by up to two such flips, ``2 * score / a``, with ``a``
    the mask's area over stride**2 (inputs at scale 1), and at least 64. At most a tenth of
    the detections (at least one) may use that allowance, and the mean difference over
    all of them must still be within 1e-4: a path that is wrong rather than differently
    rounded moves every score."""
    assert len(fast) == len(ref), (len(fast), len(ref))
    assert sorted(fast.labels.tolist()) == sorted(ref.labels.tolist())
    pairs = match_detections(ref, fast)
    assert len(pairs) == len(ref)
    diffs = []
    for i, (j, iou) in pairs.items():
        s = float(ref.scores[i])
        d = abs(float(fast.scores[j]) - s)
        a = max(64.0, float(ref.masks[i].sum()) / stride**2)
        assert d <= max(1e-4, 2 * s / a), (i, s, float(fast.scores[j]), a)
        assert iou >= 0.999 or int((ref.masks[i] ^ fast.masks[j]).sum()) <= 1, (i, iou)
        diffs.append(d)
    assert sum(d > 1e-4 for d in diffs) <= max(1, len(diffs) // 10), diffs
    assert not diffs or sum(diffs) / len(diffs) <= 1e-4, sum(diffs) / len(diffs)


def assert_low_precision_agrees(r32, rlow):
    """bf16/fp16 against fp32 on a trained model: the same detections scoring >= 0.3 (by
    label), matched masks with IoU >= 0.98 and >= 99 % equal pixels, scores within 0.02.
    Returns the equal-pixel fractions."""
    confident = [i for i in range(len(r32)) if float(r32.scores[i]) >= 0.3]
    assert confident, "the briefly trained model should find the objects"
    assert len([j for j in range(len(rlow)) if float(rlow.scores[j]) >= 0.3]) == len(confident)
    pairs = match_detections(r32, rlow)
    assert all(i in pairs for i in confident)
    agree = [float((r32.masks[i] == rlow.masks[j]).float().mean()) for i, (j, _) in pairs.items()]
    assert min(agree) >= 0.99, agree
    for i in confident:
        j, iou = pairs[i]
        assert iou >= 0.98, (i, iou)
        torch.testing.assert_close(rlow.scores[j], r32.scores[i], atol=0.02, rtol=0)
    return agree


# --------------------------------------------------------------------------------------
# Synthetic checkpoints (test_from_mmdet.py, test_dcn_models.py): rows of
# (solo_fast / mmdetection key, original SOLO repository key, shape)
# --------------------------------------------------------------------------------------
def convmodule_rows(mm, orig, cin, cout, k=3, offset_channels=0):
    """A ConvModule with GroupNorm: conv without bias (with ``offset_channels``: a
    deformable conv and its ``conv_offset``), then gn."""
    rows = [(f"{mm}.conv.weight", f"{orig}.conv.weight", (cout, cin, k, k))]
    if offset_channels:
        rows += conv_rows(f"{mm}.conv.conv_offset", f"{orig}.conv.conv_offset", cin, offset_channels, k)
    return rows + [(f"{mm}.gn.weight", f"{orig}.gn.weight", (cout,)), (f"{mm}.gn.bias", f"{orig}.gn.bias", (cout,))]


def conv_rows(mm, orig, cin, cout, k):
    return [(f"{mm}.weight", f"{orig}.weight", (cout, cin, k, k)), (f"{mm}.bias", f"{orig}.bias", (cout,))]


def checkpoint_tensors(rows, seed=1, std=0.05):
    """One random tensor per row (the same for both formats)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for mm, _, shape in rows:
        if mm.endswith("num_batches_tracked"):
            out[mm] = torch.tensor(1000, dtype=torch.long)
        elif mm.endswith("running_var"):
            out[mm] = torch.rand(shape, generator=g) + 0.5
        else:
            out[mm] = torch.randn(shape, generator=g) * std
    return out


# --------------------------------------------------------------------------------------
# Tiny COCO-style shapes data and model (test_engine.py and its torchrun script)
# --------------------------------------------------------------------------------------
TINY_SIZE = 64
TINY_MODEL_KW = dict(num_grids=(6, 5, 4, 3, 2), min_size=TINY_SIZE, max_size=TINY_SIZE)
TINY_CAT_IDS = [3, 7, 11]  # not 0..C-1, so the contiguous -> original mapping is exercised
TINY_TRAIN_KW = dict(batch_size=2, lr=0.002, warmup_iters=2, milestones=(1,), log_every=1, seed=0)


def tiny_scenes(n, seed=0):
    """n (HWC uint8 image, masks [M, H, W] uint8, labels [M]) scenes with at least one object."""
    out, s = [], seed
    while len(out) < n:
        img, masks, labels = draw_scene(TINY_SIZE, TINY_SIZE, num_objects=3, seed=s)
        s += 1
        if len(labels):
            out.append((img, masks, labels))
    return out


def tiny_coco_dict(items, file_names=None):
    from pycocotools import mask as mask_utils

    images, anns = [], []
    for i, (img, masks, labels) in enumerate(items):
        images.append({"id": i + 1, "width": TINY_SIZE, "height": TINY_SIZE,
                       "file_name": file_names[i] if file_names else f"{i:03d}.png"})
        for m, lab in zip(masks, labels):
            rle = mask_utils.encode(np.asfortranarray(m))
            box = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            # annotation ids from 1: COCOeval treats a matched id of 0 as "unmatched"
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": TINY_CAT_IDS[int(lab)],
                         "segmentation": rle, "area": float(m.sum()), "bbox": box, "iscrowd": 0})
    cats = [{"id": c, "name": n} for c, n in zip(TINY_CAT_IDS, SHAPES)]
    return {"images": images, "annotations": anns, "categories": cats}


class TinyShapes(torch.utils.data.Dataset):
    """Stand-in with CocoDataset's interface: (CHW float image, {"masks", "labels", "image_id",
    "orig_size"}), ``cat_ids``, ``class_names``, ``coco``."""

    def __init__(self, n, seed=0):
        from pycocotools.coco import COCO

        self.items = tiny_scenes(n, seed)
        self.coco = COCO()
        self.coco.dataset = tiny_coco_dict(self.items)
        self.coco.createIndex()
        self.cat_ids = list(TINY_CAT_IDS)
        self.class_names = list(SHAPES)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, masks, labels = self.items[i]
        return (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255,
                {"masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels), "image_id": i + 1,
                 "orig_size": (TINY_SIZE, TINY_SIZE)})


def ground_truth_predict(dataset, score=1.0):
    """A stand-in for ``model.predict`` that answers each image with its ground truth."""

    def predict(images, batch_size=2, **kwargs):
        out = []
        for img in images:
            idx = next(i for i in range(len(dataset)) if torch.equal(dataset[i][0], img))
            t = dataset[idx][1]
            masks = t["masks"].bool()
            n = masks.shape[0]
            out.append(solo_fast.SOLOResult(masks, torch.full((n,), score), t["labels"],
                                            solo_fast.results.masks_to_boxes(masks)))
        return out

    return predict


def tiny_model(**kw):
    torch.manual_seed(0)
    return solo_fast.SOLO("solov2_light_r18_fpn", num_classes=len(SHAPES), **{**TINY_MODEL_KW, **kw})
