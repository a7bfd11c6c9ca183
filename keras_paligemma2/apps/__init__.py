"""Applications on top of the model: the command line, evaluation metrics,
drawing of outputs and the synthetic shapes data set."""
