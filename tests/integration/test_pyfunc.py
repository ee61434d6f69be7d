"""The pyfunc model as logged: no warning per trial about an input example."""

import warnings

import mlflow
import numpy as np
import pytest

from tracking import pyfunc


@pytest.mark.parametrize("quiet", [False, True])
def test_saving_the_model_warns_about_no_input_example_only_unless_quieted(tmp_path, quiet):
    export = tmp_path / "export"
    export.mkdir()
    (export / "labels.txt").write_text("a\nb\n")
    signature = mlflow.models.infer_signature(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 2), np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's settings ignore UserWarning; see every warning here
        if quiet:
            pyfunc.quiet_input_example_warning()
        mlflow.pyfunc.save_model(path=str(tmp_path / "model"), python_model=str(pyfunc.MODEL_CODE),
                                 artifacts={"export": str(export)}, signature=signature, pip_requirements=["numpy"])
    about_example = [w for w in caught if "input example was not provided" in str(w.message)]
    assert len(about_example) == (0 if quiet else 1)  # MLflow's real message, matched by the filter
