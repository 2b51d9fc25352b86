"""A small parameter tree with a plain pair, a stacked bf16 pair and a non-LoRA leaf."""

import jax.numpy as jnp
import numpy as np


def params_tree():
    # numpy draws: no per-op compilation, which dominates small tests on CPU.
    rng = np.random.default_rng(0)

    def normal(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)

    return {
        "q": {
            "kernel": normal(6, 5),
            "bias": jnp.zeros((5,)),
            "lora_a": normal(6, 2),
            "lora_b": normal(2, 5),
        },
        # Stacked layers (nn.scan) with bf16 factors.
        "stack": {
            "kernel": normal(3, 4, 4),
            "lora_a": normal(3, 4, 2, dtype=jnp.bfloat16),
            "lora_b": normal(3, 2, 4, dtype=jnp.bfloat16),
        },
        "embed": jnp.ones((7, 4)),
    }
