"""What a deployed model needs: the export format and its verified loader, the MLflow pyfunc, CUDA-graph
serving. Torch and safetensors only, except the pyfunc (MLflow)."""
