"""COCO mask evaluation: predictions (RLE) from every rank, then ``COCOeval(..., "segm")`` on rank 0."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._checks import is_int, python_scalar
from .._outputs import atomic_write, output_file
from ..data import collate
from ..data.coco import evaluable_ground_truth
from . import distributed as D

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def unwrap(model):
    """The SOLO model inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def _check_dataset(dataset) -> None:
    for attr in ("coco", "cat_ids"):
        if not hasattr(dataset, attr):
            raise ValueError(f"dataset: expected a COCO dataset with a {attr!r} attribute "
                             f"(solo_fast.data.CocoDataset), got {type(dataset).__name__}")


def coco_eval(coco_gt, predictions: List[dict], image_ids: Optional[Sequence[int]] = None,
              verbose: bool = True, *, _cleaned: Optional[Tuple[object, int, int]] = None) -> Dict[str, float]:
    """The 12 ``COCOeval`` segm stats of ``predictions`` (COCO result dicts with RLE
    ``segmentation``) against ``coco_gt``; no predictions at all gives AP 0, not an error.

    Ground-truth annotations with no polygon of 3 or more points (which ``CocoDataset``
    skips in training, and on which pycocotools fails) are left out, with a warning:
    :func:`solo_fast.data.coco.evaluable_ground_truth` (``_cleaned``: its result for
    ``coco_gt``, where :func:`evaluate` has it from the dataset's cache)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt, dropped, trimmed = _cleaned if _cleaned is not None else evaluable_ground_truth(coco_gt)
    if dropped or trimmed:
        warnings.warn(f"ground truth: {dropped} annotation(s) with no polygon of 3 or more points left out of the "
                      f"evaluation, {trimmed} evaluated without their polygons of fewer than 3 points "
                      "(CocoDataset skips the same in training)", stacklevel=2)

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        if predictions:
            coco_dt = coco_gt.loadRes(list(predictions))
        else:  # loadRes indexes the first result; an empty result set is a valid (all-miss) answer
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                               "categories": list(coco_gt.dataset.get("categories", [])), "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "segm")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def _evaluable_ground_truth(dataset) -> Tuple[object, int, int]:
    """:func:`evaluable_ground_truth` of ``dataset.coco``, kept on the dataset for as long as
    it holds that ``coco`` object: training validates one dataset again and again."""
    cached = getattr(dataset, "_evaluable_gt", None)
    if cached is not None and cached[0] is dataset.coco:
        return cached[1]
    cleaned = evaluable_ground_truth(dataset.coco)
    with contextlib.suppress(AttributeError):  # a dataset that takes no attribute is cleaned every time
        dataset._evaluable_gt = (dataset.coco, cleaned)
    return cleaned


def evaluate(model, dataset, *, batch_size: int = 2, out_json: Optional[str] = None, num_workers: int = 0,
             verbose: bool = True, progress: bool = True, **predict_kwargs) -> Dict[str, float]:
    """COCO segm stats (``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10``,
    ``AR100``, ``ARs``, ``ARm``, ``ARl``) of ``model`` on ``dataset`` (a
    :class:`solo_fast.data.CocoDataset`).

    Predictions come from ``model.predict`` (``predict_kwargs``: score_thr, mask_thr, ...),
    batched. Under ``torch.distributed`` each rank predicts every world_size-th image; the
    predictions are gathered before rank 0 runs COCOeval, prints the AP table and writes
    ``out_json`` (the COCO results, RLE) if given. Every rank returns the same stats.
    """
    # numpy integers and 0-d integer tensors as Python ints (as SOLO.predict takes them); bools,
    # floats and 1-element tensors are still refused below.
    batch_size, num_workers = python_scalar(batch_size), python_scalar(num_workers)
    if not is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers: expected a non-negative int, got {num_workers!r}")
    _check_dataset(dataset)
    if out_json:  # before the work: an unwritable path would lose every prediction at the end
        output_file(out_json, "out_json")
    if len(dataset) == 0:
        raise ValueError("dataset: has no images to evaluate")
    net = unwrap(model)
    cat_ids = list(dataset.cat_ids)
    if hasattr(net, "num_classes") and net.num_classes != len(cat_ids):
        raise ValueError(f"model: predicts {net.num_classes} classes, but the dataset has {len(cat_ids)} categories")
    rank, world = D.rank(), D.world_size()
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, collate_fn=collate)
    predictions: List[dict] = []
    image_ids: List[int] = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="eval", unit="img", dynamic_ncols=True, leave=False,
                   disable=None)  # off when stderr is not a terminal
    for images, targets in loader:
        results = net.predict(images, batch_size=batch_size, **predict_kwargs)
        for target, result in zip(targets, results):
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            predictions.extend(result.to_coco(image_id, cat_ids))
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    predictions = D.all_gather_list(predictions)
    image_ids = D.all_gather_list(image_ids)
    stats = None
    if rank == 0:
        if out_json:  # before COCOeval, so that the predictions survive anything it raises
            with atomic_write(out_json, "out_json") as tmp, open(tmp, "w") as f:
                json.dump(predictions, f)
        if verbose:
            print(f"evaluating {len(predictions)} predicted masks on {len(set(image_ids))} images")
        stats = coco_eval(dataset.coco, predictions, sorted(set(image_ids)), verbose=verbose,
                          _cleaned=_evaluable_ground_truth(dataset))  # cleaned once per dataset
    return D.broadcast_object(stats)


def format_stats(stats: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in stats.items())
