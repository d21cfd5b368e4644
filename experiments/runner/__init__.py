"""The runner of a suite: which runs to train and how they are recorded (`steps`), one run's
directory (`run_dir`), and the launchers behind one interface (`steps.Launcher`): here
(`local`) or as a SLURM job array (`slurm`, `slurm_task`, `slurm_status`); `sweep` is the entry
point of `python -m experiments.run`."""
