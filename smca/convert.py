"""Checkpoints of the paper's code and of DETR -> smca checkpoints.

    python -m smca.convert --source smca-detr --input checkpoint.pth --output smca_r50.pth
    smca-convert --source detr --input detr-r50-e632da11.pth --output detr_r50.pth

--source smca-detr reads what gaopengcuhk/SMCA-DETR's main.py saves for its single-scale model
(`--dynamic_scale` type1, type2 or type3); --source detr what facebookresearch/detr's main.py
saves. Such a file is a dict with "model" (the state dict), usually "args" (main.py's
argparse.Namespace) and optimizer state, which is dropped; a bare state dict is taken too. It is
read with torch.load(weights_only=True), allowing argparse.Namespace and nothing else beyond
tensors and plain data, so converting a file runs none of its code.

The settings come from "args" and are checked against the weights' shapes; what the weights
cannot say (nheads, the bandwidth `smooth`) takes main.py's defaults when "args" is absent, and
--nheads, --beta and --num_queries override either. The result is a weights-only smca
checkpoint (smca.checkpoint.save_weights) for `smca.predict --checkpoint`, `smca.train --eval
--resume` and `smca.train --finetune`:
  * smca-detr -> model "smca", focal classifier with the num_classes real classes (the paper's
    class head has one column more, which its sigmoid focal loss always trains as a negative and
    which is dropped), post-processing over query x class as its PostProcess;
  * detr -> model "detr", softmax classifier with DETR's no-object class, DETR's losses and
    matching costs.
Settings smca does not implement (dilation/DC5, learned position embedding, pre-norm, masks, a
backbone other than resnet50/resnet18, dynamic_scale type4, the multi-scale code) are a
ConversionError naming the setting.
"""

import argparse
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import save_weights
from .config import BACKBONES, DYNAMIC_SCALES, Config
from .data.coco import DatasetError, read_categories

__all__ = ["SOURCES", "ConversionError", "read_reference_checkpoint", "reference_config", "convert_state_dict", "convert"]

PROG = "smca-convert"
SOURCES = ("smca-detr", "detr")

# main.py's defaults for what the weights do not show: both repositories', then each one's own
# (the matching class cost: DETR 1, the paper's code 2).
_MAIN_DEFAULTS = dict(nheads=8, smooth=8.0, dropout=0.1, aux_loss=True, pre_norm=False, masks=False, dilation=False,
                      set_cost_bbox=5, set_cost_giou=2, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1)
_SOURCE_DEFAULTS = {"smca-detr": dict(set_cost_class=2), "detr": dict(set_cost_class=1)}
# Renamings, applied in order to every key; the first match wins.
_RENAMES: List[Tuple[str, str]] = [
    (r"^backbone\.0\.body\.conv1\.", "backbone.stem.0."),
    (r"^backbone\.0\.body\.bn1\.", "backbone.stem.1."),
    (r"^backbone\.0\.body\.(layer[1-4])\.", r"backbone.\1."),
    (r"^input_proj\.", "input_proj.0."),
    (r"^transformer\.encoder\.layers\.", "encoder.layers."),
    (r"^transformer\.decoder\.layers\.0\.point1\.", "decoder.reference_point."),
    (r"^transformer\.decoder\.layers\.(\d+)\.multihead_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm4\.", r"decoder.layers.\1.norm_modulation."),
    (r"^transformer\.decoder\.layers\.(\d+)\.point2\.", r"decoder.layers.\1.offsets."),
    (r"^transformer\.decoder\.layers\.(\d+)\.point3\.", r"decoder.layers.\1.scales."),
    (r"^transformer\.decoder\.", "decoder."),
    (r"^(query_embed|class_embed|bbox_embed)\.", r"\1."),
]
# dynamic_scale by the outputs of the scale head point3 (none: type1), for the 8 heads the
# paper's code has wired in.
_SCALE_OUTPUTS = {0: "type1", 8: "type2", 16: "type3", 24: "type4"}


class ConversionError(ValueError):
    """A reference checkpoint that cannot be read, or whose settings smca does not implement."""


# A checkpoint holding other objects can still be converted by whoever trusts it: re-saved
# with what converting reads and nothing else.
_RESAVE = (
    "if you trust the file, re-save what converting reads and convert that: "
    "c = torch.load(FILE, weights_only=False); torch.save({'model': c['model'], 'args': c.get('args')}, 'clean.pth')"
)


