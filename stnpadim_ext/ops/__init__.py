"""The two custom ops: dispatch to the compiled kernels, pure-PyTorch references as oracle."""
