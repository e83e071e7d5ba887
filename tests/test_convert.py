"""smca.convert: checkpoints saved by the paper's code and by DETR -> smca checkpoints.

The reference repositories' own models are not run here (nothing of theirs is in the project):
their checkpoints are synthesised from the documented layout (reference_checkpoints.py). That
converted models compute what the reference models compute was checked beside the repositories
(README, "Bringing weights from SMCA-DETR and DETR").
"""
import argparse
import math
import os

import pytest
import torch

from smca.checkpoint import load_checkpoint
from smca.convert import ConversionError, convert, main
from smca.models import build_model
from smca.predict import load_model, predict, prepare_images

from reference_checkpoints import main_py_args, reference_state_dict, save_main_py_checkpoint

SMALL = dict(backbone="resnet18", hidden_dim=64, dim_feedforward=128, enc_layers=2, dec_layers=3, num_queries=20)


def _reference(tmp_path, source, num_classes=91, with_args=True, **settings):
    args = main_py_args(source, **{**SMALL, **settings})
    state = reference_state_dict(source, args, num_classes)
    path = str(tmp_path / f"{source}.pth")
    save_main_py_checkpoint(path, source, state, args if with_args else None)
    return path, state, args


@pytest.mark.parametrize("dynamic_scale", ["type1", "type2", "type3"])
def test_smca_detr_round_trip(tmp_path, dynamic_scale):
    path, ref, _ = _reference(tmp_path, "smca-detr", dynamic_scale=dynamic_scale, smooth=4)
    out = str(tmp_path / "converted.pth")
    cfg = convert(path, out, "smca-detr")

    assert (cfg.model, cfg.classifier, cfg.dynamic_scale, cfg.beta) == ("smca", "focal", dynamic_scale, 4.0)
    assert (cfg.num_classes, cfg.num_queries, cfg.hidden_dim, cfg.enc_layers, cfg.dec_layers) == (91, 20, 64, 2, 3)
    state = load_checkpoint(out)
    assert state["optimizer"] is None and "smca-detr" in state["converted_from"]
    assert state["categories"][1] == "person" and state["categories"][90] == "toothbrush"
    model = build_model(cfg)[0]
    model.load_state_dict(state["model"])  # strict: every key and shape
    weights = state["model"]
    # the last class row is the focal loss's always-negative column, dropped
    torch.testing.assert_close(weights["class_embed.weight"], ref["class_embed.weight"][:-1], rtol=0, atol=0)
    torch.testing.assert_close(weights["class_embed.bias"], ref["class_embed.bias"][:-1], rtol=0, atol=0)
    pairs = {
        "backbone.stem.0.weight": "backbone.0.body.conv1.weight",
        "backbone.stem.1.running_var": "backbone.0.body.bn1.running_var",
        "backbone.layer4.1.bn2.weight": "backbone.0.body.layer4.1.bn2.weight",
        "input_proj.0.weight": "input_proj.weight",
        "encoder.layers.1.self_attn.in_proj_weight": "transformer.encoder.layers.1.self_attn.in_proj_weight",
        "decoder.layers.2.cross_attn.out_proj.bias": "transformer.decoder.layers.2.multihead_attn.out_proj.bias",
        "decoder.layers.1.norm_modulation.weight": "transformer.decoder.layers.1.norm4.weight",
        "decoder.layers.2.offsets.weight": "transformer.decoder.layers.2.point2.weight",
        "decoder.reference_point.layers.2.bias": "transformer.decoder.layers.0.point1.layers.2.bias",
        "decoder.norm.weight": "transformer.decoder.norm.weight",
        "query_embed.weight": "query_embed.weight",
        "bbox_embed.layers.2.weight": "bbox_embed.layers.2.weight",
    }
    if dynamic_scale != "type1":
        pairs["decoder.layers.1.scales.bias"] = "transformer.decoder.layers.1.point3.bias"
    else:
        assert not any("scales" in k for k in weights)
    for ours, theirs in pairs.items():
        assert torch.equal(weights[ours], ref[theirs]), ours


