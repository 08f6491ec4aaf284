"""pdserve's public API for Python: stubs generated from `proto/` and a typed async client.

Imports only grpc and protobuf, so a client needs nothing else from pdserve.
"""
