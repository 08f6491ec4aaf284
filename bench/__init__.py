"""pdserve's benchmarks: the serving load generator, SLO/goodput sweeps, microbenchmarks."""
