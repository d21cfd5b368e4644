"""What every part of moe_jax shares, below the MoE layer: config field checks (`fields`), the
command-line and Markdown-table helpers of the programs (`cli`), and run-directory paths on a
local disk or object storage (`storage`)."""
