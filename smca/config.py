"""One configuration object for model, loss, data and training, and the paper's presets.

The config travels as plain data: `to_dict()` goes into checkpoints and `from_dict()` reads it
back (a pickled dataclass or argparse.Namespace would tie checkpoints to this module's code).
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

__all__ = ["Config", "PRESETS", "SCHEDULES", "preset_values", "fields_of", "lr_drop_for"]

MODELS = ("smca", "smca_ms", "detr")
BACKBONES = ("resnet50", "resnet18")
BACKBONE_NORMS = ("frozen", "batch")
MODULATIONS = ("multi_head", "head_shared")
DYNAMIC_SCALES = ("type1", "type2", "type3")
CLASSIFIERS = ("focal", "softmax")
AMP_MODES = ("off", "bf16", "fp16")
# torch.set_float32_matmul_precision's values: "highest" IEEE float32, "high"/"medium" TF32 on CUDA.
MATMUL_PRECISIONS = ("highest", "high", "medium")


# What a field is to a checkpoint (dataclasses field metadata "kind"): "architecture" fields
# shape the weights or what they compute, so a checkpoint and a run must agree on them;
# "loss" fields (the loss and matching weights) and "training" fields are a run's own, which a
# resumed run may change (smca.checkpoint). The rest say where and how a run executes.
def _kind(kind: str):
    def make(default):
        return field(default=default, metadata={"kind": kind})

    return make


ARCHITECTURE, LOSS, TRAINING = _kind("architecture"), _kind("loss"), _kind("training")


def fields_of(kind: str) -> Tuple[str, ...]:
    """Names of the Config fields of one kind ("architecture", "loss" or "training"), in order."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("kind") == kind)


