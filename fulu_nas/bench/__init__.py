"""Benchmarks: the layer's execution paths (torch alone), the original spec's optimisation levels, and the
tasks. ``fulu-nas bench --help`` lists them."""
