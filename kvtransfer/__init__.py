"""Moving KV between processes: wire messages, transports, block-layout gather/scatter.

The seam is `base` (KVSender, KVReceiver, TransferStatus); `transports` picks one by
TransportKind. ZMQ and TORCH share one control plane per side (`sender`, `receiver`, with
`links`, `mailbox`, `commands`, `outgoing`, `assembly`), composed with a payload channel
(`channel`: `inline_channel` or `torch_channel` + `torch_pairs`); every transport frames
through `frames`; INPROC is the fake of `inproc`. Never imports `engine`: it takes cache
tensors and block ids, not engine types.
"""
