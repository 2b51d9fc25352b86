"""NumPy float64 transcriptions of LoRA-RITE and RefLoRA, in the authors' PyTorch layout.

Written for these tests from the papers and from reading the authors' code (LoRA-RITE:
gkevinyen5418/LoRA-RITE ``lora_rite.py`` at c9bb451; RefLoRA: zhangyilang/RefLoRA
``reflora/reflora.py`` at 23bea48), step by step as that code computes, including its choices
(Householder QR with ``torch.linalg.pinv``'s cutoff, the bias-corrected decays, skipping before
clipping, eps outside the square root). Pairs are ``A: (r, in)``, ``B: (out, r)``,
``W = W0 + s * B @ A``; nothing here is shared with the library.
"""

from __future__ import annotations

import numpy as np


def sym(x):
    return (x + x.T) / 2


def decay(step: int, beta: float) -> float:
    """The bias-corrected decay of the authors' code at 0-based ``step``."""
    return beta * (1 - beta**step) / (1 - beta ** (step + 1))


def torch_pinv(m):
    """``torch.linalg.pinv``: singular values above ``max(shape) * eps * largest`` inverted."""
    u, s, vh = np.linalg.svd(m)
    cutoff = max(m.shape) * np.finfo(m.dtype).eps * (s.max() if s.size else 0.0)
    return (vh.T * np.where(s > cutoff, 1 / np.where(s > cutoff, s, 1), 0)) @ u.T


def rms(x):
    return np.sqrt(np.mean(x**2))


class LoraRite:
    """The authors' ``LoRARite.step`` for a list of pairs ``(A, B)``."""

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-6, clip=1.0, skipping=1.0, capping=0.0,
                 weight_decay=0.0, escape=False):  # fmt: skip
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.clip, self.skipping, self.capping = clip, skipping, capping
        self.wd, self.escape = weight_decay, escape
        self.state = None

    def _init(self, pairs):
        self.state = []
        for a, b in pairs:
            r = a.shape[0]
            self.state.append(dict(
                step=0, v_a=np.zeros((r, r)), v_b=np.zeros((r, r)),
                m_a=np.zeros((a.shape[1], r)), m_b=np.zeros((b.shape[0], r)),
                q_a=np.zeros((a.shape[1], r)), q_b=np.zeros((b.shape[0], r)), rho_a=0.0, rho_b=0.0,
            ))  # fmt: skip

    def _precondition(self, g, v, rho):
        w, e = np.linalg.eigh(sym(v))
        k = sym(sym((e * (1 / (np.sqrt(w + rho) + self.eps))) @ e.T))
        return np.nan_to_num(g @ k)

    def _escape(self, v_moved, v_old, rho, c2):
        eig = max(np.max(np.linalg.eigvalsh(v_old) - np.linalg.eigvalsh(v_moved)), 0.0)
        trace = max(np.trace(v_old) - np.trace(v_moved), 0.0)
        return c2 * (min(eig, trace) + rho)

    def step(self, pairs, grads):
        if self.state is None:
            self._init(pairs)
        first, total = [], 0.0
        for (a, b), (g_a, g_b) in zip(pairs, grads, strict=True):
            q_a, r_a = np.linalg.qr(a.T)  # tall forms: A.T (in, r), B (out, r)
            q_b, r_b = np.linalg.qr(b)
            rp_a, rp_b = torch_pinv(r_a), torch_pinv(r_b)
            ga, gb = g_a.T @ rp_b, g_b @ rp_a  # unmagnified, through the other's R
            if self.skipping > 0:
                ga = np.zeros_like(ga) if rms(ga) > self.skipping else ga
                gb = np.zeros_like(gb) if rms(gb) > self.skipping else gb
            total += np.sum(ga**2) + np.sum(gb**2)
            first.append((q_a, q_b, rp_a, rp_b, ga, gb))
        norm = np.sqrt(total)
        out = []
        for (a, b), st, (q_a, q_b, rp_a, rp_b, ga, gb) in zip(
            pairs, self.state, first, strict=True
        ):
            if self.clip > 0 and norm > self.clip:
                ga, gb = ga / norm * self.clip, gb / norm * self.clip
            c1, c2 = decay(st["step"], self.b1), decay(st["step"], self.b2)
            p_a, p_b = (
                q_b.T @ st["q_b"],
                q_a.T @ st["q_a"],
            )  # each side moves with the other's basis
            moved_a = np.nan_to_num(sym(p_a @ st["v_a"] @ p_a.T))
            moved_b = np.nan_to_num(sym(p_b @ st["v_b"] @ p_b.T))
            rho_a = self._escape(moved_a, st["v_a"], st["rho_a"], c2) if self.escape else 0.0
            rho_b = self._escape(moved_b, st["v_b"], st["rho_b"], c2) if self.escape else 0.0
            v_a = sym((1 - c2) * sym(ga.T @ ga / ga.shape[0]) + c2 * moved_a)
            v_b = sym((1 - c2) * sym(gb.T @ gb / gb.shape[0]) + c2 * moved_b)
            m_a = (1 - c1) * self._precondition(ga, v_a, rho_a) + c1 * st["m_a"] @ p_a.T
            m_b = (1 - c1) * self._precondition(gb, v_b, rho_b) + c1 * st["m_b"] @ p_b.T
            d_a, d_b = m_a, m_b
            if self.capping > 0:
                d_a = d_a / max(1.0, rms(d_a) / self.capping)
                d_b = d_b / max(1.0, rms(d_b) / self.capping)
            d_a, d_b = (d_a @ rp_b.T).T, d_b @ rp_a.T  # back to A: (r, in), B: (out, r)
            d_a, d_b = d_a + self.wd * a, d_b + self.wd * b
            out.append((a - self.lr * d_a, b - self.lr * d_b))
            st.update(step=st["step"] + 1, v_a=v_a, v_b=v_b, m_a=m_a, m_b=m_b, q_a=q_a, q_b=q_b,
                      rho_a=rho_a, rho_b=rho_b)  # fmt: skip
        return out


