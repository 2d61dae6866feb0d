"""Shared machinery for the curriculum stages: run directories, models, generation, guards,
checks, judging, pairs, DPO training, merging and assessment."""
