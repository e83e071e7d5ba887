"""Synthetic checkpoints laid out as the paper's code (gaopengcuhk/SMCA-DETR, single scale) and
DETR (facebookresearch/detr) save them, built from their documented layout, not their code.

Both repositories' main.py save {"model": state_dict, "optimizer", "lr_scheduler", "epoch",
"args": argparse.Namespace}. The state dict of DETR (models/detr.py, transformer.py,
backbone.py) is:
    backbone.0.body.<torchvision ResNet keys without fc>   (FrozenBatchNorm2d: no batch counter)
    input_proj.{weight (d, C5, 1, 1), bias}
    transformer.encoder.layers.i.{self_attn.{in_proj_weight (3d, d), in_proj_bias,
        out_proj.{weight, bias}}, linear1 (ff, d), linear2 (d, ff), norm1, norm2}
    transformer.decoder.layers.i.{self_attn, multihead_attn, linear1, linear2, norm1..3}
    transformer.decoder.norm
    class_embed (C + 1, d), bbox_embed.layers.{0, 1, 2} (d, d) (d, d) (4, d), query_embed (Nq, d)
SMCA-DETR adds to every decoder layer norm4 (the modulation's LayerNorm), point2 (2 x 8 Gaussian
offsets, 8 heads wired in), point3 (the scale head: none for --dynamic_scale type1, 8 outputs
for type2, 16 for type3, 24 for type4) and to layer 0 point1, the reference point's 3-layer MLP.
"""
import argparse
from typing import Dict, Optional

import torch
import torchvision
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d

SCALE_OUTPUTS = {"type1": 0, "type2": 8, "type3": 16, "type4": 24}


def main_py_args(source: str, **settings) -> argparse.Namespace:
    """main.py's arguments (the defaults both parsers share) with `settings` applied."""
    args = dict(
        lr=1e-4, lr_backbone=1e-5, batch_size=2, weight_decay=1e-4, epochs=300, lr_drop=200, clip_max_norm=0.1,
        frozen_weights=None, backbone="resnet50", dilation=False, position_embedding="sine", enc_layers=6,
        dec_layers=6, dim_feedforward=2048, hidden_dim=256, dropout=0.1, nheads=8, num_queries=100,
        pre_norm=False, masks=False, aux_loss=True, set_cost_class=1, set_cost_bbox=5, set_cost_giou=2,
        mask_loss_coef=1, dice_loss_coef=1, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1, dataset_file="coco",
        coco_path="/data/coco", output_dir="", device="cuda", seed=42, resume="", start_epoch=0, eval=False,
        num_workers=2, world_size=1, dist_url="env://", distributed=False,
    )
    if source == "smca-detr":
        args.update(smooth=8, dynamic_scale="type1")
    args.update(settings)
    return argparse.Namespace(**args)


def reference_state_dict(
    source: str, args: argparse.Namespace, num_classes: int = 91, generator: Optional[torch.Generator] = None
) -> Dict[str, Tensor]:
    """Random weights with the keys and shapes of the `source` model main.py builds from args."""
    generator = generator or torch.Generator().manual_seed(0)
    d, ff, heads = args.hidden_dim, args.dim_feedforward, 8

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    resnet = getattr(torchvision.models, args.backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    state = {f"backbone.0.body.{k}": random(*v.shape) for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    c5 = resnet.fc.in_features
    state.update({"input_proj.weight": random(d, c5, 1, 1), "input_proj.bias": random(d)})

    def attention(prefix):
        state.update({
            f"{prefix}.in_proj_weight": random(3 * d, d), f"{prefix}.in_proj_bias": random(3 * d),
            f"{prefix}.out_proj.weight": random(d, d), f"{prefix}.out_proj.bias": random(d),
        })

    def linear(prefix, n_out, n_in):
        state.update({f"{prefix}.weight": random(n_out, n_in), f"{prefix}.bias": random(n_out)})

    def norm(prefix):
        state.update({f"{prefix}.weight": 1 + random(d), f"{prefix}.bias": random(d)})

    for i in range(args.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        attention(f"{p}.self_attn")
        linear(f"{p}.linear1", ff, d), linear(f"{p}.linear2", d, ff)
        norm(f"{p}.norm1"), norm(f"{p}.norm2")
    for i in range(args.dec_layers):
        p = f"transformer.decoder.layers.{i}"
        attention(f"{p}.self_attn"), attention(f"{p}.multihead_attn")
        linear(f"{p}.linear1", ff, d), linear(f"{p}.linear2", d, ff)
        norm(f"{p}.norm1"), norm(f"{p}.norm2"), norm(f"{p}.norm3")
        if source == "smca-detr":
            norm(f"{p}.norm4")
            linear(f"{p}.point2", 2 * heads, d)
            if SCALE_OUTPUTS[args.dynamic_scale]:
                linear(f"{p}.point3", SCALE_OUTPUTS[args.dynamic_scale], d)
            if i == 0:
                for j, n_out in enumerate((d, d, 2)):
                    linear(f"{p}.point1.layers.{j}", n_out, d)
    norm("transformer.decoder.norm")
    linear("class_embed", num_classes + 1, d)
    for j, n_out in enumerate((d, d, 4)):
        linear(f"bbox_embed.layers.{j}", n_out, d)
    state["query_embed.weight"] = random(args.num_queries, d)
    return state


def save_main_py_checkpoint(path, source: str, state: Dict[str, Tensor], args: Optional[argparse.Namespace]) -> None:
    """What main.py writes each epoch (args None: a released file holding only the weights)."""
    checkpoint = {"model": state}
    if args is not None:
        checkpoint.update(
            optimizer={"state": {}, "param_groups": [{"lr": args.lr, "params": list(range(len(state)))}]},
            lr_scheduler={"step_size": args.lr_drop, "gamma": 0.1, "last_epoch": 3},
            epoch=3,
            args=args,
        )
    torch.save(checkpoint, path)