def test_detr_round_trip_and_softmax_scores(tmp_path):
    path, ref, _ = _reference(tmp_path, "detr", num_classes=20, dataset_file="voc", eos_coef=0.2, set_cost_class=1)
    out = str(tmp_path / "converted.pth")
    cfg = convert(path, out, "detr")
    assert (cfg.model, cfg.classifier, cfg.num_classes, cfg.eos_coef, cfg.cls_loss_coef) == ("detr", "softmax", 20, 0.2, 1.0)
    model, cfg, categories = load_model(out)
    assert categories == {}  # 20 classes: not COCO, no names unless --categories
    assert torch.equal(model.state_dict()["class_embed.weight"], ref["class_embed.weight"])  # all 21 rows
    images = [torch.rand(3, 70, 90), torch.rand(3, 50, 40)]
    with torch.no_grad():
        batch, mask, _ = prepare_images(model, images)
        logits = model(batch, mask)["pred_logits"]
    detections = predict(model, images, threshold=0.0)
    for b, det in enumerate(detections):
        # DETR's scores: per query the best class of softmax over classes + "no object", the
        # no-object column excluded; one detection per query
        probs = logits[b].softmax(-1)[:, :-1]
        expected_scores, expected_labels = probs.max(-1)
        order = expected_scores.argsort(descending=True)
        torch.testing.assert_close(det["scores"], expected_scores[order])
        assert torch.equal(det["labels"], expected_labels[order])
        assert len(det["scores"]) == cfg.num_queries and (det["labels"] < 20).all()


def test_without_args_settings_come_from_the_weights(tmp_path):
    path, _, _ = _reference(tmp_path, "smca-detr", with_args=False, dynamic_scale="type2")
    cfg = convert(path, str(tmp_path / "a.pth"), "smca-detr")
    assert (cfg.dynamic_scale, cfg.beta, cfg.nheads, cfg.num_queries) == ("type2", 8.0, 8, 20)
    cfg = convert(path, str(tmp_path / "b.pth"), "smca-detr", dict(beta=2.0))
    assert cfg.beta == 2.0


def test_defaults_without_args_are_each_repositorys(tmp_path):
    """main.py's matching class cost: DETR's 1, the paper's code's 2."""
    path, _, _ = _reference(tmp_path, "detr", with_args=False)
    assert convert(path, str(tmp_path / "detr_out.pth"), "detr").set_cost_class == 1.0
    path, _, _ = _reference(tmp_path, "smca-detr", with_args=False, dynamic_scale="type3")
    assert convert(path, str(tmp_path / "smca_out.pth"), "smca-detr").set_cost_class == 2.0


def test_bare_state_dict_and_ddp_prefix(tmp_path):
    _, state, _ = _reference(tmp_path, "detr")
    path = str(tmp_path / "bare.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    assert convert(path, str(tmp_path / "out.pth"), "detr").num_queries == 20


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(dilation=True), "dilation"),
        (dict(position_embedding="learned"), "position_embedding"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(masks=True), "masks"),
        (dict(backbone="resnet101"), "backbone 'resnet101'"),
    ],
)
def test_unsupported_settings_are_named(tmp_path, settings, message):
    args = main_py_args("smca-detr", **{**SMALL, "dynamic_scale": "type3"})
    path = str(tmp_path / "in.pth")
    save_main_py_checkpoint(path, "smca-detr", reference_state_dict("smca-detr", args), main_py_args(
        "smca-detr", **{**SMALL, "dynamic_scale": "type3", **settings}
    ))
    out = tmp_path / "out.pth"
    with pytest.raises(ConversionError, match=message):
        convert(path, str(out), "smca-detr")
    assert not out.exists()


def test_unsupported_layouts_are_named(tmp_path):
    """What the weights show, without args: type4, a ResNet-101, a learned position embedding,
    pre-norm."""
    args = main_py_args("smca-detr", **{**SMALL, "dynamic_scale": "type4"})
    state = reference_state_dict("smca-detr", args)
    resnet101 = reference_state_dict("detr", main_py_args("detr", **{**SMALL, "backbone": "resnet101"}))
    cases = {
        "dynamic_scale 'type4'": state,
        "backbone 'resnet101'": resnet101,
        "position_embedding 'learned'": {**state, "backbone.1.row_embed.weight": torch.zeros(50, 32)},
        "pre_norm": {**state, "transformer.encoder.norm.weight": torch.ones(64)},
    }
    for message, weights in cases.items():
        path = str(tmp_path / "in.pth")
        save_main_py_checkpoint(path, "smca-detr", weights, None)
        with pytest.raises(ConversionError, match=message):
            convert(path, str(tmp_path / "out.pth"), "smca-detr")


