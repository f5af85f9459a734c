"""The pre-training harness: config, DeepSpeed engine, loop, checkpoints, evaluation."""

EXIT_PREEMPTED = 85  # a signal (SIGTERM/SIGUSR1) stopped the run after a checkpoint: requeue it
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) stopped the run after a checkpoint: rerun the command to resume
