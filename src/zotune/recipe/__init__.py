"""The training recipe: the run config, the train loop, evaluation and replay of runs, reports and checkpoints."""
