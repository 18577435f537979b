"""What a run writes down: the records (metrics), the append-only results file and resuming from it
(results), per-stage spans and traces (timeline), Slurm accounting (sacct)."""
