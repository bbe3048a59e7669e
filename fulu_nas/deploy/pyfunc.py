"""The MLflow pyfunc of an exported model ("models from code": MLflow copies this file into the
model and runs it when loading, so nothing is unpickled). Needs torch, numpy and mlflow only.

Input: token ids, shape (batch, seq) (or (seq,) for one sequence). Output: logits
(batch, seq, classes) from the ``torch.export`` program ``model.pt2``.
"""

import mlflow
import numpy as np
import torch


class ExportedProgramModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.module = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        tokens = torch.as_tensor(np.asarray(model_input), dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens[None]
        with torch.no_grad():
            return self.module(tokens).float().numpy()


mlflow.models.set_model(ExportedProgramModel())
