"""SMCA-DETR models: build_model(cfg) -> (model, criterion, postprocessor)."""
import math
from typing import Tuple

from torch import nn

from ..config import Config
from .backbone import Backbone
from .criterion import SetCriterion
from .decoder import Decoder, DecoderLayer
from .detector import SMCADETR
from .encoder import Encoder, EncoderLayer, MultiScaleEncoder
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import PostProcess

__all__ = ["build_model", "SMCADETR", "SetCriterion", "HungarianMatcher", "PostProcess"]


def _projection(in_channels: int, d: int, **conv_args) -> nn.Sequential:
    """Conv -> GroupNorm (as Deformable-DETR); no conv bias, the norm's shift replaces it."""
    return nn.Sequential(nn.Conv2d(in_channels, d, bias=False, **conv_args), nn.GroupNorm(math.gcd(32, d), d))


def build_model(cfg: Config) -> Tuple[SMCADETR, SetCriterion, PostProcess]:
    """The model of cfg.model, its criterion and post-processor (the one model.predict uses).

    "smca": C5 (stride 32) projected by a 1x1 conv, DETR encoder, SMCA decoder.
    "smca_ms": C4, C5 and a stride-2 conv on C5 (strides 16, 32, 64), each projected to d with
        GroupNorm (as Deformable-DETR), the intra-/multi-scale encoder, scale-selective decoder.
    "detr": as "smca" with the Gaussian off (plain cross-attention, no reference point).
    Everything is created on the CPU; move the model with .to(device).
    """
    if cfg.num_classes is None:
        raise ValueError("num_classes: None stands for 'from the data'; set it before building the model")
    multi_scale = cfg.model == "smca_ms"
    d = cfg.hidden_dim
    backbone = Backbone(
        cfg.backbone,
        cfg.backbone_weights,
        ["layer3", "layer4"] if multi_scale else ["layer4"],
        cfg.backbone_norm,
        trainable=cfg.lr_backbone > 0,
    )
    strides = list(backbone.strides)
    if multi_scale:
        input_proj = nn.ModuleList(_projection(c, d, kernel_size=1) for c in backbone.num_channels)
        extra_level = _projection(backbone.num_channels[-1], d, kernel_size=3, stride=2, padding=1)
        strides.append(2 * strides[-1])
    else:
        input_proj = nn.ModuleList([nn.Conv2d(backbone.num_channels[-1], d, kernel_size=1)])
        extra_level = None

    encoder_layer = EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.attention_backend)
    encoder = (MultiScaleEncoder if multi_scale else Encoder)(encoder_layer, cfg.enc_layers)
    decoder_layer = DecoderLayer(
        d,
        cfg.nheads,
        cfg.dim_feedforward,
        cfg.dropout,
        gaussian=cfg.model != "detr",
        head_shared=cfg.modulation == "head_shared",
        dynamic_scale=cfg.dynamic_scale,
        num_levels=len(strides),
        beta=cfg.beta,
        backend=cfg.attention_backend,
    )
    decoder = Decoder(decoder_layer, cfg.dec_layers, strides)

    postprocess = PostProcess(cfg.topk, cfg.classifier)
    model = SMCADETR(
        backbone,
        input_proj,
        extra_level,
        PositionEmbeddingSine(d // 2),
        encoder,
        decoder,
        num_classes=cfg.num_classes,
        num_queries=cfg.num_queries,
        classifier=cfg.classifier,
        aux_loss=cfg.aux_loss,
        postprocess=postprocess,
        eval_size=cfg.eval_size,
        max_size=cfg.max_size,
    )
    matcher = HungarianMatcher(
        cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou, cfg.focal_alpha, cfg.focal_gamma, cfg.classifier
    )
    weight_dict = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    criterion = SetCriterion(
        cfg.num_classes, matcher, weight_dict, cfg.focal_alpha, cfg.focal_gamma, cfg.classifier, cfg.eos_coef
    )
    return model, criterion, postprocess
