"""Benchmarks: the layer's execution paths (torch alone), the original spec's optimisation levels, the
tasks, and the cost measurement every trial runs. ``fulu-nas bench --help`` lists them."""
