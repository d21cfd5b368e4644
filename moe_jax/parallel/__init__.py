"""Running on many devices: meshes and logical-axis rules (`sharding`), the MoE layer's expert
parallelism (`expert_parallel`) with its ragged all-to-all of routed rows (`ragged_exchange`),
and joining a multi-process run (`distributed`)."""
