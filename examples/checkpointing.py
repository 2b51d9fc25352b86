"""Exact checkpoint and resume of a training run with orbax-checkpoint.

Run ``python examples/checkpointing.py``: it trains a LoRA pair with scaled AdamW for 20 steps
straight, and again for 8 steps, a save, a restore into fresh state and 12 more steps, and checks
that both end bit for bit equal (parameters and optimizer state; it exits with status 1 if
not). Copy :class:`TrainCheckpointer` into your project (it needs ``orbax-checkpoint``, from a
checkout ``pip install -e ".[examples]"``).

:class:`TrainCheckpointer` saves ``params``, the optimizer state and the step of a run, and restores
them onto the shardings of templates you pass, so a preempted job resumes bit-identically: ``N``
steps straight equal ``k`` steps, save, restart, restore, ``N - k`` steps. The preconditioner keeps
no state of its own, so everything to save is in ``params`` and ``opt_state``; the data order and
any randomness must be a function of the step for the trajectory to match.

Multi-host: every process calls :meth:`TrainCheckpointer.save` and
:meth:`TrainCheckpointer.restore` with its global ``jax.Array`` values; orbax writes and reads only
the shards each process owns (the directory must be shared storage, e.g. a GCS bucket).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

_STATE = "state"


def _abstract(tree: Any) -> Any:
    """Shape, dtype and sharding of every array leaf: where restored arrays go.

    ``tx.init`` creates optax's step counters uncommitted on one device, and ``jax.eval_shape``
    gives leaves no sharding (Auto mesh axes) or one on an abstract mesh (Explicit axes);
    restored as they are, they would land on one device, or nowhere, and clash with the mesh in
    the next jitted step. So a leaf on one device or without a sharding is placed replicated over
    the mesh of the template's sharded leaves, and an abstract-mesh sharding is bound to that
    mesh with its spec.
    """
    meshes = [
        x.sharding.mesh
        for x in jax.tree.leaves(tree)
        if isinstance(getattr(x, "sharding", None), NamedSharding)
        and isinstance(x.sharding.mesh, Mesh)
    ]
    mesh = meshes[0] if meshes else None

    def one(x):
        if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            return ocp.utils.to_shape_dtype_struct(x)
        sharding = x.sharding
        if mesh is None:
            pass
        elif sharding is None or isinstance(sharding, SingleDeviceSharding):
            sharding = NamedSharding(mesh, PartitionSpec())
        elif isinstance(sharding, NamedSharding) and not isinstance(sharding.mesh, Mesh):
            sharding = NamedSharding(mesh, sharding.spec)  # an AbstractMesh from jax.eval_shape
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class TrainCheckpointer:
    """Saves and restores ``(step, params, opt_state)`` of a training run.

    A thin layer over ``orbax.checkpoint.CheckpointManager``: one checkpoint per saved step under
    ``directory``, the oldest deleted beyond ``max_to_keep``, writes asynchronous by default (call
    :meth:`wait_until_finished` or :meth:`close` before the process exits).

    Args:
      directory: where checkpoints go; created if missing. Absolute paths or ``gs://`` URLs.
      max_to_keep: number of most recent checkpoints kept; ``None`` keeps all.
      save_interval_steps: :meth:`save` writes the first step it is given and then only
        multiples of this (unless ``force``), as orbax's ``CheckpointManager`` does.
      enable_async: write in a background thread while training continues.

    Example:
      >>> import tempfile, jax.numpy as jnp, rplora_jax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> opt_state = rplora_jax.scaled_adamw(1e-3).init(params)
      >>> with TrainCheckpointer(tempfile.mkdtemp()) as ckpt:
      ...     _ = ckpt.save(10, params, opt_state)
      ...     step, params, opt_state = ckpt.restore(params, opt_state)
      >>> step
      10
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        enable_async: bool = True,
    ):
        directory = os.fspath(directory)
        if "://" not in directory:
            # orbax requires absolute local paths.
            directory = os.path.abspath(directory)
        self.directory = directory
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_interval_steps,
                enable_async_checkpointing=enable_async,
            ),
            item_names=(_STATE,),
        )

    def save(self, step: int, params: Any, opt_state: Any, *, force: bool = False) -> bool:
        """Saves the state reached after ``step`` optimizer steps.

        Args:
          step: number of steps taken so far; the checkpoint's name.
          params: parameter pytree of ``jax.Array`` (sharded or not).
          opt_state: the optimizer state for ``params``.
          force: save even if ``step`` is not on ``save_interval_steps``.

        Returns:
          Whether a checkpoint was started.
        """
        state = {"params": params, "opt_state": opt_state}
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state)}),
            force=force,
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(
        self, params: Any, opt_state: Any, *, step: int | None = None
    ) -> tuple[int, Any, Any]:
        """Restores a checkpoint onto the structure, dtypes and shardings of templates.

        Args:
          params: template: arrays or ``jax.ShapeDtypeStruct`` (with ``sharding=``) of the
            parameters, e.g. a freshly initialised, sharded model, or ``jax.eval_shape`` output
            with shardings attached. Only shapes, dtypes and shardings are read.
          opt_state: template of the optimizer state, e.g. ``tx.init(params)`` (sharded like
            ``params``), or ``jax.eval_shape(tx.init, params)``: on a mesh of Auto axes its
            leaves carry no sharding and come back replicated over the mesh; on Explicit axes
            they keep the specs ``eval_shape`` gives them.
          step: which checkpoint; ``None`` for the newest.

        Returns:
          ``(step, params, opt_state)``, arrays placed with the templates' shardings (template
          leaves on a single device or without a sharding, such as optax's step counts,
          replicated over the mesh of its sharded leaves).

        Raises:
          FileNotFoundError: if there is no checkpoint (or not ``step``) in the directory.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint in '{self.directory}'.")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"No checkpoint for step {step} in '{self.directory}'; saved steps: "
                f"{self.all_steps()}."
            )
        target = _abstract({"params": params, "opt_state": opt_state})
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        )[_STATE]
        return int(step), restored["params"], restored["opt_state"]

    def wait_until_finished(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main() -> None:
    import tempfile

    import jax.numpy as jnp
    import optax

    import rplora_jax

    tx = rplora_jax.scaled_adamw(1e-2)
    key_a, key_b = jax.random.split(jax.random.key(0))
    init = {
        "lora_a": jax.random.normal(key_a, (16, 4)),
        "lora_b": 0.1 * jax.random.normal(key_b, (4, 8)),
    }

    @jax.jit
    def step(params, opt_state, t):
        # The batch is a function of the step, so a resumed run sees the same data.
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (32, 16))
        loss = lambda p: jnp.mean((x @ p["lora_a"] @ p["lora_b"] - 1.0) ** 2)
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def train(params, opt_state, steps):
        for t in steps:
            params, opt_state = step(params, opt_state, t)
        return params, opt_state

    straight = train(init, tx.init(init), range(20))
    with tempfile.TemporaryDirectory() as directory:
        params, opt_state = train(init, tx.init(init), range(8))
        with TrainCheckpointer(directory) as ckpt:
            ckpt.save(8, params, opt_state)
        with TrainCheckpointer(directory) as ckpt:  # as after a restart: fresh templates
            step8, params, opt_state = ckpt.restore(init, tx.init(init))
        resumed = train(params, opt_state, range(step8, 20))
    pairs = zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True)
    same = all(bool((x == y).all()) for x, y in pairs)
    print(f"restored step {step8}; 20 straight steps == 8 + save/restore + 12: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
