import numpy as np
import pytest
from PIL import Image

from tracking import plots


def test_learning_curves_and_confusion_matrix_are_pngs(tmp_path):
    history = {"accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.6, 0.7, 0.75], "loss": [1.0, 0.6, 0.4],
               "val_loss": [0.9, 0.7, 0.6]}
    curve = plots.learning_curves(history, fine_tune_start=2, path=tmp_path / "curves.png")
    matrix = plots.confusion_matrix(np.array([[3, 1], [0, 4]]), ["cat", "dog"], tmp_path / "cm.png")
    for path in (curve, matrix):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200


def test_prediction_grid_titles_right_in_blue_and_wrong_in_red_with_the_truth(tmp_path):
    names = ["daisy", "rose", "tulip"]
    assert plots.grid_titles([0, 1, 2], [0, 2, 2], names) == [
        ("daisy", "blue"), ("tulip (rose)", "red"), ("tulip", "blue")]
    images = np.full((5, 24, 24, 3), 128.0)  # grey: any red or blue comes from the titles
    path = plots.prediction_grid(images, [0, 1, 2, 0, 1], [0, 2, 2, 1, 1], names, tmp_path / "grid.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    red = ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum()
    blue = ((pixels[:, 2] > 200) & (pixels[:, 0] < 60) & (pixels[:, 1] < 60)).sum()
    assert red > 20 and blue > 20, "titles are drawn in red and blue"


def test_sweep_charts_by_backbone_and_parallel_coordinates(tmp_path):
    by = plots.by_backbone({"mobilenet_v2": [0.8, 0.85], "efficientnet_lite0": [0.9]}, tmp_path / "by.png")
    par = plots.parallel_coordinates(
        {"backbone": ["a", "b", "a"], "learning_rate": [1e-4, 1e-3, 1e-2], "dropout": [0.1, 0.2, 0.3]},
        [0.7, 0.9, 0.8], tmp_path / "par.png")
    for path in (by, par):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_parallel_coordinates_axes_of_tied_scores_and_missing_values(tmp_path):
    """Tied scores are one tick (not the same value at both ends); a head-only trial's missing fine_tune_at is
    one ``n/a`` tick below the numbers, which keep their numeric axis (not categories with a "None")."""
    scaled, (positions, labels) = plots._axis([0.9, 0.9, 0.9], label=lambda v: f"{v:.3f}")
    assert labels == ["0.900"] and positions == [0.5] and list(scaled) == [0.5] * 3
    scaled, (positions, labels) = plots._axis(["0.75", "None", "0.9", None])
    assert labels == [plots.MISSING, "0.75", "0.9"] and "None" not in labels
    assert scaled[1] == scaled[3] == 0.0 and 0.0 < scaled[0] < scaled[2] == pytest.approx(1.0)
    scaled, (_, labels) = plots._axis(["a", "b", float("nan")])
    assert labels == [plots.MISSING, "a", "b"]
    path = plots.parallel_coordinates({"fine_tune_at": ["0.75", "None", "0.9"], "dropout": [0.1, 0.1, 0.2]},
                                      [0.9, 0.9, 0.9], tmp_path / "par.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
