"""The Table 2 reproduction as one chain of Slurm jobs under one run root: `plan` (stages, configs,
resources, what a rerun does), `slurm` (sbatch / squeue, submit and wait), `stages` (export, evaluation and
report inside their jobs) and `report` (our numbers next to the paper's)."""
