"""Independent NumPy transcription of the paper's preconditioner and of the base optimizers.

Written from the formulas, in float64, with explicit loops over stacked layers and
reshapes instead of general contractions, so it shares no code with the library.
"""

from __future__ import annotations

import numpy as np


def _inv_or_identity(m: np.ndarray) -> np.ndarray:
    # The reference code falls back to the identity when the inverse fails.
    try:
        if np.linalg.matrix_rank(m) < m.shape[0]:
            return np.eye(m.shape[0])
        return np.linalg.inv(m)
    except np.linalg.LinAlgError:
        return np.eye(m.shape[0])


def precondition_flax(g_a, g_b, a, b, reg, stacked=0):
    """g_a @ inv(b b^T + reg I), inv(a^T a + reg I) @ g_b for a: (*S, *in, r), b: (*S, r, *out)."""
    g_a, g_b, a, b = (np.asarray(x, np.float64) for x in (g_a, g_b, a, b))
    stack = a.shape[:stacked]
    r = a.shape[-1]
    a2 = a.reshape(-1, int(np.prod(a.shape[stacked:-1])), r)
    g_a2 = g_a.reshape(a2.shape)
    b2 = b.reshape(-1, r, int(np.prod(b.shape[stacked + 1 :])))
    g_b2 = g_b.reshape(b2.shape)
    out_a, out_b = np.empty_like(g_a2), np.empty_like(g_b2)
    for i in range(a2.shape[0]):
        out_a[i] = g_a2[i] @ _inv_or_identity(b2[i] @ b2[i].T + reg * np.eye(r))
        out_b[i] = _inv_or_identity(a2[i].T @ a2[i] + reg * np.eye(r)) @ g_b2[i]
    del stack
    return out_a.reshape(g_a.shape), out_b.reshape(g_b.shape)


def precondition_torch(g_A, g_B, A, B, reg):
    """PyTorch layout A: (r, in), B: (out, r): inv(B^T B + reg I) g_A and g_B inv(A A^T + reg I)."""
    g_A, g_B, A, B = (np.asarray(x, np.float64) for x in (g_A, g_B, A, B))
    r = A.shape[0]
    new_A = _inv_or_identity(B.T @ B + reg * np.eye(r)) @ g_A
    new_B = g_B @ _inv_or_identity(A @ A.T + reg * np.eye(r))
    return new_A, new_B


class AdamW:
    """optax.adamw's update rule, transcribed (bias-corrected moments, decoupled decay)."""

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
        self.mu = self.nu = None
        self.t = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> list[np.ndarray]:
        if self.mu is None:
            self.mu = [np.zeros_like(g) for g in grads]
            self.nu = [np.zeros_like(g) for g in grads]
        self.t += 1
        out = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            self.mu[i] = self.b1 * self.mu[i] + (1 - self.b1) * g
            self.nu[i] = self.b2 * self.nu[i] + (1 - self.b2) * g * g
            mu_hat = self.mu[i] / (1 - self.b1**self.t)
            nu_hat = self.nu[i] / (1 - self.b2**self.t)
            out.append(p - self.lr * (mu_hat / (np.sqrt(nu_hat) + self.eps) + self.wd * p))
        return out


def factorisation_grads(a, b, target):
    """Gradients of 0.5 * ||a @ b - target||^2."""
    resid = a @ b - target
    return resid @ b.T, a.T @ resid
