"""Moving KV between processes: wire messages and block-layout gather/scatter.

Never imports `engine`: it takes cache tensors and block ids, not engine types.
"""
