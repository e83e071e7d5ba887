"""SMCA-DETR model: every variant forward and backward, padding, inference, maps, config, backends."""
import json
import math

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import smca_kernels
from smca.config import PRESETS, SCHEDULES, Config, preset_values
from smca.models import build_model
from smca.models.postprocess import PostProcess
from smca.predict import attention_maps, predict
from smca.utils import pad_images, unpadded_sizes

VARIANTS = [("smca", "multi_head"), ("smca", "head_shared"), ("smca_ms", "multi_head"), ("smca_ms", "head_shared"), ("detr", "multi_head")]


def tiny_config(**overrides) -> Config:
    fields = dict(
        backbone="resnet18", hidden_dim=32, nheads=4, num_queries=10, enc_layers=2, dec_layers=2,
        dim_feedforward=64, num_classes=5, device="cpu", attention_backend="reference", topk=20,
        eval_size=64, max_size=96, min_sizes=(64,),
    )
    fields.update(overrides)
    return Config(**fields)


def tiny_batch(generator: torch.Generator):
    """Two normalised images of different sizes, padded; targets for them."""
    images = [torch.randn(3, 64, 64, generator=generator), torch.randn(3, 96, 80, generator=generator)]
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5]])},
    ]
    return (*pad_images(images), targets)


@pytest.mark.parametrize("variant,modulation", VARIANTS)
def test_forward_backward(variant, modulation):
    torch.manual_seed(0)
    cfg = tiny_config(model=variant, modulation=modulation, enc_layers=3 if variant == "smca_ms" else 2)
    model, criterion, _ = build_model(cfg)
    images, pixel_mask, targets = tiny_batch(torch.Generator().manual_seed(0))
    out = model(images, pixel_mask)

    assert out["pred_logits"].shape == (2, 10, 5)
    assert out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 10, 5) and aux["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()

    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    # At initialisation decoder layer 0's self-attention and norm1 see a constant (tgt = 0 and
    # zero biases) and legitimately get zero gradients, as in DETR; the parts below must not.
    must_learn = ("reference_point", "offsets", "scales", "level_weights", "level_embed", "cross_attn",
                  "input_proj", "extra_level", "encoder", "query_embed", "class_embed", "bbox_embed", "backbone.layer4")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
            if any(part in name for part in must_learn):
                assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def _graph_counter():
    """A torch.compile backend that counts the graphs it is given (AOTAutograd, no code generation).
    A first compile may count twice: dynamo restarts its analysis once to specialise a float
    (the position encoding's temperature); a new graph after the first call is a recompile."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("variant", ["smca", "smca_ms"])
def test_compiled_detector_is_one_graph_over_image_sizes(variant):
    """torch.compile(dynamic=True, fullgraph=True) of the detector with the fused kernel: one graph
    for every image size (the ops take SymInt[] map sizes, which dynamo keeps symbolic), the
    eager model's outputs."""
    torch.manual_seed(0)
    model = build_model(tiny_config(model=variant, attention_backend="cpu", enc_layers=3 if variant == "smca_ms" else 2))[0]
    model.eval()
    counter = _graph_counter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    graphs = []
    with torch.no_grad():
        for height, width in ((96, 128), (128, 96), (160, 192)):
            images, pixel_mask = pad_images([torch.randn(3, height, width, generator=generator),
                                             torch.randn(3, height - 32, width, generator=generator)])
            out, expected = compiled(images, pixel_mask), model(images, pixel_mask)
            graphs.append(counter.frame_count)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(out[key], expected[key], msg=lambda m: f"{height}x{width} {key}: {m}")
    assert graphs[0] >= 1 and graphs == graphs[:1] * 3, f"graphs compiled after each size: {graphs}"


def test_compiled_training_step_with_attention_dropout_is_one_graph():
    """A training step's forward compiled with fullgraph=True while attention dropout is on (every
    preset: 0.1): the dropout key is drawn as a tensor inside the graph, not read in Python."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_config(attention_backend="cpu", dropout=0.1))
    model.train()
    counter = _graph_counter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    images, pixel_mask, targets = tiny_batch(torch.Generator().manual_seed(0))
    graphs = []
    for _ in range(2):  # a new dropout key each step, no new graph
        criterion(compiled(images, pixel_mask), targets)["loss"].backward()
        graphs.append(counter.frame_count)
    assert graphs[0] >= 1 and graphs[1] == graphs[0], f"graphs compiled after each step: {graphs}"
    cross = [p.grad for n, p in model.named_parameters() if "cross_attn" in n and p.grad is not None]
    assert cross and all(torch.isfinite(g).all() for g in cross) and any(g.any() for g in cross)


@pytest.mark.parametrize("variant,modulation", VARIANTS)
def test_modulation_shapes(variant, modulation):
    """Head-shared modulation has one Gaussian for all heads; multi-scale one per level."""
    cfg = tiny_config(model=variant, modulation=modulation)
    model, _, _ = build_model(cfg)
    layer = model.decoder.layers[0]
    if variant == "detr":
        assert layer.offsets is None and layer.scales is None and model.decoder.reference_point is None
        return
    heads = 1 if modulation == "head_shared" else cfg.nheads
    levels = 3 if variant == "smca_ms" else 1
    assert layer.offsets.out_features == 2 * heads * levels
    assert layer.scales.out_features == 2 * heads * levels
    assert (layer.scales.weight == 0).all() and (layer.scales.bias == 1).all()
    assert (layer.level_weights is not None) == (variant == "smca_ms")
    assert model.decoder.strides == ([16, 32, 64] if variant == "smca_ms" else [32])


def test_multi_scale_encoder_structure():
    cfg = tiny_config(model="smca_ms", enc_layers=5)
    model, _, _ = build_model(cfg)
    assert len(model.encoder.intra_before) == 2 and len(model.encoder.intra_after) == 2
    assert model.encoder.multi_scale is not None
    assert model.level_embed.shape == (3, cfg.hidden_dim)


def test_backbone_frozen_parts_and_param_groups():
    model, _, _ = build_model(tiny_config())
    backbone = model.backbone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())

    groups = model.param_groups(lr_backbone=1e-5)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    assert groups[1]["lr"] == 1e-5
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in backbone.parameters() if p.requires_grad}


def test_backbone_weights_from_file(tmp_path):
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model, _, _ = build_model(tiny_config(backbone_weights=str(path)))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.stem[1].running_var, resnet.bn1.running_var)

    with pytest.raises(FileNotFoundError, match="no such file"):
        build_model(tiny_config(backbone_weights=str(tmp_path / "missing.pth")))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(ValueError, match="does not fit"):
        build_model(tiny_config(backbone_weights=str(tmp_path / "resnet50.pth")))


@pytest.mark.parametrize("variant", ["smca", "detr"])
def test_padding_does_not_change_predictions(variant):
    """After the backbone, padded cells are masked everywhere and the position encoding and the
    reference point use the unpadded size: garbage in the padding changes nothing."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(model=variant))
    model.eval()
    channels = model.backbone.num_channels[-1]
    features = torch.randn(1, channels, 3, 2)  # a 96 x 64 image at stride 32
    padded = torch.randn(1, channels, 5, 4) * 10
    padded[:, :, :3, :2] = features
    mask = torch.zeros(1, 96, 64, dtype=torch.bool)
    padded_mask = torch.ones(1, 160, 128, dtype=torch.bool)
    padded_mask[:, :96, :64] = False
    with torch.no_grad():
        out = model.forward_features([features], mask)
        out_padded = model.forward_features([padded], padded_mask)
    torch.testing.assert_close(out_padded["pred_logits"], out["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_padded["pred_boxes"], out["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_reference_point_uses_unpadded_size():
    """Layer 0's reference point depends only on the queries; in grid cells it scales with each
    image's own (unpadded) width and height over the stride."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(modulation="head_shared"))
    model.eval()
    first = model.decoder.layers[0]
    torch.nn.init.zeros_(first.offsets.weight)
    torch.nn.init.zeros_(first.offsets.bias)
    images, pixel_mask, _ = tiny_batch(torch.Generator().manual_seed(0))  # 64 x 64 and 96 x 80
    with torch.no_grad():
        out = model(images, pixel_mask, attention_layer=0)
        r = model.decoder.reference_point(first.norm_modulation(model.query_embed.weight)).sigmoid()  # (Nq, 2)
    centers = out["attention"]["centers"][:, 0, :, 0]  # (B, Nq, 2)
    torch.testing.assert_close(centers[0], r * torch.tensor([64 / 32, 64 / 32]))
    torch.testing.assert_close(centers[1], r * torch.tensor([80 / 32, 96 / 32]))


def test_pad_images_and_sizes():
    images = [torch.ones(3, 4, 6), 2 * torch.ones(3, 5, 3)]
    batch, mask = pad_images(images)
    assert batch.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert batch[0, :, 4].abs().sum() == 0 and batch[1, :, :, 3:].abs().sum() == 0
    assert mask.sum(dim=(1, 2)).tolist() == [30 - 24, 30 - 15]
    assert unpadded_sizes(mask).tolist() == [[4.0, 6.0], [5.0, 3.0]]


def test_postprocess_topk_and_boxes():
    # 2 queries x 3 classes; probabilities sigmoid(logit)
    logits = torch.tensor([[[2.0, -1.0, 0.5], [-3.0, 1.0, 3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    results = PostProcess(topk=3)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    (result,) = results
    # the three best (query, class) pairs: (1, 2) logit 3, (0, 0) logit 2, (1, 1) logit 1
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    assert result["labels"].tolist() == [2, 0, 1]
    # image h = 100, w = 200: query 0 -> x 80..120, y 30..70; query 1 -> x 0..100, y 50..100
    expected = torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    torch.testing.assert_close(result["boxes"], expected)
    # topk larger than queries x classes keeps them all
    assert len(PostProcess(topk=100)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[1, 1]]))[0]["scores"]) == 6


def test_postprocess_softmax_one_detection_per_query():
    """DETR's post-processing: each query's best object class (never "no object"), by score."""
    logits = torch.tensor([[[2.0, -1.0, 0.5, 4.0], [-3.0, 1.0, 3.0, 0.0]]])  # 3 classes + no object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (result,) = PostProcess(topk=5, classifier="softmax")({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    probs = logits[0].softmax(-1)
    # query 1's best class is 2 (p ~ 0.84), query 0's is 0 (p ~ 0.11; "no object" is likelier)
    assert result["labels"].tolist() == [2, 0]
    torch.testing.assert_close(result["scores"], torch.stack([probs[1, 2], probs[0, 0]]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[0.0, 50.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]]))


@pytest.mark.parametrize("dynamic_scale,outputs", [("type1", 0), ("type2", 1), ("type3", 2)])
@pytest.mark.parametrize("variant", ["smca", "smca_ms"])
def test_dynamic_scale_heads(dynamic_scale, outputs, variant):
    """type1: no scale head, precision 1 / sqrt(beta); type2: one scale per head and level, the
    same on both axes; type3: one per head, level and axis."""
    torch.manual_seed(0)
    cfg = tiny_config(model=variant, dynamic_scale=dynamic_scale, beta=4.0)
    model, criterion, _ = build_model(cfg)
    levels = 3 if variant == "smca_ms" else 1
    for layer in model.decoder.layers:
        if outputs == 0:
            assert layer.scales is None
        else:
            assert layer.scales.out_features == outputs * cfg.nheads * levels
            with torch.no_grad():  # per-query scales, so that the axes could differ
                layer.scales.weight.normal_()
    images, pixel_mask, targets = tiny_batch(torch.Generator().manual_seed(0))
    out = model(images, pixel_mask, attention_layer=1)
    precision = out["attention"]["precision"]  # (B, H, Nq, S, 2)
    assert precision.shape == (2, cfg.nheads, cfg.num_queries, levels, 2)
    if dynamic_scale == "type1":
        assert (precision == 0.5).all()
    elif dynamic_scale == "type2":
        assert torch.equal(precision[..., 0], precision[..., 1]) and precision.std() > 0.1
    else:
        assert (precision[..., 0] - precision[..., 1]).abs().max() > 0.1
    criterion(out, targets)["loss"].backward()
    if outputs:
        assert model.decoder.layers[1].scales.weight.grad.abs().sum() > 0


def test_softmax_classifier_model():
    cfg = tiny_config(model="detr", classifier="softmax")
    model, criterion, postprocess = build_model(cfg)
    assert model.class_embed.out_features == cfg.num_classes + 1
    images, pixel_mask, targets = tiny_batch(torch.Generator().manual_seed(0))
    out = model(images, pixel_mask)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes + 1)
    losses = criterion(out, targets)
    losses["loss"].backward()
    assert model.class_embed.weight.grad.abs().sum() > 0
    detections = postprocess(out, torch.tensor([[64, 64], [96, 80]]))
    assert all(len(d["labels"]) == cfg.num_queries and (d["labels"] < cfg.num_classes).all() for d in detections)
    assert Config(**preset_values("detr_r50_published")).classifier == "softmax"


def test_float64_model_keeps_float64_coordinates():
    """A float64 model computes the Gaussian's centres and precision in float64 (gradcheck
    needs it); 16-bit inputs would be promoted to float32 (smca.models.decoder.coordinates)."""
    torch.manual_seed(0)
    cfg = tiny_config(model="smca_ms", enc_layers=1, dec_layers=2, dropout=0.0, num_queries=3)
    model = build_model(cfg)[0].double()
    images, pixel_mask, _ = tiny_batch(torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = [f.double() for f in model.backbone(images.double()).values()]
    attention = model.forward_features(features, pixel_mask, attention_layer=1)["attention"]
    assert attention["centers"].dtype == attention["precision"].dtype == attention["alpha"].dtype == torch.float64

    # the decoder's output as a function of its queries, through the reference point, offsets,
    # scales and alpha of every layer
    memory = torch.randn(2, 4 * 4 + 2 * 2 + 1, cfg.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, memory.shape[1], dtype=torch.bool)
    image_sizes = torch.tensor([[128.0, 128.0], [96.0, 64.0]])

    def decoder(query_embed):
        hs, reference, _ = model.decoder(query_embed, memory, memory * 0.5, mask, [(4, 4), (2, 2), (1, 1)], image_sizes)
        return hs[-1], reference

    queries = model.query_embed.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(decoder, (queries,), eps=1e-6, atol=1e-7)


def _constant_prediction(model, box_logit):
    """Makes every query predict class 0 (score sigmoid(5)) and the box sigmoid(box_logit)."""
    with torch.no_grad():
        model.class_embed.weight.zero_()
        model.class_embed.bias.copy_(torch.tensor([5.0, -5.0, -5.0, -5.0, -5.0]))
        last = model.bbox_embed.layers[-1]
        last.weight.zero_()
        last.bias.copy_(box_logit)


def test_predict_returns_boxes_in_input_pixels():
    model, _, _ = build_model(tiny_config(model="detr"))
    _constant_prediction(model, torch.logit(torch.tensor([0.5, 0.5, 0.5, 0.5])))
    model.train()
    images = [torch.rand(3, 40, 100), (torch.rand(3, 30, 30) * 255).to(torch.uint8)]
    results = predict(model, images, threshold=0.5)
    assert model.training  # mode restored
    assert len(results) == 2
    for result, (h, w) in zip(results, [(40, 100), (30, 30)]):
        assert len(result["boxes"]) == 10  # every query scores sigmoid(5) for class 0, sigmoid(-5) else
        assert (result["labels"] == 0).all() and (result["scores"] > 0.99).all()
        expected = torch.tensor([w / 4, h / 4, 3 * w / 4, 3 * h / 4])
        torch.testing.assert_close(result["boxes"], expected.expand_as(result["boxes"]))
    batch_results = predict(model, torch.rand(2, 3, 40, 100), threshold=0.999)
    assert [len(r["boxes"]) for r in batch_results] == [0, 0]


@pytest.mark.parametrize("variant", ["smca", "smca_ms", "detr"])
def test_attention_maps(variant):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(model=variant, eval_size=96, max_size=128))
    images = [torch.rand(3, 96, 128), torch.rand(3, 64, 96)]
    maps = attention_maps(model, images, query_indices=[0, 3, 7], layer=-1)
    height, width = maps["feature_size"]
    stride = 16 if variant == "smca_ms" else 32
    assert maps["stride"] == stride and maps["padded_size"] == (96, 128)
    assert (height, width) == (math.ceil(96 / stride), math.ceil(128 / stride))
    assert maps["attention"].shape == (2, 3, height, width)
    # the second image: shorter side 64 -> 96 would make the longer 144 > max_size, so 85 x 128
    assert maps["image_sizes"].tolist() == [[96, 128], [85, 128]]
    assert maps["boxes"].shape == (2, 3, 4) and maps["scores"].shape == (2, 3)
    if variant == "detr":
        assert maps["prior"] is None
    else:
        assert maps["prior"].shape == (2, 3, height, width)
        assert ((maps["prior"] >= 0) & (maps["prior"] <= 1)).all()
    if variant == "smca":
        # one level: the head-averaged weights are a distribution over the unmasked cells
        torch.testing.assert_close(maps["attention"].sum(dim=(2, 3)), torch.ones(2, 3))


def _assert_close_to_reference(actual, expected, name):
    """fp32 convention of the operator tests: max error <= 1e-5 x the reference's largest magnitude."""
    error = (actual - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item(), f"{name}: max error {error:.3g}"


# The kernels themselves are tested in test_ops.py; here one training step of the whole model.
# Triton runs through its (slow) interpreter on the CPU, so only the two SMCA variants.
@pytest.mark.parametrize(
    "backend,variant", [("cpu", "smca"), ("cpu", "smca_ms"), ("cpu", "detr"), ("triton", "smca"), ("triton", "smca_ms")]
)
def test_kernel_backend_matches_reference(backend, variant):
    if backend not in smca_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available on the CPU here")
    images, pixel_mask, targets = tiny_batch(torch.Generator().manual_seed(0))
    runs = []
    for name in ("reference", backend):
        torch.manual_seed(0)
        model, criterion, _ = build_model(tiny_config(model=variant, attention_backend=name, dropout=0.0))
        out = model(images, pixel_mask)
        criterion(out, targets)["loss"].backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref_out, ref_grads), (out, grads) = runs
    for key in ("pred_logits", "pred_boxes"):
        _assert_close_to_reference(out[key], ref_out[key], key)
    for name, grad in ref_grads.items():
        _assert_close_to_reference(grads[name], grad, f"gradient of {name}")


def test_config_round_trip_and_checks():
    cfg = tiny_config(model="smca_ms", modulation="head_shared")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert Config.from_dict(data) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        Config.from_dict({**data, "hiden_dim": 3})
    with pytest.raises(ValueError, match="model"):
        Config(model="yolo")
    with pytest.raises(ValueError, match="nheads"):
        Config(hidden_dim=100, nheads=8)
    for name in PRESETS:
        for schedule in (None, *SCHEDULES):
            Config(**preset_values(name, schedule))
    assert Config(**preset_values("smca_ms_r50")).enc_layers == 5
    # a preset brings the schedule it was published with, unless another is named
    assert (Config(**preset_values("detr_r50_published")).epochs, Config(**preset_values("demo")).lr) == (500, 1e-3)
    assert Config(**preset_values("demo", "smca_50ep")).lr == 1e-4
    with pytest.raises(ValueError, match="schedule: expected one of"):
        preset_values("demo", "fast")
    with pytest.raises(ValueError, match="attention_backend: expected one of"):
        Config(attention_backend="fastest")


def test_field_kinds_name_what_checkpoints_compare():
    """The fields a checkpoint must agree on (architecture) and those a resume may change come
    from the Config fields' metadata: every field of the model's shape is among the former."""
    from smca.checkpoint import ARCHITECTURE_FIELDS, TRAINING_FIELDS

    assert {"model", "hidden_dim", "num_queries", "num_classes", "dynamic_scale", "classifier"} <= set(ARCHITECTURE_FIELDS)
    assert {"lr", "lr_drop", "eos_coef", "cls_loss_coef", "max_size"} <= set(TRAINING_FIELDS)
    assert not set(ARCHITECTURE_FIELDS) & set(TRAINING_FIELDS)
    assert "attention_backend" not in ARCHITECTURE_FIELDS + TRAINING_FIELDS  # any backend runs any checkpoint


def test_checkpoint_config_from_before_new_fields():
    """A checkpoint written before dynamic_scale, classifier and eos_coef existed had their
    defaults' meaning: it agrees with a default run and disagrees with another choice."""
    from smca.checkpoint import CheckpointError, check_compatible

    saved = tiny_config().to_dict()
    for name in ("dynamic_scale", "classifier", "eos_coef"):
        del saved[name]
    state = {"config": saved}
    check_compatible(state, tiny_config())
    with pytest.raises(CheckpointError, match="dynamic_scale: checkpoint 'type3', run 'type1'"):
        check_compatible(state, tiny_config(dynamic_scale="type1"))
    with pytest.raises(CheckpointError, match="classifier"):
        check_compatible(state, tiny_config(classifier="softmax"))
