"""Cost models of a worker: measured on this machine (`pdserve profile`) or derived from a
GPU datasheet (a roofline); what the simulator (`bench.sim`) and planner read."""
