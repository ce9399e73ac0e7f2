"""Command line: ``solo-fast train | eval | predict | demo | export`` (also ``python -m solo_fast ...``)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, Optional

from ._cpu import keep_freed_memory
from ._outputs import atomic_write, output_dir, output_file

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_TRAIN_CONFIG = "solov2_light_r18_fpn"
PRECISION_HELP = ("bf16: the network under bf16 autocast, where the CPU has AMX or AVX512-BF16 (or on a GPU); "
                  "masks agree with fp32 on >= 99%% of pixels")


def _model(args):
    import solo_fast

    if args.checkpoint:
        return _load_checkpoint(args.checkpoint)
    return solo_fast.SOLO(args.config, num_classes=args.num_classes)


def cmd_demo(args) -> int:
    from .demo import QUICK, RECIPE, run_demo

    recipe = QUICK if args.quick else RECIPE
    if args.epochs is not None:
        if args.epochs <= 0:
            raise ValueError(f"--epochs: expected a positive number of epochs, got {args.epochs}")
        from dataclasses import replace

        recipe = replace(recipe, epochs=args.epochs, milestones=tuple(m for m in recipe.milestones if m < args.epochs))
    output_dir(args.out, "--out")
    run_demo(args.out, recipe=recipe)
    return 0


# ---------------------------------------------------------------- flags in messages
@contextlib.contextmanager
def _flags(**names: str):
    """Library errors name the argument (``score_thr: expected ...``); inside this block a
    ValueError that starts with one of ``names`` names its flag instead, for a call whose
    argument comes from a flag of another name (``draw(score_thr=args.draw_thr)``). main()
    does the same for every flag whose name is the argument's (``--score-thr``)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(_name_the_flag(str(exc), names)) from None


def _name_the_flag(message: str, names: Dict[str, str]) -> str:
    arg, sep, rest = message.partition(":")
    return names[arg] + sep + rest if sep and arg in names else message


