"""Pictures: detections drawn legibly (smca.visualize.draw_detections) and training curves
(smca.plot_logs)."""

import json
import os

import pytest
import torch
from PIL import Image, ImageColor

from smca import plot_logs
from smca.visualize import CAPTION_BACKGROUND, CAPTION_TEXT, MIN_DRAWN_SIDE, PALETTE, draw_detections


def _grey(height, width):
    return torch.full((3, height, width), 100, dtype=torch.uint8)


def _detections(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    labels = torch.tensor(labels or [1] * len(boxes))
    scores = torch.linspace(0.9, 0.5, len(boxes))
    return boxes, labels, scores


def _caption_strip(drawn, picture_height):
    return drawn[:, picture_height:]


def test_small_images_are_drawn_enlarged_with_a_threshold_caption():
    boxes, labels, scores = _detections([[10, 10, 60, 60], [12, 12, 62, 58]])
    drawn = draw_detections(_grey(128, 96), boxes, labels, scores, {1: "ellipse"}, threshold=0.3)
    scale = MIN_DRAWN_SIDE / 96  # the shorter side becomes MIN_DRAWN_SIDE
    height, width = round(128 * scale), MIN_DRAWN_SIDE
    assert drawn.dtype == torch.uint8 and drawn.shape[0] == 3 and drawn.shape[2] == width
    strip = _caption_strip(drawn, height)
    assert 10 <= strip.shape[1] <= 60  # one line of text
    background = torch.tensor(ImageColor.getrgb(CAPTION_BACKGROUND), dtype=torch.uint8)[:, None, None]
    text = torch.tensor(ImageColor.getrgb(CAPTION_TEXT), dtype=torch.uint8)[:, None, None]
    assert (strip == text).all(0).sum() > 50  # the caption's letters
    assert (strip == background).all(0).float().mean() > 0.5
    # The box is drawn where the enlarged image has it: its colour on its left edge.
    colour = torch.tensor(ImageColor.getrgb(PALETTE[1]), dtype=torch.uint8)
    assert (drawn[:, round(40 * scale), round(10 * scale)] == colour).all()


def test_the_caption_says_the_threshold():
    boxes, labels, scores = _detections([[10, 10, 60, 60]])
    one = draw_detections(_grey(128, 128), boxes, labels, scores, threshold=0.3)
    other = draw_detections(_grey(128, 128), boxes, labels, scores, threshold=0.75)
    assert one.shape == other.shape
    strips = [_caption_strip(d, MIN_DRAWN_SIDE) for d in (one, other)]
    assert not torch.equal(strips[0], strips[1])  # another number written
    assert torch.equal(one[:, :MIN_DRAWN_SIDE], other[:, :MIN_DRAWN_SIDE])


def test_no_caption_without_threshold_and_no_detections_still_drawn():
    empty = torch.zeros(0, 4)
    drawn = draw_detections(_grey(64, 64), empty, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert drawn.shape == (3, MIN_DRAWN_SIDE, MIN_DRAWN_SIDE)
    drawn = draw_detections(_grey(64, 64), empty, torch.zeros(0, dtype=torch.long), torch.zeros(0), threshold=0.5)
    assert drawn.shape[1] > MIN_DRAWN_SIDE


def test_big_images_keep_their_size():
    image = torch.randint(0, 256, (3, 600, 800), dtype=torch.uint8)
    boxes, labels, scores = _detections([[100, 100, 300, 300]])
    drawn = draw_detections(image, boxes, labels, scores)
    assert drawn.shape == (3, 600, 800)
    with_caption = draw_detections(image, boxes, labels, scores, threshold=0.5)
    assert with_caption.shape[2] == 800 and with_caption.shape[1] > 600
    assert torch.equal(with_caption[:, :600], drawn)


def _label_rectangles(drawn, colour):
    """Rows of the picture where a filled label of `colour` (rows with a long run of it) lies."""
    target = torch.tensor(ImageColor.getrgb(colour), dtype=torch.uint8)[:, None, None]
    return (drawn == target).all(0).sum(1)  # pixels of that colour per row


def test_labels_of_overlapping_boxes_do_not_overlap():
    from smca.visualize import _place_label

    taken = []
    box = (40.0, 40.0, 200.0, 200.0)
    for _ in range(4):  # four detections of the same box
        x, y = _place_label(box, (80.0, 20.0), taken, (512, 512))
        rect = (x, y, x + 80.0, y + 20.0)
        assert all(not (rect[0] < o[2] and o[0] < rect[2] and rect[1] < o[3] and o[1] < rect[3]) for o in taken)
        assert 0 <= y and y + 20 <= 512
        taken.append(rect)
    assert taken[0][1] == 20.0  # the first above the box, the second inside it at the top
    assert taken[1][1] == 40.0
    # A box at the picture's top edge: its label goes inside.
    x, y = _place_label((0.0, 0.0, 100.0, 100.0), (80.0, 20.0), [], (512, 512))
    assert (x, y) == (0.0, 0.0)


def test_label_font_grows_with_the_drawn_size():
    boxes, labels, scores = _detections([[10, 10, 60, 60]], [2])
    small = draw_detections(_grey(128, 128), boxes, labels, scores, min_side=0)  # not enlarged
    big = draw_detections(_grey(128, 128), boxes, labels, scores)
    huge = draw_detections(_grey(128, 128), boxes, labels, scores, min_side=2048)
    rows = [int((_label_rectangles(d, PALETTE[2]) > 25).sum()) for d in (small, big, huge)]  # the label's height
    assert 0 < rows[0] < rows[1] < rows[2] and rows[2] > 3 * rows[1]


# --- training curves ------------------------------------------------------------------


def _write_log(folder, epochs=3, steps_per_epoch=4, with_step=True, evaluated=True):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as f:
        for epoch in range(epochs):
            line = {"epoch": epoch, "n_parameters": 10}
            if with_step:
                line["step"] = steps_per_epoch * (epoch + 1)
            for split in ("train", "test") if evaluated else ("train",):
                for term in ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error"):
                    line[f"{split}_{term}"] = 10.0 / (epoch + 1)
            line["train_lr"] = 1e-4
            if evaluated:
                line["test_coco_eval_bbox"] = [0.1 * epoch] * 6 + [-1.0] * 6
            f.write(json.dumps(line) + "\n")
        f.write('{"epoch": 3, "train_lo')  # a line cut short by a killed run
    return str(folder)


def test_plot_logs_writes_one_picture_for_several_runs(tmp_path, capsys):
    runs = [_write_log(tmp_path / "a"), _write_log(tmp_path / "b", steps_per_epoch=8)]
    out = tmp_path / "pictures" / "curves.png"
    plot_logs.main(runs + ["--output", str(out)])
    with Image.open(out) as picture:
        assert picture.size[0] > 800 and picture.size[1] > 500
    assert "2 runs, 6 panels" in capsys.readouterr().out
    fig = plot_logs.plot_logs(runs, ["loss", "AP", "lr"])
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["loss", "AP (val)", "lr"]
    loss = panels[0].get_lines()
    assert len(loss) == 4  # train and val per run
    assert list(loss[2].get_xdata()) == [8, 16, 24]  # run b's steps
    assert len(panels[1].get_lines()) == 2
    assert list(panels[1].get_lines()[0].get_ydata()) == pytest.approx([0.0, 0.1, 0.2])


def test_plot_logs_against_epochs_and_log_files(tmp_path):
    run = _write_log(tmp_path / "old", with_step=False)
    with pytest.raises(plot_logs.PlotLogsError, match=r"lacks 'step'.*--x epoch"):
        plot_logs.plot_logs([run])
    fig = plot_logs.plot_logs([os.path.join(run, "log.txt")], ["class_error"], x="epoch")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 1, 2]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "no such directory"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no log.txt in it"),
        (lambda p: (p / "blank").mkdir() or (p / "blank" / "log.txt").write_text("") or str(p / "blank"), "no epoch"),
    ],
    ids=["missing", "no-log", "empty-log"],
)
def test_a_bad_run_dir_is_a_clear_error_naming_it(tmp_path, capsys, make, message):
    good = _write_log(tmp_path / "good")
    bad = make(tmp_path)
    out = tmp_path / "curves.png"
    with pytest.raises(SystemExit) as exit_info:
        plot_logs.main([good, bad, "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"RUN_DIR {bad!r}" in err and message in err
    assert not out.exists()


def test_a_field_no_run_has_is_named(tmp_path, capsys):
    run = _write_log(tmp_path / "run")
    with pytest.raises(SystemExit):
        plot_logs.main([run, "--fields", "loss", "loss_mask", "--output", str(tmp_path / "c.png")])
    assert "field 'loss_mask'" in capsys.readouterr().err


def test_a_run_without_evaluation_plots_its_training_curves(tmp_path, capsys):
    """A --no_eval run logs no val numbers: the default panels are those it has."""
    run = _write_log(tmp_path / "no_eval", evaluated=False)
    plot_logs.main([run, "--output", str(tmp_path / "c.png")])
    assert "1 run, 5 panels" in capsys.readouterr().out
    titles = [ax.get_title() for ax in plot_logs.plot_logs([run]).axes if ax.axison]
    assert titles == ["loss", "loss_ce", "loss_bbox", "loss_giou", "class_error"]
    with pytest.raises(plot_logs.PlotLogsError, match="field 'AP'"):
        plot_logs.plot_logs([run], ["loss", "AP"])
