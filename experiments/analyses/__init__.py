"""Analyses of suites and trained runs: the report of a results file (`report`, the library of
`python -m experiments.report`), the routing analysis of a trained checkpoint (`routing_stats`)
and the fine-tuning stage of the routing_drift suite (`drift_finetune`)."""