def _load_error(path: str, err: Exception) -> ConversionError:
    """The ConversionError of a file torch.load(weights_only=True) refused: its cause in our
    words (torch's message has terminal codes and several paragraphs), and the remedy."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    refused = re.search(r"Unsupported global: GLOBAL (\S+) was not an allowed global", text)
    if refused:
        return ConversionError(
            f"--input {path!r} holds a Python object ({refused.group(1)}) beyond the tensors, plain data and "
            f"argparse.Namespace a checkpoint is read with (reading it would run code from the file); {_RESAVE}"
        )
    return ConversionError(
        f"--input {path!r} cannot be read as a PyTorch checkpoint: it is not one, or it is damaged (cut short "
        f"or corrupted in a copy or download) ({type(err).__name__}); copy or download it again"
    )


def read_reference_checkpoint(path: str) -> Tuple[Dict[str, Tensor], Optional[Dict[str, Any]]]:
    """(state dict, main.py's args as a dict or None) of a checkpoint saved by either repository.

    Raises ConversionError naming the file, the cause and the remedy when it is missing,
    unreadable, holds objects other than tensors, plain data and argparse.Namespace, or has no
    state dict.
    """
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ConversionError(f"--input {path!r} {what}; give the .pth file the reference main.py saved")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  a damaged or foreign file fails in many ways
        raise _load_error(path, err) from err
    if isinstance(checkpoint, dict) and str(checkpoint.get("format", "")).startswith("smca-checkpoint"):
        raise ConversionError(
            f"--input {path!r} is already an smca checkpoint: use it as it is (smca.predict --checkpoint, "
            "smca.train --resume or --finetune)"
        )
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        state, args = checkpoint["model"], checkpoint.get("args")
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
        state, args = checkpoint, None
    else:
        got = (
            f"a dict with keys {sorted(map(str, checkpoint))[:8]}" if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise ConversionError(
            f"--input {path!r} holds {got}; expected what SMCA-DETR's or DETR's main.py saves (a dict with the "
            "state dict under 'model') or a state dict itself: give that file"
        )
    others = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if others:
        raise ConversionError(
            f"--input {path!r}: its 'model' is not a state dict of tensors ({others[:5]} are not tensors); expected "
            "the model's state_dict() as main.py saves it"
        )
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    elif args is not None and not isinstance(args, dict):
        raise ConversionError(
            f"--input {path!r}: 'args' is a {type(args).__name__}, expected main.py's argparse.Namespace; save the "
            "state dict alone (torch.save(checkpoint['model'], 'model.pth')) to convert it with main.py's defaults"
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, args


def _count(state: Dict[str, Tensor], pattern: str) -> int:
    """Number of distinct indices i in keys matching pattern (with one (\\d+) group)."""
    return len({m.group(1) for k in state for m in [re.match(pattern, k)] if m})


def _shape(state: Dict[str, Tensor], key: str) -> Tuple[int, ...]:
    if key not in state:
        raise ConversionError(
            f"not an SMCA-DETR or DETR checkpoint: its state dict has no {key!r}; give a checkpoint that "
            "SMCA-DETR's or DETR's main.py saved"
        )
    return tuple(state[key].shape)


# torchvision ResNets by (bottleneck blocks?, blocks in layer1..layer4).
_RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


def _backbone_from_weights(state: Dict[str, Tensor]) -> str:
    """The torchvision ResNet whose blocks the state dict holds ("unknown" for none of them)."""
    blocks = tuple(_count(state, rf"backbone\.0\.body\.layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    return _RESNETS.get((bottleneck, blocks), "unknown")


def _unsupported(setting: str, value: Any, why: str) -> ConversionError:
    return ConversionError(
        f"{setting} {value!r}: {why}; smca cannot convert this checkpoint (run it with its own repository's code)"
    )


def reference_config(
    state: Dict[str, Tensor], args: Optional[Dict[str, Any]], source: str, overrides: Optional[Dict[str, Any]] = None
) -> Config:
    """The smca Config of a reference model: settings from args (main.py's defaults when absent),
    then overrides, checked against the weights' shapes.

    Raises ConversionError naming a setting smca does not implement or one that disagrees with
    the weights.
    """
    if source not in SOURCES:
        raise ConversionError(f"--source: expected one of {SOURCES}, got {source!r}")
    given = {**_MAIN_DEFAULTS, **_SOURCE_DEFAULTS[source], **(args or {})}
    for setting, value, why in (
        ("dilation", given["dilation"], "dilated C5 (DC5) is not implemented"),
        ("pre_norm", given["pre_norm"], "pre-norm transformer layers are not implemented"),
        ("masks", given["masks"], "the segmentation head is not implemented"),
    ):
        if value:
            raise _unsupported(setting, value, why)
    if given.get("position_embedding", "sine") not in ("sine", "v2"):
        raise _unsupported("position_embedding", given["position_embedding"], "only the sine embedding is implemented")
    if any(k.startswith("backbone.1.") for k in state):
        raise _unsupported("position_embedding", "learned", "only the sine embedding is implemented")
    if any(k.startswith(("bbox_attention.", "mask_head.", "detr.")) for k in state):
        raise _unsupported("masks", True, "the segmentation head is not implemented")
    if "transformer.encoder.norm.weight" in state:
        raise _unsupported("pre_norm", True, "pre-norm transformer layers are not implemented")

    query_count, hidden_dim = _shape(state, "query_embed.weight")
    class_rows = _shape(state, "class_embed.weight")[0]
    backbone = given.get("backbone") or _backbone_from_weights(state)
    if backbone not in BACKBONES:
        raise _unsupported("backbone", backbone, f"the backbones are {BACKBONES}")
    values: Dict[str, Any] = dict(
        backbone=backbone,
        backbone_norm="frozen",
        hidden_dim=hidden_dim,
        nheads=int(given["nheads"]),
        num_queries=query_count,
        enc_layers=_count(state, r"transformer\.encoder\.layers\.(\d+)\."),
        dec_layers=_count(state, r"transformer\.decoder\.layers\.(\d+)\."),
        dim_feedforward=_shape(state, "transformer.encoder.layers.0.linear1.weight")[0],
        dropout=float(given["dropout"]),
        aux_loss=bool(given["aux_loss"]),
        num_classes=class_rows - 1,
    )
    for name in ("lr", "lr_backbone", "weight_decay", "epochs", "lr_drop", "batch_size", "clip_max_norm"):
        if name in given:
            values[name] = given[name]
    for name in ("set_cost_class", "set_cost_bbox", "set_cost_giou", "bbox_loss_coef", "giou_loss_coef"):
        if name in given:
            values[name] = float(given[name])
    if source == "smca-detr":
        if "transformer.decoder.layers.0.point1.layers.0.weight" not in state:
            raise ConversionError(
                "--source smca-detr: the checkpoint has no reference-point head (point1), as DETR's has none: "
                "for a DETR checkpoint give --source detr"
            )
        scale_key = "transformer.decoder.layers.0.point3.weight"
        scale_outputs = state[scale_key].shape[0] if scale_key in state else 0
        inferred = _SCALE_OUTPUTS.get(scale_outputs)
        dynamic_scale = given.get("dynamic_scale", inferred)
        if dynamic_scale == "type4":
            raise _unsupported("dynamic_scale", "type4", "its dx^2 dy^2 term is not in smca's Gaussian")
        if dynamic_scale not in DYNAMIC_SCALES or dynamic_scale != inferred:
            raise ConversionError(
                f"dynamic_scale {dynamic_scale!r} (the checkpoint's args): its scale head (point3) has "
                f"{scale_outputs} outputs, those of {inferred or 'no dynamic_scale of 8 heads'}; the args do not "
                "belong to these weights: save the state dict alone (torch.save(checkpoint['model'], 'model.pth')) "
                "and convert that, which reads dynamic_scale from the weights"
            )
        # The paper's loss_ce weight is fixed at 2 in its code; its PostProcess keeps Nq detections.
        values.update(model="smca", modulation="multi_head", dynamic_scale=dynamic_scale, classifier="focal")
        values.update(beta=float(given["smooth"]), cls_loss_coef=2.0, topk=query_count)
    else:
        if any(".point1." in k or ".point2." in k for k in state):
            raise ConversionError("--source detr: the checkpoint has SMCA's Gaussian heads: use --source smca-detr")
        values.update(model="detr", classifier="softmax", cls_loss_coef=1.0, topk=query_count)
        if "eos_coef" in given:
            values["eos_coef"] = float(given["eos_coef"])
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if values["num_queries"] != query_count:
        raise ConversionError(
            f"--num_queries {values['num_queries']}: the checkpoint holds {query_count} queries (its query "
            "embeddings); leave out --num_queries"
        )
    if source == "smca-detr":
        offsets = _shape(state, "transformer.decoder.layers.0.point2.weight")[0]
        if offsets != 2 * values["nheads"]:
            raise ConversionError(
                f"nheads {values['nheads']}: the checkpoint's Gaussian offsets (point2) are for {offsets // 2} heads; "
                f"give --nheads {offsets // 2}"
            )
    try:
        return Config(**values, device="cpu")
    except ValueError as err:
        raise ConversionError(
            f"the checkpoint's settings (its args, or main.py's defaults, and the flags given) make no valid smca "
            f"model: {err}"
        ) from err


def convert_state_dict(state: Dict[str, Tensor], source: str) -> Dict[str, Tensor]:
    """The reference state dict under smca's names (SMCADETR.state_dict()).

    smca-detr: the class head's last row (a column the focal loss only ever sees as negative)
    is dropped, so the model has the num_classes real classes. Raises ConversionError for a key
    that no smca weight corresponds to (multi-scale SMCA, another architecture).
    """
    converted, unknown = {}, []
    for key, value in state.items():
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} weights have no counterpart in smca's single-scale {source} model, e.g. "
            f"{sorted(unknown)[:8]}: smca converts the single-scale models of SMCA-DETR's and DETR's main.py, not "
            "multi-scale SMCA or other architectures"
        )
    if source == "smca-detr":
        converted["class_embed.weight"] = converted["class_embed.weight"][:-1]
        converted["class_embed.bias"] = converted["class_embed.bias"][:-1]
    return converted


def _coco_categories() -> Dict[int, str]:
    """COCO's category names by id (1..90 with gaps), as torchvision's detection weights list them."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    return {i: n for i, n in enumerate(names) if n not in ("__background__", "N/A")}


def convert(
    input_path: str,
    output_path: str,
    source: str,
    overrides: Optional[Dict[str, Any]] = None,
    categories: Optional[Dict[int, str]] = None,
) -> Config:
    """Convert a reference checkpoint to an smca weights-only checkpoint; returns its Config.

    Loads the converted weights into smca's model with strict key and shape matching before
    anything is written. categories: {id: name}, every id below num_classes (the reference
    models' class i is category id i); default COCO's names when the model has COCO's 91
    classes, else none. Raises ConversionError naming the file (--input, --output or
    --categories), the cause and the remedy: see read_reference_checkpoint, reference_config
    and convert_state_dict; also an output file that already exists or cannot be written.
    """
    from .models import build_model

    if os.path.exists(output_path):
        raise ConversionError(f"--output {output_path!r} already exists; give another path (or remove the file)")
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):
        raise ConversionError(f"--output {output_path!r}: its folder {folder!r} does not exist; create it first")
    state, args = read_reference_checkpoint(input_path)
    try:
        cfg = reference_config(state, args, source, overrides)
        weights = convert_state_dict(state, source)
        model = build_model(cfg)[0]
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            problems = " ".join(str(err).split())  # torch lists them over several indented lines
            raise ConversionError(f"the converted weights do not fit smca's {cfg.model} model: {problems}") from err
    except ConversionError as err:
        raise ConversionError(f"--input {input_path!r}: {err}") from err.__cause__
    if categories is None and cfg.num_classes == 91:
        categories = _coco_categories()
    beyond = sorted(c for c in categories or {} if not 0 <= c < cfg.num_classes)
    if beyond:
        raise ConversionError(
            f"--categories: category ids {beyond[:10]} are beyond the {cfg.num_classes} classes of --input "
            f"{input_path!r} (the reference models' class i is category id i): give the annotation file of the data "
            "the model was trained on"
        )
    try:
        save_weights(
            output_path, model, cfg, categories or {}, converted_from=f"{source}: {os.path.abspath(input_path)}"
        )
    except OSError as err:
        raise ConversionError(
            f"--output {output_path!r} cannot be written ({err.strerror or err}); check the folder's permissions "
            "and free space"
        ) from err
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(PROG, description="Convert an SMCA-DETR or DETR checkpoint to an smca checkpoint.")
    p.add_argument("--source", required=True, choices=SOURCES, help="the repository whose main.py saved --input")
    p.add_argument("--input", required=True, help="the reference checkpoint (.pth)")
    p.add_argument("--output", required=True, help="the smca checkpoint to write")
    p.add_argument("--num_queries", type=int, help="checked against the weights (they hold the queries)")
    p.add_argument("--nheads", type=int, help="attention heads (default: the checkpoint's args, else 8)")
    p.add_argument("--beta", type=float, help="Gaussian bandwidth (default: the checkpoint's --smooth, else 8)")
    p.add_argument(
        "--categories", help="a COCO-format annotation file whose categories name the classes (default: COCO's for 91)"
    )
    args = p.parse_args(argv)
    try:
        try:
            categories = read_categories(args.categories) if args.categories else None
        except DatasetError as err:
            raise ConversionError(f"--categories: {err}") from err
        overrides = dict(num_queries=args.num_queries, nheads=args.nheads, beta=args.beta)
        cfg = convert(args.input, args.output, args.source, overrides, categories)
    except ConversionError as err:
        p.exit(2, f"{PROG}: error: {err}\n")
    print(
        f"{args.output}: {cfg.model} ({cfg.backbone}, {cfg.enc_layers}+{cfg.dec_layers} layers, {cfg.nheads} heads, "
        f"{cfg.num_queries} queries, {cfg.num_classes} classes, {cfg.classifier} classifier"
        + (f", dynamic_scale {cfg.dynamic_scale}, beta {cfg.beta:g}" if cfg.model != "detr" else "")
        + ")",
        file=sys.stdout,
    )


if __name__ == "__main__":
    main()
