"""The analysis's defaults, torch-free so that `rasa-lora analyze --help` stays light."""

INITS = ("stacked", "theorem", "random")
DEFAULT_INIT = "auto"
DEFAULT_TOL = 1e-5  # stop when the error falls by less than this fraction per iteration, on average over
DEFAULT_WINDOW = 5  # the last DEFAULT_WINDOW iterations
DEFAULT_MAX_ITERS = 200
