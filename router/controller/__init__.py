"""The cluster's controller: moves adaptive workers between roles as the load asks
(`decide`, a pure rule), elected among the routers through Redis (`election`), its state
in Redis (`store`), run on each router's event loop (`loop`)."""

from pdserve.router.controller.decide import ControllerConfig

__all__ = ["ControllerConfig"]
