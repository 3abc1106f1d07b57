"""What MLflow runs to load a logged orch model (MLflow's "models from code", no pickle): the pyfunc it serves.

Logged with every model by orchestrator.trained.mlflow_model.log_model; it imports orch from the code logged beside it.
"""

import mlflow

from orchestrator.trained.mlflow_model import OrchPyfunc

mlflow.models.set_model(OrchPyfunc())