def test_mismatches_are_named(tmp_path):
    path, state, _ = _reference(tmp_path, "smca-detr", dynamic_scale="type3")
    out = str(tmp_path / "out.pth")
    with pytest.raises(ConversionError, match="--num_queries 300: the checkpoint holds 20"):
        convert(path, out, "smca-detr", dict(num_queries=300))
    with pytest.raises(ConversionError, match="point2.*for 8 heads"):
        convert(path, out, "smca-detr", dict(nheads=4))
    with pytest.raises(ConversionError, match="use --source smca-detr"):
        convert(path, out, "detr")
    detr_path, _, _ = _reference(tmp_path, "detr")
    with pytest.raises(ConversionError, match="no reference-point head .*give --source detr"):
        convert(detr_path, out, "smca-detr")
    # args that disagree with the weights (type2 said, type3's 16 scales held)
    save_main_py_checkpoint(path, "smca-detr", state, main_py_args("smca-detr", **SMALL, dynamic_scale="type2"))
    with pytest.raises(ConversionError, match="dynamic_scale 'type2'.*16 outputs"):
        convert(path, out, "smca-detr")
    # multi-scale or other architectures: keys with no counterpart
    save_main_py_checkpoint(path, "smca-detr", {**state, "transformer.level_embed": torch.zeros(3, 64)}, None)
    with pytest.raises(ConversionError, match="transformer.level_embed"):
        convert(path, out, "smca-detr")
    assert not os.path.exists(out)


def test_unreadable_and_unsafe_files(tmp_path):
    out = str(tmp_path / "out.pth")
    with pytest.raises(ConversionError, match="missing.pth' does not exist; give the .pth file"):
        convert(str(tmp_path / "missing.pth"), out, "detr")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot be read as a PyTorch checkpoint.*copy or download it again"):
        convert(str(garbage), out, "detr")
    # A pickle that would run code when loaded without weights_only: refused, and not run.
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "args": _Evil(str(marker))}, path)
    with pytest.raises(ConversionError, match=r"holds a Python object \(io.open\) .*if you trust") as error:
        convert(path, out, "detr")
    assert not marker.exists() and "\x1b" not in str(error.value)
    torch.save({"model": {"a": 1}}, path)
    with pytest.raises(ConversionError, match="not a state dict of tensors"):
        convert(path, out, "detr")
    # already converted: said so
    detr_path, _, _ = _reference(tmp_path, "detr")
    convert(detr_path, out, "detr")
    with pytest.raises(ConversionError, match="already an smca checkpoint"):
        convert(out, str(tmp_path / "again.pth"), "detr")
    with pytest.raises(ConversionError, match="its folder .* does not exist"):
        convert(detr_path, str(tmp_path / "no" / "such" / "out.pth"), "detr")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cli(tmp_path, capsys):
    path, _, _ = _reference(tmp_path, "smca-detr", dynamic_scale="type3")
    out = str(tmp_path / "out.pth")
    main(["--source", "smca-detr", "--input", path, "--output", out])
    assert "smca (resnet18, 2+3 layers, 8 heads, 20 queries, 91 classes, focal classifier, dynamic_scale type3, beta 8)" in (
        capsys.readouterr().out
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "smca-detr", "--input", path, "--output", out])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    categories = tmp_path / "ann.json"
    categories.write_text('{"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}')
    out2 = str(tmp_path / "out2.pth")
    main(["--source", "smca-detr", "--input", path, "--output", out2, "--categories", str(categories)])
    assert load_checkpoint(out2)["categories"] == {1: "cat", 2: "dog"}