def reflora_factors(a, b, eps, fallback=False):
    """``(S, inv(S))`` of the authors' ``Refactorer.dummy_step`` for ``A: (r, in)``,
    ``B: (out, r)``: ``S @ (A A.T) @ S = B.T B``. ``fallback``: the library's identity where
    ``A A.T`` or ``B.T B`` is singular (the authors' code has none)."""
    lam_a, v_a = np.linalg.eigh(a @ a.T)
    s_a = np.sqrt(np.maximum(lam_a, 0))
    m = b @ (v_a * s_a)
    lam_m, v_m = np.linalg.eigh(m.T @ m)
    s_m = np.sqrt(np.maximum(lam_m, 0))
    left = (v_a * (1 / (s_a + eps))) @ v_m
    right = (v_a * s_a) @ v_m
    s, s_inv = (left * s_m) @ left.T, (right * (1 / (s_m + eps))) @ right.T
    tol, ratio_a = a.shape[0] * np.finfo(np.float32).eps, lam_a[0] / lam_a[-1]
    if fallback and (ratio_a <= tol or lam_m[0] <= tol * ratio_a * lam_m[-1]):
        return np.eye(a.shape[0]), np.eye(a.shape[0])
    return s, s_inv


def reflora_gradients(pairs, grads, eps, fallback=False):
    """The preconditioned gradients: ``inv(S) @ g_A`` and ``g_B @ S``."""
    out = []
    for (a, b), (g_a, g_b) in zip(pairs, grads, strict=True):
        s, s_inv = reflora_factors(a, b, eps, fallback)
        out.append((s_inv @ g_a, g_b @ s))
    return out


class Regression:
    """LoRA layers fitting ``Y`` from ``X``: ``0.5 * mean ||X @ W.T - Y||^2`` per layer, with
    ``W = W0 + s * B @ A``; gradients in float64."""

    def __init__(self, seed, shapes, rank, scale=2.0, n=32, target=1.0, b_zero=True):
        rng = np.random.default_rng(seed)
        self.s, self.layers, self.init = scale, [], []
        for out_dim, in_dim in shapes:
            x = rng.standard_normal((n, in_dim))
            y = target * rng.standard_normal((n, out_dim))
            w0 = rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)
            bound = 1 / np.sqrt(in_dim)
            a = rng.uniform(-bound, bound, (rank, in_dim))
            b = np.zeros((out_dim, rank)) if b_zero else 0.3 * rng.standard_normal((out_dim, rank))
            self.layers.append((w0, x, y))
            self.init.append((a, b))

    def grads(self, pairs):
        out = []
        for (w0, x, y), (a, b) in zip(self.layers, pairs, strict=True):
            resid = x @ (w0 + self.s * b @ a).T - y
            g_w = resid.T @ x / len(x)
            out.append((self.s * b.T @ g_w, self.s * g_w @ a.T))
        return out
