"""Reproducing the paper: its numbers (`paper`), the Table 2 chain of Slurm jobs (`chain`), the pre-training
ablations of Tables 5 and 6 (`ablations`) and the fine-tuning gain from pre-training (`init_gain`)."""
