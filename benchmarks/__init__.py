"""Throughput and memory figures, run on demand (`make bench`); never timed tests."""
