"""Published MoE models, for parameter and FLOP counts."""
