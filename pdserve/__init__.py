"""pdserve: LLM serving with disaggregated prefill and decode.

Everything the project installs lives under this one import name. The repository keeps each
part in its own top-level folder, mapped here by `pyproject.toml`:

    pdserve.protocol        the contract between router and workers (torch-free)
    pdserve.engine          the inference engine
    pdserve.models          built-in models and their one-time conversion
    pdserve.kvtransfer      moving KV between processes
    pdserve.worker          what every worker is built on (engine loop, published state)
    pdserve.prefill_worker  prefill worker
    pdserve.decode_worker   decode and colocated workers
    pdserve.rpc             the public gRPC API's stubs and a typed client
    pdserve.router          the router (gRPC server, lifecycle, policies, registry)
    pdserve.deploy          the `pdserve` command line, local and Ray clusters
    pdserve.bench           load generator, SLO sweeps and microbenchmarks
"""

__version__ = "0.1.0"
