"""A discrete-event simulator of a pdserve cluster (`pdserve simulate`) and the placement
planner on top of it (`pdserve plan`)."""
