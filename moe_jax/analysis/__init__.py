"""What a config costs, measured without training it: parameters and FLOPs (`flops`), bytes
(`memory`), and what XLA compiled (`compiled_hlo`: collectives, memory, cost; `kernels_hlo`:
which grouped-matmul kernels) for a TPU topology (`topology`), read into the dry-run report
(`dryrun_report`)."""
