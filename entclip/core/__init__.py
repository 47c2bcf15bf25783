"""The pure math: the theory's token statistics and predictions (theory), the GRPO loss and the paper's
filters (losses), and the other entropy-control methods (methods). Tensors and numbers in, tensors
out; never a config object. The bottom layer: it imports nothing else of entclip."""