def _flag_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """``{dest: "--flag"}`` of a sub-command's options (``score_thr``: ``--score-thr``)."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def _typed_flags(argv: Optional[List[str]]) -> set:
    """The flags (their long names, ``--score-thr``) that ``argv`` gives, in any spelling
    argparse takes (``--score-thr=0.5``, an abbreviation ``--score 0.5``): ``argv`` parsed
    again with every option's default suppressed, so that only the options it names are set.
    (Called after a parse of the same ``argv`` succeeded, so this one does too.)"""
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.values()
    for sub in subs:
        for action in sub._actions:
            if action.option_strings:
                action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    return {flag for sub in subs for dest, flag in _flag_names(sub).items() if dest in given}


def _names_of_typed_flags(names: Dict[str, str], typed: set) -> Dict[str, str]:
    """The entries of ``names`` (``{argument: "--flag"}``) whose flag the user typed.

    Why only those: a library error names the argument it checked (``score_thr: ...``), but
    the value checked need not come from the flag of that name. A sub-command passes a
    flag's default only where the default is valid, so an error about an argument whose flag
    was not typed is about a value from elsewhere (a checkpoint's saved config, a recipe, the
    config's own defaults) and keeps the library's name rather than blaming a flag the user
    never gave. An entry naming several flags (``"--height, --width"``) counts when one was."""
    return {arg: flag for arg, flag in names.items() if any(f.strip() in typed for f in flag.split(","))}


# Library arguments that a sub-command's flag of another name sets (the rest share the name).
_RENAMED = {"train": {"out_dir": "--out", "norm_eval": "--live-bn"},
            "export": {"input_size": "--height, --width"}}


# ---------------------------------------------------------------- predict
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
    # A file given twice (a folder and a file in it) is predicted once.
    unique: Dict[str, str] = {}
    for p in paths:
        unique.setdefault(os.path.abspath(p), p)
    return list(unique.values())


def _relative_names(paths: List[str]) -> List[str]:
    """Each path relative to the folder that holds them all: unique (``a/x.jpg``, ``a/x.png``,
    ``b/x.jpg``), and the bare file name when they share one folder."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [os.path.relpath(p, root) for p in absolute]


def cmd_predict(args) -> int:
    from tqdm import tqdm

    from .modeling.images import decode_file

    paths = _collect_images(args.inputs)
    output_dir(args.out, "--out")
    keep_freed_memory()  # the CLI owns its process (README "CPU performance")
    model = _model(args)
    coco, failed = [], []
    # image_id: the file's position in the input list, so ids stay unique and fixed when a file fails.
    todo = list(zip(paths, _relative_names(paths)))
    for image_id, (path, name) in enumerate(tqdm(todo, desc="predict", unit="img")):
        try:
            image = decode_file(path, "inputs")  # what predict(path) decodes, so a bad file is told apart
        except (ValueError, FileNotFoundError) as exc:
            # One unreadable file must not cost the others' results: skip it, say so, fail at the end.
            tqdm.write(f"solo-fast predict: warning: {exc}; skipped", file=sys.stderr)
            failed.append(path)
            continue
        r = model.predict(image, score_thr=args.score_thr, precision=args.precision)[0]
        # The input's path under --out, extension kept: a/x.jpg -> OUT/a/x.jpg.png.
        overlay = os.path.join(args.out, name + ".png")
        os.makedirs(os.path.dirname(overlay), exist_ok=True)
        with _flags(score_thr="--draw-thr"):
            r.draw(score_thr=args.draw_thr).save(overlay)
        coco += [dict(d, file_name=name) for d in r.to_coco(image_id)]
    with atomic_write(os.path.join(args.out, "results.json"), "--out") as tmp, open(tmp, "w") as f:
        json.dump(coco, f)
    print(f"wrote {len(paths) - len(failed)} overlays and results.json to {args.out}")
    if failed:
        print(f"solo-fast predict: error: {len(failed)} of {len(paths)} images could not be read (warnings above): "
              + ", ".join(repr(p) for p in failed), file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from solo_fast.export import export_onnx, export_program

    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v <= 0:
            raise ValueError(f"{flag}: expected a positive number of pixels, got {v}")
    if args.format in ("onnx", "both"):
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError(f"--format {args.format}: ONNX export needs onnx and onnxscript "
                             "(pip install 'solo_fast[export]'), or use --format torch") from None
    output_dir(args.out, "--out")
    model = _model(args)
    settings = {k: v for k, v in (("score_thr", args.score_thr), ("max_per_img", args.max_per_img)) if v is not None}
    program = export_program(model, (args.height, args.width), topk=args.topk, **settings)
    written = []
    if args.format in ("torch", "both"):
        import torch

        path = os.path.join(args.out, "model.pt2")
        torch.export.save(program, path)
        written.append(path)
    if args.format in ("onnx", "both"):
        written.append(export_onnx(program, os.path.join(args.out, "model.onnx")))
    print(f"{model.config_name} at {args.height}x{args.width}: input image float32 [1, 3, {args.height}, "
          f"{args.width}] in [0, 1]; outputs masks, scores, labels, num_valid")
    print("wrote " + ", ".join(written))
    return 0


# ---------------------------------------------------------------- train / eval
def _need_file(path: str, flag: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no {what} at {path!r}")


def _need_dir(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag}: no image folder at {path!r}")


def _worker_error(exc: Exception) -> Exception:
    """A DataLoader worker re-raises the dataset's error with the worker's traceback in its
    message; keep only the last line (``ValueError: what went wrong``)."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        return type(exc)(last.split(": ", 1)[1] if ": " in last else last)
    return exc


def _need_checkpoint(path: str) -> None:
    """A ``.safetensors`` file or a folder holding one as ``model.safetensors``: what
    ``SOLO.from_pretrained`` loads (``save_pretrained`` writes either)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"--checkpoint: no checkpoint at {path!r}: a folder needs the model.safetensors "
                                    "that SOLO.save_pretrained writes")
    else:
        _need_file(path, "--checkpoint", "checkpoint")


def _load_checkpoint(path: str):
    import solo_fast

    _need_checkpoint(path)
    try:
        return solo_fast.SOLO.from_pretrained(path)
    except ValueError as exc:
        msg = _name_the_flag(str(exc), {"path": "--checkpoint"})  # a torn or foreign file is `path`
        # Else e.g. a setting of the checkpoint's saved config (``score_thr: expected ...``): the
        # file is at fault, not a flag of that name (which main() would blame if it was typed).
        raise ValueError(msg if msg != str(exc) else f"--checkpoint: {path!r} is refused: {exc}") from None


def cmd_train(args) -> int:
    import solo_fast
    from solo_fast.engine import train
    from solo_fast.engine.train import STATE_FILE
    from solo_fast.modeling.configs import get_config

    _need_file(args.train_ann, "--train-ann", "annotation file")
    _need_dir(args.train_images, "--train-images")
    if (args.val_ann is None) != (args.val_images is None):
        raise ValueError("--val-ann, --val-images: give both (or neither)")
    if args.val_ann is not None:
        _need_file(args.val_ann, "--val-ann", "annotation file")
        _need_dir(args.val_images, "--val-images")
    if args.init is not None and args.backbone_weights is not None:
        raise ValueError(f"--init, --backbone-weights: expected one of them (--init loads a whole detector, its "
                         f"backbone included), got --init {args.init!r} and --backbone-weights {args.backbone_weights!r}")
    if args.init is not None:
        _need_file(args.init, "--init", "checkpoint")
    if args.backbone_weights is not None:
        _need_file(args.backbone_weights, "--backbone-weights", "weights file")
    if args.epochs is not None and args.max_iters is not None:
        raise ValueError(f"--epochs, --max-iters: expected one of them (the schedule's length), got --epochs "
                         f"{args.epochs} and --max-iters {args.max_iters}")
    overrides = {}
    for key in ("min_size", "train_min_size", "flip_prob", "max_size", "num_grids", "frozen_stages"):
        value = getattr(args, key)
        if value is not None:  # the config's own value otherwise
            overrides[key] = tuple(value) if isinstance(value, list) else value
    if args.live_bn:
        overrides["norm_eval"] = False
    # With --init and no --config, the checkpoint says which config it is for.
    config = args.config if args.config is not None or args.init is not None else DEFAULT_TRAIN_CONFIG
    if config is not None:
        get_config(config, **overrides)  # an unknown name fails here, before any data is read
    if args.resume and not os.path.isfile(os.path.join(args.out, STATE_FILE)):
        raise FileNotFoundError(f"--resume: no {STATE_FILE} in {args.out!r} to resume from")
    output_dir(args.out, "--out")  # before the data are read and the model built
    from solo_fast.data import CocoDataset

    dataset = CocoDataset(args.train_ann, args.train_images)
    val = CocoDataset(args.val_ann, args.val_images) if args.val_ann is not None else None
    if val is not None and list(val.cat_ids) != list(dataset.cat_ids):
        raise ValueError(f"--val-ann: its categories {list(val.cat_ids)} differ from the training set's "
                         f"{list(dataset.cat_ids)}")
    if args.init is not None:
        model = solo_fast.SOLO.finetune_from(args.init, len(dataset.cat_ids), config=config,
                                             class_names=list(dataset.class_names),
                                             category_ids=list(dataset.cat_ids), **overrides)
    else:
        model = solo_fast.SOLO(config, num_classes=len(dataset.cat_ids), backbone_weights=args.backbone_weights,
                               **overrides)
    model.class_names, model.category_ids = list(dataset.class_names), list(dataset.cat_ids)
    try:
        # Options left None are the recipe's (solo_fast.engine.train: published with weights,
        # from scratch without), as in the Python API.
        train(model, dataset, out_dir=args.out, epochs=args.epochs, max_iters=args.max_iters,
              save_every=args.save_every, batch_size=args.batch_size, lr=args.lr, warmup_iters=args.warmup_iters,
              warmup_ratio=args.warmup_ratio,
              milestones=tuple(args.milestones) if args.milestones is not None else None, gamma=args.gamma,
              momentum=args.momentum, weight_decay=args.weight_decay,
              grad_clip=None if args.grad_clip == 0 else args.grad_clip,  # NaN and < 0 reach training's check
              num_workers=args.num_workers,
              log_every=args.log_every, resume=True if args.resume else None, val_dataset=val,
              eval_every=args.eval_every, seed=args.seed, amp=not args.no_amp, optimizer=args.optimizer)
    except (ValueError, FileNotFoundError) as exc:
        raise _worker_error(exc) from None
    except FloatingPointError as exc:  # a diverged loss: the message says what to change
        raise ValueError(str(exc)) from None
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"checkpoint: {os.path.join(args.out, 'model.safetensors')}; log: {os.path.join(args.out, 'train.log')}")
    return 0


def cmd_eval(args) -> int:
    from solo_fast.engine import distributed as dist_utils
    from solo_fast.engine import evaluate
    from solo_fast.engine.evaluate import format_stats

    _need_file(args.ann, "--ann", "annotation file")
    _need_dir(args.images, "--images")
    if args.out_json:
        output_file(args.out_json, "--out-json")
    model = _load_checkpoint(args.checkpoint)
    from solo_fast.data import CocoDataset

    dataset = CocoDataset(args.ann, args.images)
    if model.num_classes != len(dataset.cat_ids):
        raise ValueError(f"--checkpoint: {args.checkpoint!r} is a {model.config_name} model for "
                         f"{model.num_classes} classes, but {args.ann!r} has {len(dataset.cat_ids)} categories")
    names = list(getattr(dataset, "class_names", []) or [])
    if model.class_names and names and list(model.class_names) != names:
        print(f"warning: the checkpoint's classes {model.class_names} differ from the dataset's {names}; "
              "labels are matched by position", file=sys.stderr)
    elif model.category_ids and list(model.category_ids) != list(dataset.cat_ids):
        print(f"warning: the checkpoint's category ids {model.category_ids} differ from the dataset's "
              f"{list(dataset.cat_ids)}; labels are matched by position", file=sys.stderr)
    dev, created = dist_utils.setup()
    main_rank = dist_utils.is_main()
    ok = False
    try:
        model.to(dev)
        keep_freed_memory()  # the CLI owns its process (README "CPU performance")
        kw = {"score_thr": args.score_thr} if args.score_thr is not None else {}
        kw["precision"] = args.precision
        stats = evaluate(model, dataset, batch_size=args.batch_size, out_json=args.out_json,
                         num_workers=args.num_workers, verbose=main_rank, **kw)
        ok = True
    except (ValueError, FileNotFoundError) as exc:
        raise _worker_error(exc) from None
    finally:
        dist_utils.cleanup(created, ok)
    if main_rank:
        print(f"mask (segm) {format_stats(stats)}")
        if args.out_json:
            print(f"wrote {args.out_json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="solo-fast", description="SOLO-family instance segmentation")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on a COCO-format dataset (also under torchrun --nproc-per-node N)",
                       description="Options left unset come from a recipe: the published one (frozen stem + layer1, "
                                   "frozen BatchNorm statistics, SGD, lr 0.01 per 16 images) when the model starts "
                                   "from --backbone-weights or --init, the from-scratch one (nothing frozen, live "
                                   "BatchNorm, AdamW lr 3e-4) otherwise; train.log's first line says which and why.")
    t.add_argument("--config", default=None,
                   help=f"a named config, e.g. solov2_r50_fpn (default {DEFAULT_TRAIN_CONFIG}; with --init: the "
                        "checkpoint's)")
    t.add_argument("--backbone-weights", metavar="PATH",
                   help="ImageNet ResNet weights for the backbone: torchvision's resnet18/34/50/101-*.pth, an "
                        "mmpretrain/mmdetection checkpoint (backbone.* keys) or .safetensors")
    t.add_argument("--init", metavar="CHECKPOINT",
                   help="fine-tune from a detector checkpoint (solo_fast .safetensors, mmdetection or original-SOLO "
                        ".pth) with this dataset's classes: tensors that fit are loaded, the class conv keeps the "
                        "rows of classes whose names match and starts the others at the focal prior")
    t.add_argument("--train-ann", required=True, help="COCO instances json of the training set")
    t.add_argument("--train-images", required=True, help="folder of the training images")
    t.add_argument("--val-ann", help="COCO json of a validation set (evaluated with COCOeval)")
    t.add_argument("--val-images", help="folder of the validation images")
    t.add_argument("--out", required=True, help="output folder: model.safetensors, last_state.pt, train.log")
    t.add_argument("--epochs", type=int, default=None, help="length of the schedule in epochs (default 12)")
    t.add_argument("--max-iters", type=int, default=None,
                   help="length of the schedule in iterations instead (then --milestones, --save-every and "
                        "--eval-every count iterations)")
    t.add_argument("--save-every", type=int, default=None,
                   help="checkpoint interval in epochs, or iterations with --max-iters (default: every epoch, or "
                        "every 1000 iterations); always at the end")
    t.add_argument("--batch-size", type=int, default=2, help="images per step and process")
    t.add_argument("--lr", type=float, default=None,
                   help="default: SGD 0.01 x total batch / 16, AdamW 3e-4")
    t.add_argument("--warmup-iters", type=int, default=None, help="default: 500, at most a fifth of the run")
    t.add_argument("--warmup-ratio", type=float, default=None,
                   help="the warm-up starts at lr x this (default: SGD 1/3, AdamW 0.03)")
    t.add_argument("--milestones", type=int, nargs="*", default=None, metavar="N",
                   help="epochs (iterations with --max-iters) where the lr drops (default: at 8/12 and 11/12 of "
                        "the schedule, 8 and 11 of 12 epochs)")
    t.add_argument("--gamma", type=float, default=0.1)
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="default: sgd with pretrained weights (as published), adamw without")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=None, help="default: SGD 1e-4, AdamW 0.05")
    t.add_argument("--grad-clip", type=float, default=35.0, help="max gradient norm (0: off)")
    t.add_argument("--min-size", type=int, metavar="SIZE",
                   help="short side at test time (and in training, unless --train-min-size is given)")
    t.add_argument("--train-min-size", type=int, nargs="+", metavar="SIZE",
                   help="short sides that training draws from, one per image (default: the config's published scales)")
    t.add_argument("--max-size", type=int, help="long side limit")
    t.add_argument("--num-grids", type=int, nargs=5, metavar="S", help="grid size S of each of the 5 levels")
    t.add_argument("--frozen-stages", type=int, default=None,
                   help="backbone stages kept frozen (default: 1, stem + layer1, with pretrained weights; -1, none, "
                        "without; freezing random weights is refused)")
    t.add_argument("--live-bn", action="store_true",
                   help="BatchNorm learns and uses batch statistics (norm_eval off; the default without weights)")
    t.add_argument("--flip-prob", type=float, help="training's horizontal flip probability (default 0.5)")
    t.add_argument("--num-workers", type=int, default=2)
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--eval-every", type=int, default=0,
                   help="epochs (iterations with --max-iters) between evaluations (0: after the last)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last_state.pt")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="COCO mask AP of a checkpoint on a COCO-format dataset")
    e.add_argument("--checkpoint", required=True,
                   help="a .safetensors file written by training or SOLO.save_pretrained, or its folder")
    e.add_argument("--ann", required=True, help="COCO instances json")
    e.add_argument("--images", required=True, help="folder of the images")
    e.add_argument("--out-json", help="write the predictions (COCO results, RLE) here")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--num-workers", type=int, default=2)
    e.add_argument("--score-thr", type=float, default=None, help="default: the model's (0.1)")
    e.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=PRECISION_HELP)
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="the built-in demo: train a small SOLOv2 on synthetic shapes from scratch on "
                                    "the CPU (6-10 minutes on 2 cores), evaluate it and draw its predictions")
    d.add_argument("--out", default="out/demo", help="output folder: data, train/, predictions.png")
    d.add_argument("--quick", action="store_true", help="a one-minute smoke run of the same steps (learns little)")
    d.add_argument("--epochs", type=int, default=None, help="override the recipe's number of epochs")
    d.set_defaults(func=cmd_demo)
    q = sub.add_parser("predict", help="predict masks for images or folders of images")
    q.add_argument("inputs", nargs="+", help="image files and folders (their .png/.jpg/.jpeg/.bmp/.webp files)")
    q.add_argument("--checkpoint",
                   help="a .safetensors file written by SOLO.save_pretrained or training, or its folder")
    q.add_argument("--config", default="solov2_r50_fpn", help="config name when no checkpoint is given")
    q.add_argument("--num-classes", type=int, default=80)
    q.add_argument("--out", default="out/predict",
                   help="output folder: an overlay per image at its path under the inputs' common folder, "
                        "extension kept (a/x.jpg -> OUT/a/x.jpg.png), and results.json")
    q.add_argument("--score-thr", type=float, default=0.1)
    q.add_argument("--draw-thr", type=float, default=0.3)
    q.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=PRECISION_HELP)
    q.set_defaults(func=cmd_predict)
    x = sub.add_parser("export", help="export inference at a fixed input size: torch.export program and/or ONNX")
    x.add_argument("--checkpoint",
                   help="a .safetensors file written by SOLO.save_pretrained or training, or its folder")
    x.add_argument("--config", default="solov2_r50_fpn", help="config name when no checkpoint is given")
    x.add_argument("--num-classes", type=int, default=80)
    x.add_argument("--height", type=int, required=True, help="input image height (fixed in the export)")
    x.add_argument("--width", type=int, required=True, help="input image width (fixed in the export)")
    x.add_argument("--out", default="out/export", help="output folder: model.onnx and/or model.pt2")
    x.add_argument("--format", choices=("onnx", "torch", "both"), default="both")
    x.add_argument("--topk", type=int, default=None, help="(cell, class) pairs whose masks are computed (default: nms_pre)")
    x.add_argument("--score-thr", type=float, default=None, help="default: the model's (0.1)")
    x.add_argument("--max-per-img", type=int, default=None, help="fixed number of outputs (default: 100)")
    x.set_defaults(func=cmd_export)
    for name, parser in sub.choices.items():
        parser.set_defaults(flags={**_flag_names(parser), **_RENAMED.get(name, {})})
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        names = _names_of_typed_flags(args.flags, _typed_flags(argv))  # only flags the user gave
        print(f"solo-fast {args.command}: error: {_name_the_flag(str(exc), names)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
