"""MLflow models-from-code entry (regft.registry logs this file, not a pickle): the pyfunc
model whose artifact `export` is a regft export folder (safetensors + JSON)."""
import mlflow

from regft.registry import RegftPyfuncModel

mlflow.models.set_model(RegftPyfuncModel())
