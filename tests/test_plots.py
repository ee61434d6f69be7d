import numpy as np
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
