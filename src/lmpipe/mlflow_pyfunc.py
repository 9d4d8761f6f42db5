"""The file MLflow runs to build an lmpipe pyfunc model when it loads one (models from code:
nothing is unpickled). See `lmpipe.mlflow_model`."""

import mlflow.models

from lmpipe.mlflow_model import LmpipeModel, quiet_warnings

with quiet_warnings():
    mlflow.models.set_model(LmpipeModel())
