"""Flax LoRA layers and injection (needs ``flax``: ``pip install rplora_jax[flax]``).

* `rplora_jax.layers.config`: [`LoRAConfig`][rplora_jax.layers.config.LoRAConfig], the one set of
  LoRA options, and what the layers share (initialisers, the einsum split). Imports no Flax.
* `rplora_jax.layers.lora_linen`: ``LoRADense``, ``LoRADenseGeneral``, ``LoRAEinsum``
  (subclasses of ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``).
* `rplora_jax.layers.lora_nnx`: ``LoRALinear``, ``LoRALinearGeneral``, ``LoRAEinsum``
  (subclasses of ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``).
* `rplora_jax.layers.inject`: [`inject_linen`][rplora_jax.layers.inject.inject_linen],
  [`inject_nnx`][rplora_jax.layers.inject.inject_nnx]: LoRA added to an existing model by regex
  on module paths.

Nothing is imported here, so ``rplora_jax.layers.config`` stays free of Flax.
"""
