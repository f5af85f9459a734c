#!/bin/bash
# The tiny model on a synthetic corpus, 2 CPU tasks with expert parallelism over both (ep_size=2; the
# config's global batch 32 = 16 per rank x 2 ranks): the smoke test of the launcher and the requeue path
# (tests/test_slurm.py runs it on slurm/local_cluster.sh).
#   sbatch --wait slurm/pretrain_tiny.sh --run-dir /tmp/eve_tiny train.max_steps=20
#SBATCH --job-name=eve-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=1500
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=USR1@60
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
exec "${EVE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" --config eve_tiny_synthetic model.ep_size=2 train.micro_batch_size=16 "$@"
