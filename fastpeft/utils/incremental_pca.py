"""Streaming PCA over batches of rows (the incremental PCA of Ross et al. 2008, as in scikit-learn),
used by EVA to find the top right-singular vectors of each layer's inputs.

Numerics follow peft 0.21.2's torch port exactly (checked by running both on the same batches): sums
for the running mean and variance in float64, the first batch centred in place in its own dtype,
later batches stacked with the previous components and a mean-correction row (which promotes the
stack to float64), randomized SVD (``torch.svd_lowrank``, q = 2 * n_components, 4 iterations) under a
fixed seed in a forked RNG, and signs fixed by each right-singular vector's largest entry.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["IncrementalPCA"]


class IncrementalPCA:
    def __init__(self, n_components: Optional[int] = None, copy: bool = True, svd_driver: Optional[str] = None,
                 lowrank: bool = False, lowrank_q: Optional[int] = None, lowrank_niter: int = 4,
                 lowrank_seed: Optional[int] = None):
        self.n_components = n_components
        self.copy = copy
        self.svd_driver = svd_driver
        self.lowrank = lowrank
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        if lowrank:
            if lowrank_q is None:
                if n_components is None:
                    raise ValueError("n_components must be specified when using lowrank mode with lowrank_q=None.")
                lowrank_q = 2 * n_components
            elif n_components is not None and lowrank_q < n_components:
                raise ValueError(f"lowrank_q ({lowrank_q}) must be >= n_components ({n_components}).")
        self.lowrank_q = lowrank_q
        self.n_features_ = None

    def _svd(self, X: torch.Tensor):
        if not self.lowrank:
            return torch.linalg.svd(X, full_matrices=False, driver=self.svd_driver)
        with torch.random.fork_rng(enabled=self.lowrank_seed is not None):
            if self.lowrank_seed is not None:
                torch.manual_seed(self.lowrank_seed)
            U, S, V = torch.svd_lowrank(X, q=self.lowrank_q, niter=self.lowrank_niter)
        return U, S, V.mH

    def _prepare(self, X) -> torch.Tensor:
        if not isinstance(X, torch.Tensor):
            X = torch.tensor(X, dtype=torch.float32)
        elif self.copy:
            X = X.clone()
        n_samples, n_features = X.shape
        if self.n_components is not None:
            if self.n_components > n_features:
                raise ValueError(f"n_components={self.n_components} invalid for n_features={n_features}, need more "
                                 f"rows than columns for IncrementalPCA processing.")
            if self.n_components > n_samples:
                raise ValueError(f"n_components={self.n_components} must be less or equal to the batch number of "
                                 f"samples {n_samples}")
        return X if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)

    @staticmethod
    def _running_moments(X, last_mean, last_var, last_count):
        """Mean and (biased) variance of everything seen so far, summed in float64."""
        if X.shape[0] == 0:
            return last_mean, last_var, last_count
        n = torch.tensor([X.shape[0]], device=X.device)
        total = last_count + n
        last_sum = (torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None
                    else last_mean * last_count)
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centred = X - new_sum / n
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_m2 = centred.square_().sum(dim=0, dtype=torch.float64) - correction / n
        if last_var is None:
            return mean, new_m2 / total, total
        ratio = last_count.double() / n
        m2 = last_var * last_count + new_m2 + ratio / total * (last_sum / ratio - new_sum).square()
        return mean, m2 / total, total

    def partial_fit(self, X) -> "IncrementalPCA":
        first = not hasattr(self, "components_")
        X = self._prepare(X)
        n_samples, n_features = X.shape
        if first:
            self.mean_ = self.var_ = None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
            self.n_features_ = n_features
            if not self.n_components:
                self.n_components = min(n_samples, n_features)
        if n_features != self.n_features_:
            raise ValueError(f"IncrementalPCA: this batch has {n_features} features, the first had "
                             f"{self.n_features_}")
        mean, var, total = self._running_moments(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples)
            X = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, X,
                              factor * (self.mean_ - batch_mean)))
        U, S, Vt = self._svd(X)
        # deterministic signs: each right-singular vector's largest |entry| positive
        rows = torch.arange(Vt.shape[0], device=Vt.device)
        signs = torch.sign(Vt[rows, torch.argmax(torch.abs(Vt), dim=1)])
        U *= signs[: U.shape[1]].view(1, -1)
        Vt *= signs.view(-1, 1)
        k = self.n_components
        variance = S ** 2 / (total - 1)
        self.n_samples_seen_ = total
        self.components_ = Vt[:k]
        self.singular_values_ = S[:k]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ = variance[:k]
        self.explained_variance_ratio_ = (S ** 2 / torch.sum(var * total))[:k]
        self.noise_variance_ = (variance[k:].mean() if k not in (n_samples, n_features)
                                else torch.tensor(0.0, device=X.device))
        return self

