"""The router: pdserve's public gRPC API, request lifecycle, routing and admission, the
Redis registry. Never imports torch: it reaches workers through `router.handles`."""
