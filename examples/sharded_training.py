"""Sharded LoRA training with ``jax.jit`` on a ``('data', 'model')`` mesh, with scaled AdamW.

The batch is split over ``data``; each frozen kernel is sharded over both axes (FSDP over one,
tensor parallel over the other: Megatron-style, column-parallel then row-parallel), and each LoRA
pair like its kernel (``a`` with the kernel's rows, ``b`` with its columns, rank replicated; see
:mod:`rplora_jax.sharding`). XLA inserts the reductions of the ``r x r`` Grams across shards.

The script verifies, and prints, that

1. the preconditioned gradient of every factor keeps the incoming gradient's sharding;
2. the trained LoRA factors keep their shardings step after step;
3. the sharded run equals the same run on one device (float32, max relative difference < 1e-5).

Each process loads only the rows of the batch its devices hold (``jax.make_array_from_callback``),
so the same script runs on several hosts: pass ``--distributed`` (or set ``RPLORA_DISTRIBUTED=1``)
and it calls ``jax.distributed.initialize()`` first, which finds the coordinator on Cloud TPU,
SLURM and Kubernetes, or takes ``--coordinator``, ``--num-processes`` and ``--process-id``.

    python examples/sharded_training.py                   # CPU: 8 virtual devices
    python examples/sharded_training.py --steps 50 --mesh 2,4
"""

from __future__ import annotations

import argparse
import os
import time

import jax

BATCH, D_IN, D_HIDDEN, D_OUT, RANK = 64, 64, 128, 32, 4
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--mesh", default="4,2", help="data,model axis sizes")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=8,
        help="virtual CPU devices when the backend is CPU (ignored on GPU/TPU)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        default=os.environ.get("RPLORA_DISTRIBUTED", "") == "1",
        help="call jax.distributed.initialize() (multi-host); also RPLORA_DISTRIBUTED=1",
    )
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    return parser.parse_args(argv)


def init_jax(args: argparse.Namespace) -> None:
    """Must run before anything touches a device."""
    if args.distributed:
        # CPU processes need a collectives backend to talk to each other (GPU/TPU ignore this).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        # With no arguments this auto-detects the cluster (Cloud TPU, SLURM, Kubernetes...).
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    else:
        # Only the CPU backend reads it; GPU/TPU hosts keep their real devices.
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)


# Everything below only runs after init_jax.
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rplora_jax  # noqa: E402
from rplora_jax.sharding import lora_specs, named_shardings  # noqa: E402

# Layer 1 is column-parallel over `model` (FSDP over `data` on its rows), layer 2 row-parallel.
KERNEL_SPECS = {"layer1": P("data", "model"), "layer2": P("model", "data")}


def init_params(seed: int = SEED) -> dict:
    """Frozen kernels plus LoRA factors (``b = 0``, so training starts at the base model)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, (d_in, d_out) in {"layer1": (D_IN, D_HIDDEN), "layer2": (D_HIDDEN, D_OUT)}.items():
        params[name] = {
            "kernel": (rng.standard_normal((d_in, d_out)) / d_in**0.5).astype(np.float32),
            "lora_a": (rng.standard_normal((d_in, RANK)) / d_in**0.5).astype(np.float32),
            "lora_b": np.zeros((RANK, d_out), np.float32),
        }
    return params


def param_specs(params: dict) -> dict:
    """Kernel specs by hand; the LoRA factors' specs follow from them."""
    given = {
        k: {n: (KERNEL_SPECS[k] if n == "kernel" else None) for n in v} for k, v in params.items()
    }
    return lora_specs(params, given)


def split(tree: dict) -> tuple[dict, dict]:
    """(LoRA factors, frozen kernels): only the factors are trained."""
    lora = {k: {n: v[n] for n in ("lora_a", "lora_b")} for k, v in tree.items()}
    base = {k: {"kernel": v["kernel"]} for k, v in tree.items()}
    return lora, base


