"""Benchmarks: pre-training throughput per task set (Table 1) and its analytic FLOPs model."""
