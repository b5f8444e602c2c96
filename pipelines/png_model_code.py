"""Models-from-code entry of the logged generator: MLflow executes this file on load to get the
pyfunc (no pickled Python object in the model, so loading needs no pickle opt-in)."""

from mlflow.models import set_model

from pipelines.png_model import PngGenerator

set_model(PngGenerator())