def _default_device() -> str:
    import torch  # imported here so that `import smca` stays light

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Config:
    """Every knob of a run. Defaults are the paper's single-scale SMCA-DETR (ResNet-50).

    Model:
        model: "smca" (single scale), "smca_ms" (multi-scale, scale-selective) or "detr"
            (the same code with the Gaussian off).
        backbone: "resnet50" or "resnet18"; backbone_weights: a local state-dict file of the
            torchvision ResNet (no downloads); None starts from random weights.
        backbone_norm: "frozen" (DETR's fine-tuning: FrozenBatchNorm, stem and layer1 frozen;
            for pretrained weights) or "batch" (trainable BatchNorm, every layer trains; for
            random weights, which a frozen norm leaves unbounded).
        modulation: "multi_head" (a centre offset and scale per head) or "head_shared".
        dynamic_scale: the Gaussian's scale, named as the paper's code (`--dynamic_scale`) names
            it: "type1" a constant 1; "type2" one predicted scale per head, the same on both
            axes; "type3" one per head and axis (the paper's SMCA, Sec. 3.2).
        beta: bandwidth of the Gaussian prior (the paper's code: `--smooth`); precision =
            scale / sqrt(beta).
        attention_backend: the smca_kernels backend of every cross-attention.
        classifier: "focal" (SMCA, Deformable-DETR: num_classes sigmoid logits, focal loss, no
            "no-object" class) or "softmax" (DETR: num_classes + 1 logits, the last one
            "no object", cross-entropy with that class weighted eos_coef).
        num_classes: object classes; category ids of the data must be < num_classes (COCO: 91).
            None: from the data (its largest category id + 1) or the checkpoint resumed.
    Loss and matching: focal_* (sigmoid focal loss), eos_coef (softmax classifier),
        *_loss_coef, set_cost_* (matcher), topk (detections kept per image).
    Run: coco_path, output_dir, resume (a checkpoint to continue), finetune (a checkpoint whose
        weights start a new run), eval (only evaluate), no_eval (train without evaluating),
        results_file (where each evaluation writes its detections as COCO's results JSON),
        tensorboard, progress (a progress bar); see smca.train.
    Data and training: as DETR's main.py; amp "off" | "bf16" | "fp16"; matmul_precision: the
        float32 matrix products on a GPU (torch.set_float32_matmul_precision, which the smca
        kernels follow too): "high" (the default) TF32 tensor cores, "highest" IEEE float32; no
        effect on the CPU. Images are resized to a
        shorter side in min_sizes (training) or eval_size (evaluation, predict), longer side at
        most max_size; as in DETR the cap wins, so max_size alone shrinks every image
        (smca.data.transforms.resized_size).
    """

    # model
    model: str = ARCHITECTURE("smca")
    backbone: str = ARCHITECTURE("resnet50")
    backbone_weights: Optional[str] = None
    backbone_norm: str = ARCHITECTURE("frozen")
    hidden_dim: int = ARCHITECTURE(256)
    nheads: int = ARCHITECTURE(8)
    num_queries: int = ARCHITECTURE(300)
    enc_layers: int = ARCHITECTURE(6)
    dec_layers: int = ARCHITECTURE(6)
    dim_feedforward: int = ARCHITECTURE(2048)
    dropout: float = TRAINING(0.1)
    num_classes: Optional[int] = ARCHITECTURE(None)
    modulation: str = ARCHITECTURE("multi_head")
    dynamic_scale: str = ARCHITECTURE("type3")
    beta: float = ARCHITECTURE(8.0)
    attention_backend: str = "auto"
    aux_loss: bool = TRAINING(True)
    classifier: str = ARCHITECTURE("focal")
    # loss and matching
    focal_alpha: float = LOSS(0.25)
    focal_gamma: float = LOSS(2.0)
    eos_coef: float = LOSS(0.1)
    cls_loss_coef: float = LOSS(2.0)
    bbox_loss_coef: float = LOSS(5.0)
    giou_loss_coef: float = LOSS(2.0)
    set_cost_class: float = LOSS(2.0)
    set_cost_bbox: float = LOSS(5.0)
    set_cost_giou: float = LOSS(2.0)
    topk: int = LOSS(300)
    # training
    lr: float = TRAINING(1e-4)
    lr_backbone: float = TRAINING(1e-5)
    weight_decay: float = TRAINING(1e-4)
    epochs: int = 50
    lr_drop: int = TRAINING(40)
    batch_size: int = TRAINING(2)
    clip_max_norm: float = TRAINING(0.1)
    seed: int = TRAINING(42)
    num_workers: int = 2
    device: str = field(default_factory=_default_device)
    amp: str = TRAINING("off")
    matmul_precision: str = "high"
    # data
    max_size: int = TRAINING(1333)
    min_sizes: Tuple[int, ...] = TRAINING(tuple(range(480, 801, 32)))
    eval_size: int = TRAINING(800)
    coco_path: Optional[str] = None
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    finetune: Optional[str] = None
    eval: bool = False
    no_eval: bool = False
    results_file: Optional[str] = None
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.min_sizes = tuple(int(s) for s in self.min_sizes)
        for name, value, choices in (
            ("model", self.model, MODELS),
            ("backbone", self.backbone, BACKBONES),
            ("backbone_norm", self.backbone_norm, BACKBONE_NORMS),
            ("modulation", self.modulation, MODULATIONS),
            ("dynamic_scale", self.dynamic_scale, DYNAMIC_SCALES),
            ("classifier", self.classifier, CLASSIFIERS),
            ("amp", self.amp, AMP_MODES),
            ("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
        for name in ("hidden_dim", "nheads", "enc_layers", "dim_feedforward"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: expected a finite bandwidth > 0, got {self.beta}")
        # the sine position encoding pairs sin/cos features on each of the two axes
        if self.hidden_dim % self.nheads or self.hidden_dim % 4:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by 4 and by nheads ({self.nheads})"
            )
        for name in ("batch_size", "lr_drop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        # What torch (AdamW, DataLoader, dropout, numpy's seeding) would refuse with a traceback
        # only once the run is under way.
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr: expected a finite learning rate >= 0, got {self.lr}")
        if not math.isfinite(self.lr_backbone):
            raise ValueError(
                f"lr_backbone: expected a finite learning rate (<= 0 freezes the backbone), got {self.lr_backbone}"
            )
        for name in ("weight_decay", "clip_max_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                off = " (0: off)" if name == "clip_max_norm" else ""
                raise ValueError(f"{name}: expected a finite value >= 0{off}, got {value}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")
        for name in ("epochs", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: expected an integer in [0, 2**32), as numpy's, got {self.seed}")
        if self.eval and self.no_eval:
            raise ValueError("eval and no_eval: give one (eval only evaluates; no_eval trains without evaluating)")
        if not self.min_sizes:
            raise ValueError("min_sizes: expected at least one shorter side")
        for name, value in (("max_size", self.max_size), ("eval_size", self.eval_size), ("min_sizes", self.min_sizes)):
            if min(value if name == "min_sizes" else (value,)) < 1:
                shown = list(value) if name == "min_sizes" else value
                raise ValueError(f"{name}: expected sizes in pixels >= 1, got {shown}")
        if self.lr_backbone <= 0 and self.backbone_norm != "frozen":
            raise ValueError("lr_backbone <= 0 freezes the backbone, which needs backbone_norm 'frozen'")
        if self.dec_layers < 1 or self.num_queries < 1 or (self.num_classes is not None and self.num_classes < 1):
            raise ValueError("dec_layers, num_queries and num_classes must be >= 1")
        if self.resume and self.finetune:
            raise ValueError("resume and finetune: give one (continue a run, or start one from a checkpoint's weights)")
        from smca_kernels.ops import BACKENDS  # imported here so that `import smca` stays light

        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend: expected one of {BACKENDS}, got {self.attention_backend!r}")
        if not 0 < self.eos_coef <= 1:
            raise ValueError(f"eos_coef: expected a weight in (0, 1], got {self.eos_coef}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (str, int, float, bool, None, list) for JSON and checkpoints."""
        data = dataclasses.asdict(self)
        data["min_sizes"] = list(self.min_sizes)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Config":
        """Inverse of to_dict. Unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Config: unknown fields {unknown}")
        return cls(**data)


def lr_drop_for(epochs: int) -> int:
    """The paper's schedule at another length: lr x0.1 after 80% of the epochs (40 of 50)."""
    return max(1, round(0.8 * epochs))


# Model presets (architecture, classifier, loss weights) and training schedules (optimiser,
# length, image sizes) are kept apart, as detrex keeps model and schedule configs: a preset
# names the schedule it was published with (PRESET_SCHEDULES), which --schedule replaces.
# Both override Config's defaults, which are the SMCA paper's single-scale R50 and its 50-epoch
# schedule; num_classes is left to the data set (the training CLI sets it).
PRESETS: Dict[str, Dict[str, Any]] = {
    "smca_r50": {"model": "smca", "backbone": "resnet50", "modulation": "multi_head"},
    "smca_shared_r50": {"model": "smca", "backbone": "resnet50", "modulation": "head_shared"},
    "smca_ms_r50": {"model": "smca_ms", "backbone": "resnet50", "enc_layers": 5, "dim_feedforward": 1024},
    # The SMCA paper's DETR baseline: SMCA's recipe (focal classifier, 300 queries, 50 epochs)
    # with the Gaussian off, so that only the modulation differs.
    "detr_r50": {"model": "detr", "backbone": "resnet50"},
    # DETR as published (Carion et al., ECCV 2020; facebookresearch/detr main.py, the 42.0 AP
    # R50 model): softmax classifier with a no-object class, 100 queries, its loss weights.
    "detr_r50_published": {
        "model": "detr",
        "backbone": "resnet50",
        "classifier": "softmax",
        "num_queries": 100,
        "topk": 100,
        "eos_coef": 0.1,
        "cls_loss_coef": 1.0,
        "set_cost_class": 1.0,
    },
    # The small model of `make demo` and the convergence study.
    "demo": {
        "model": "smca",
        "backbone": "resnet18",
        "hidden_dim": 64,
        "nheads": 8,
        "num_queries": 50,
        "enc_layers": 2,
        "dec_layers": 3,
        "dim_feedforward": 256,
        "dropout": 0.0,
        "topk": 100,
    },
}

SCHEDULES: Dict[str, Dict[str, Any]] = {
    # The SMCA paper's: AdamW 1e-4 (backbone 1e-5), 50 epochs, lr x0.1 after 40, DETR's sizes.
    "smca_50ep": {},
    # DETR's published 500 epochs, lr x0.1 after 400.
    "detr_500ep": {"epochs": 500, "lr_drop": 400},
    "demo": {
        # Meant for a backbone pretrained on the data (--backbone_weights; smca.pretrain_backbone
        # makes one), kept frozen as DETR's lr_backbone 0 does: every step then trains the
        # transformer, at a rate for its small width.
        "lr": 1e-3,
        "lr_backbone": 0.0,
        "batch_size": 8,
        "epochs": 20,
        "lr_drop": 16,
        # The built-in shapes' scale (images of about 128 pixels).
        "max_size": 192,
        "min_sizes": (96, 112, 128, 144),
        "eval_size": 128,
    },
}

# The schedule each preset was published with (default: smca_50ep).
PRESET_SCHEDULES = {"detr_r50_published": "detr_500ep", "demo": "demo"}


def preset_values(preset: Optional[str] = None, schedule: Optional[str] = None) -> Dict[str, Any]:
    """Config overrides of a model preset and a schedule (default: the preset's own, see
    PRESET_SCHEDULES; smca_50ep without a preset). Raises ValueError naming an unknown name."""
    for name, value, table in (("preset", preset, PRESETS), ("schedule", schedule, SCHEDULES)):
        if value is not None and value not in table:
            raise ValueError(f"{name}: expected one of {sorted(table)}, got {value!r}")
    schedule = schedule or PRESET_SCHEDULES.get(preset, "smca_50ep")
    return {**(PRESETS[preset] if preset else {}), **SCHEDULES[schedule]}
