"""The pre-training harness: config, DeepSpeed engine, loop, checkpoints, evaluation."""

EXIT_PREEMPTED = 85  # a signal (SIGTERM/SIGUSR1) stopped the run after a checkpoint: requeue it