def test_converted_model_predicts_at_every_backend(tmp_path):
    """The converted single-scale model gives the same outputs with the reference and the fused
    CPU backend."""
    path, _, _ = _reference(tmp_path, "smca-detr", dynamic_scale="type1")
    out = str(tmp_path / "out.pth")
    convert(path, out, "smca-detr")
    image = torch.rand(3, 120, 90)
    results = {}
    for backend in ("reference", "auto"):
        model, _, _ = load_model(out, attention_backend=backend)
        with torch.no_grad():
            batch, mask, _ = prepare_images(model, [image])
            results[backend] = model(batch, mask)
    for key in ("pred_logits", "pred_boxes"):
        ref = results["reference"][key]
        error = (results["auto"][key] - ref).abs().max().item()
        assert error <= 1e-5 * ref.abs().max().item(), key
    # type1: no scale head, every query's precision 1 / sqrt(smooth) on both axes
    with torch.no_grad():
        precision = model(batch, mask, attention_layer=1)["attention"]["precision"]
    assert model.decoder.layers[1].scales is None
    torch.testing.assert_close(precision, torch.full_like(precision, 1 / math.sqrt(8.0)), rtol=0, atol=0)


def _refusals(tmp_path):
    """(argv, the file it names, cause, remedy) of a representative set of the converter's refusals."""
    path, state, _ = _reference(tmp_path, "smca-detr", dynamic_scale="type3")
    (tmp_path / "detr").mkdir()
    detr_path, _, _ = _reference(tmp_path / "detr", "detr")
    out = str(tmp_path / "out.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(path, "rb").read()[:1000])
    listing = tmp_path / "list.pth"
    torch.save([1, 2], str(listing))
    mixed = tmp_path / "mixed.pth"
    torch.save({"model": {**state, "epoch": 3}}, str(mixed))
    numpy_args = tmp_path / "numpy.pth"
    import numpy as np

    torch.save({"model": state, "args": np.zeros(2)}, str(numpy_args))
    level = tmp_path / "multiscale.pth"
    save_main_py_checkpoint(str(level), "smca-detr", {**state, "transformer.level_embed": torch.zeros(3, 64)}, None)
    sparse = tmp_path / "sparse.json"
    sparse.write_text('{"categories": [{"id": 74673216, "name": "widget"}]}')
    exists = tmp_path / "exists.pth"
    exists.write_bytes(b"")
    source = ["--source", "smca-detr", "--input"]
    return [
        (source + [str(tmp_path / "nope.pth"), "--output", out], "nope.pth", "does not exist", "give the .pth file"),
        (source + [str(tmp_path), "--output", out], str(tmp_path), "is a folder", "give the .pth file"),
        (source + [str(truncated), "--output", out], "truncated.pth", "damaged", "download it again"),
        (source + [str(listing), "--output", out], "list.pth", "holds a list", "give that file"),
        (source + [str(mixed), "--output", out], "mixed.pth", "['epoch'] are not tensors", "state_dict()"),
        (source + [str(numpy_args), "--output", out], "numpy.pth", "object (numpy.", "re-save"),
        (source + [str(level), "--output", out], "multiscale.pth", "no counterpart", "not multi-scale SMCA"),
        (source + [detr_path, "--output", out], "detr.pth", "no reference-point head", "give --source detr"),
        (source + [path, "--output", out, "--nheads", "4"], "smca-detr.pth", "for 8 heads", "give --nheads 8"),
        (source + [path, "--output", out, "--num_queries", "7"], "smca-detr.pth", "holds 20", "leave out"),
        (source + [path, "--output", out, "--beta", "0"], "smca-detr.pth", "bandwidth > 0", "flags given"),
        (source + [path, "--output", str(exists)], "exists.pth", "already exists", "give another path"),
        (source + [path, "--output", str(tmp_path / "no" / "o.pth")], "o.pth", "does not exist", "create it"),
        (source + [path, "--output", out, "--categories", str(sparse)], "smca-detr.pth", "74673216", "give the"),
        (source + [path, "--output", out, "--categories", str(tmp_path / "x.json")], "x.json", "does not exist",
         "--categories"),
    ]


def test_every_refusal_names_file_cause_and_remedy(tmp_path, capsys):
    """Each refusal of `python -m smca.convert`: exit status 2, one line naming the file, the
    cause and the remedy, no terminal codes (torch's load errors carry some), nothing written."""
    for argv, named, cause, remedy in _refusals(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert err.startswith("smca-convert: error: ") and err.endswith("\n") and err.count("\n") == 1, err
        assert named in err and cause in err and remedy in err, (argv, err)
        assert "\x1b" not in err and "\t" not in err, err
    assert not os.path.exists(tmp_path / "out.pth")
