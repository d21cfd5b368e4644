"""Benchmarks (not tests): they print measured figures and write them to files."""
