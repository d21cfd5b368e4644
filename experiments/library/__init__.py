"""The suite library: what a suite is (`base`: members, scales, seeds, claims), the verdict rule
(`stats`, `checks`), the results file (`results`), the figure helpers (`plots`) and where a
measurement came from (`provenance`)."""
