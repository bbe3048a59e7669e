"""The MLflow pyfunc of an exported model ("models from code": MLflow copies this file into the
model and runs it when loading, so nothing is unpickled). Needs torch, numpy and mlflow only;
``pt2_check`` is shipped beside it in the model's ``code/`` folder.

Input: token ids, an integer array of shape (batch, seq), or ``{"token_ids": ids}`` (how MLflow passes
the signature's named input); JSON from the scoring server arrives uncast, and any value that is not an
integer (a float, a boolean) is refused. Output: logits (batch, seq, classes) from the ``torch.export``
program ``artifacts/model.pt2``, loaded only after its SHA-256 matches the one in the model's
configuration and nothing in it would be unpickled. Bad input is refused
with one short ``MlflowException`` (the scoring server answers it as JSON, without a stack trace).
"""

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

INPUT_NAME = "token_ids"  # the signature's input (fulu_nas.deploy.export.INPUT_NAME; this file imports no fulu_nas)


def bad_input(message: str) -> MlflowException:
    return MlflowException(f"tokens: {message}", error_code=INVALID_PARAMETER_VALUE)


class ExportedProgramModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        # Imported here: MLflow puts the model's code/ folder on sys.path only when it loads the saved
        # model, after it has run this file once to save it.
        from pt2_check import load_program

        config = context.model_config or {}
        if "program_sha256" not in config:
            raise MlflowException("this model has no program_sha256 in its configuration (exported by an "
                                  "older fulu-nas): export it again", error_code=INVALID_PARAMETER_VALUE)
        self.vocab_size, self.max_seq_len, self.max_batch = (config["vocab_size"], config["max_seq_len"],
                                                             config["max_batch"])
        self.module = load_program(context.artifacts["program"], config["program_sha256"]).module()

    def tokens(self, model_input) -> torch.Tensor:
        """The input as a (batch, seq) int64 tensor, or one message naming what is wrong with it."""
        if isinstance(model_input, dict) and list(model_input) == [INPUT_NAME]:
            model_input = model_input[INPUT_NAME]  # MLflow's form of an input the signature names
        try:
            array = np.asarray(model_input)
        except ValueError:  # a ragged list (numpy refuses to make it an array)
            raise bad_input("expected shape (batch, seq), got rows of different lengths") from None
        if array.ndim == 1 and array.dtype == object and array.size and \
                all(isinstance(row, (list, tuple, np.ndarray)) for row in array):
            # MLflow's scoring server hands a ragged JSON batch over as an object array of its rows
            if len({len(row) for row in array}) > 1:
                raise bad_input("expected shape (batch, seq), got rows of different lengths")
            array = np.array([list(row) for row in array], dtype=object)
        if array.ndim != 2:
            raise bad_input(f"expected shape (batch, seq), got shape {array.shape}")
        if array.dtype == object:
            # JSON as MLflow's scoring server parses it for this model's object signature: the values as
            # sent, not cast (a cast to int64 would truncate 1.9 and read true as 1). Integers only.
            for value in array.flat:
                if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                    raise bad_input(f"expected integer token ids, got {value!r:.40} ({type(value).__name__})")
        elif array.dtype.kind not in "iu":
            raise bad_input(f"expected integer token ids, got dtype {array.dtype}")
        batch, seq = array.shape
        if not (1 <= batch <= self.max_batch and 1 <= seq <= self.max_seq_len):
            raise bad_input(f"expected at most {self.max_batch} sequences of at most {self.max_seq_len} tokens, "
                            f"none empty, got shape {array.shape}")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.vocab_size:
            raise bad_input(f"token ids must be in 0..{self.vocab_size - 1} (the vocabulary), got {low}..{high}")
        return torch.as_tensor(array.astype(np.int64, copy=False), dtype=torch.long)

    # Annotated so that MLflow infers nothing from the hint and does not ask for one each time the model is
    # saved or loaded; tokens() validates the input (an array, or MLflow's {"token_ids": array}).
    def predict(self, context, model_input: np.ndarray, params=None):
        tokens = self.tokens(model_input)
        with torch.no_grad():
            try:
                logits = self.module(tokens)
            except Exception as e:  # noqa: BLE001 - one short message, not the program's traceback in the answer
                problem = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                raise MlflowException(f"the model's program failed on this input ({type(e).__name__}: {problem})",
                                      error_code=INTERNAL_ERROR) from None
        return logits.float().numpy()


mlflow.models.set_model(ExportedProgramModel())
