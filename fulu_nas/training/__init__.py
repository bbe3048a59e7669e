"""Training a model on a task (one device, data parallel or expert parallel), dynamic expert scaling,
and the evaluation every trial runs."""