_TEACHER = np.random.default_rng(1234).standard_normal((D_IN, D_OUT)).astype(np.float32) / 8


def load_rows(step: int, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of the global batch of ``step``: what a per-host data loader would read.

    Each row depends only on (step, row), never on which host asks, so any split of the batch
    over hosts and devices sees the same data.
    """
    idx = range(*rows.indices(BATCH))
    x = np.stack([np.random.default_rng([SEED, step, i]).standard_normal(D_IN) for i in idx])
    x = x.astype(np.float32)
    return x, np.tanh(x @ _TEACHER).astype(np.float32)


def global_batch(step: int, sharding: NamedSharding | None) -> tuple[jax.Array, jax.Array]:
    """The step's batch as global arrays; each process builds only its addressable shards."""
    if sharding is None:
        return tuple(jnp.asarray(t) for t in load_rows(step, slice(None)))
    arrays = []
    for which, width in ((0, D_IN), (1, D_OUT)):
        arrays.append(
            jax.make_array_from_callback(
                (BATCH, width), sharding, lambda index, w=which: load_rows(step, index[0])[w]
            )
        )
    return tuple(arrays)


def loss_fn(lora: dict, base: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    for i, name in enumerate(("layer1", "layer2")):
        h = h @ base[name]["kernel"] + (h @ lora[name]["lora_a"]) @ lora[name]["lora_b"]
        if i == 0:
            h = jax.nn.gelu(h)
    return jnp.mean((h - y) ** 2)


def make_train_step(tx: optax.GradientTransformation):
    def train_step(lora, opt_state, base, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(lora, base, x, y)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    # No out_shardings: whatever sharding the outputs get is what XLA propagated.
    return jax.jit(train_step, donate_argnums=(0, 1))


def same_spec(sharding: jax.sharding.Sharding, spec: P, ndim: int) -> bool:
    """Whether ``sharding`` is ``spec`` on the mesh (trailing ``None`` entries ignored)."""
    return isinstance(sharding, NamedSharding) and tuple(sharding.spec) + (None,) * (
        ndim - len(sharding.spec)
    ) == tuple(spec) + (None,) * (ndim - len(spec))


def check_preconditioner_sharding(mesh: Mesh, lora: dict, lora_specs_tree: dict) -> dict:
    """Jits the preconditioner alone on sharded gradients; returns each output's spec."""
    precond = rplora_jax.riemannian_preconditioner()
    shardings = named_shardings(mesh, lora_specs_tree)
    grads = jax.device_put(jax.tree.map(lambda x: x + 0.5, lora), shardings)
    out = jax.jit(lambda g, p: precond.update(g, precond.init(p), p)[0])(grads, lora)
    result = {}
    for (path, leaf), spec in zip(
        jax.tree_util.tree_flatten_with_path(out)[0],
        jax.tree.leaves(lora_specs_tree, is_leaf=lambda s: isinstance(s, P)),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        result[name] = (str(leaf.sharding.spec), same_spec(leaf.sharding, spec, leaf.ndim))
    return result


def train(mesh: Mesh | None, steps: int, lr: float) -> tuple[dict, list[float]]:
    """Trains for ``steps``; on ``mesh`` if given, else on the default device alone."""
    params = init_params()
    lora, base = split(params)
    tx = rplora_jax.scaled_adamw(lr)
    if mesh is not None:
        lspecs, bspecs = split(param_specs(params))
        lora = jax.device_put(lora, named_shardings(mesh, lspecs))
        base = jax.device_put(base, named_shardings(mesh, bspecs))
        batch_sharding = NamedSharding(mesh, P("data", None))
    else:
        lora, base = jax.device_put((lora, base), jax.devices()[0])
        batch_sharding = None
    opt_state = tx.init(lora)
    step_fn = make_train_step(tx)
    losses = []
    for step in range(steps):
        x, y = global_batch(step, batch_sharding)
        lora, opt_state, loss = step_fn(lora, opt_state, base, x, y)
        losses.append(float(loss))
        if mesh is not None:
            for path, leaf in jax.tree_util.tree_flatten_with_path(lora)[0]:
                spec = lspecs[path[0].key][path[1].key]
                if not same_spec(leaf.sharding, spec, leaf.ndim):
                    raise AssertionError(
                        f"step {step}: {jax.tree_util.keystr(path)} has sharding "
                        f"{leaf.sharding}, expected {spec}"
                    )
    return lora, losses


def max_rel_diff(x: dict, y: dict) -> float:
    diffs = jax.tree.map(
        lambda a, b: (
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            / max(float(np.max(np.abs(np.asarray(b)))), 1e-30)
        ),
        x,
        y,
    )
    return max(jax.tree.leaves(diffs))


def make_mesh(shape: tuple[int, int]) -> Mesh:
    """A ``('data', 'model')`` mesh in Auto mode: XLA propagates shardings and inserts collectives.

    (``jax.make_mesh`` defaults to Explicit axes in recent JAX, where every contraction over a
    sharded axis must name its output sharding.)
    """
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(shape, ("data", "model"), axis_types=(auto, auto))


def run(steps: int = 20, lr: float = 1e-2, mesh_shape: tuple[int, int] = (4, 2)) -> dict:
    """Runs all checks and returns their numbers (the tests call this)."""
    if BATCH % mesh_shape[0] or D_HIDDEN % mesh_shape[1]:
        raise SystemExit(
            f"--mesh {mesh_shape[0]},{mesh_shape[1]}: the data axis must divide the batch of "
            f"{BATCH} rows and the model axis the hidden width {D_HIDDEN}."
        )
    mesh = make_mesh(mesh_shape)
    params = init_params()
    lspecs, _ = split(param_specs(params))
    # The factors must be non-zero for the Grams to matter: precondition on the trained state.
    lora_sharded, losses = train(mesh, steps, lr)
    report = {
        "mesh": dict(mesh.shape),
        "specs": {k: {n: str(s) for n, s in v.items()} for k, v in lspecs.items()},
        "precond_sharding": check_preconditioner_sharding(mesh, lora_sharded, lspecs),
        "losses": losses,
    }
    if jax.process_count() == 1:
        lora_single, losses_single = train(None, steps, lr)
        report["max_rel_diff"] = max_rel_diff(lora_sharded, lora_single)
        report["max_loss_diff"] = float(np.max(np.abs(np.subtract(losses, losses_single))))
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    init_jax(args)
    start = time.perf_counter()
    mesh_shape = tuple(int(n) for n in args.mesh.split(","))
    report = run(args.steps, args.lr, mesh_shape)
    if jax.process_index() != 0:
        return
    print(
        f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, "
        f"{jax.process_count()} process(es), mesh {report['mesh']}"
    )
    for layer, specs in report["specs"].items():
        print(
            f"  {layer}: kernel {KERNEL_SPECS[layer]}, lora_a {specs['lora_a']}, "
            f"lora_b {specs['lora_b']}"
        )
    ok = all(same for _, same in report["precond_sharding"].values())
    for name, (spec, same) in report["precond_sharding"].items():
        print(
            f"  preconditioned grad {name}: {spec} ({'same as' if same else 'DIFFERS from'} "
            "the incoming gradient)"
        )
    print(
        f"loss {report['losses'][0]:.5f} -> {report['losses'][-1]:.5f} in {args.steps} steps; "
        "factor shardings kept every step"
    )
    if "max_rel_diff" in report:
        close = report["max_rel_diff"] < 1e-5
        print(
            f"sharded vs single device: max relative difference {report['max_rel_diff']:.2e} "
            f"(tolerance 1e-5: {'OK' if close else 'FAIL'})"
        )
        ok = ok and close
    else:
        print("multi-process run: single-device comparison skipped")
    print(f"{'OK' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
