"""One module per curriculum stage, each readable top to bottom."""
