"""Cluster launch, placement and the `pdserve` command line."""
