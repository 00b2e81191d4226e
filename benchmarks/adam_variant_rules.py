"""The update rules that keep Adam *after* the exchange, for benchmarks/adam_variants.py (the research
simulator; its docstring says how to run them): AdamW on the averaged gradient (DDP), top-k of the gradient with
error feedback, 1-bit Adam (top-k in place of the sign), and a shared momentum fed by error-feedback gradients
with a frozen, oracle or factored second moment. Also the primitives every rule uses (``Base``, ``ring``,
``topk_idx``, ``clip_``, ``avg``). Each rule's ``step(gw, lr)`` takes every worker's flat gradients and returns
the bytes one rank sent. Research code: the package's optimizers are in ``sparsedist/optim``.
"""
import math

import torch


def ring(n, P, b=4):
    return 2 * (P - 1) / P * n * b


def topk_idx(x, k):
    return torch.topk(x.abs(), k, sorted=False).indices


class Base:
    def __init__(self, params, P, a):
        self.params, self.P, self.a = params, P, a
        self.b1, self.b2, self.eps = a.beta1, a.beta2, 1e-8
        self.t = 0
        self.n = [p.numel() for p in params]
        self.k = [max(1, math.ceil(a.density * n)) for n in self.n]
        self.wd = [a.wd if p.dim() >= 2 else 0.0 for p in params]

    def zeros(self, per_worker=True):
        z = [[torch.zeros_like(p).flatten() for p in self.params] for _ in range(self.P if per_worker else 1)]
        return z if per_worker else z[0]

    def sparse_bytes(self, i, k=None):  # allgather of (int32 index, fp32 value) pairs from every rank
        return (self.P - 1) * (k if k is not None else self.k[i]) * (4 + self.a.value_bytes)

    def decay(self, lr):
        for p, wd in zip(self.params, self.wd):
            if wd:
                p.data.mul_(1 - lr * wd)


def clip_(grads, c):
    if c <= 0:
        return grads
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    s = min(1.0, c / (float(norm) + 1e-6))
    return [g * s for g in grads]


def avg(grads_w):
    P = len(grads_w)
    return [sum(gw[i] for gw in grads_w) / P for i in range(len(grads_w[0]))]


class Dense(Base):
    """AdamW on the dense averaged gradient (DDP)."""
    def __init__(self, *a):
        super().__init__(*a)
        self.m, self.v = self.zeros(False), self.zeros(False)

    def adam(self, g, lr, i):
        t = self.t
        self.m[i].mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v[i].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        mh = self.m[i] / (1 - self.b1 ** t)
        vh = self.v[i] / (1 - self.b2 ** t)
        return mh / (vh.sqrt() + self.eps)

    def step(self, gw, lr):
        self.t += 1
        g = clip_(avg(gw), self.a.clip)
        self.decay(lr)
        for i, p in enumerate(self.params):
            p.data.add_(self.adam(g[i], lr, i).view_as(p), alpha=-lr)
        return sum(ring(n, self.P) for n in self.n)


class TopkGradAdam(Dense):
    """Old: EF top-k on gradients, averaged sparse gradient then AdamW (clip on the averaged sparse grad)."""
    def __init__(self, *a):
        super().__init__(*a)
        self.e = self.zeros()

    def step(self, gw, lr):
        self.t += 1
        out = [torch.zeros(n) for n in self.n]
        for r in range(self.P):
            for i in range(len(self.n)):
                acc = gw[r][i] + self.e[r][i]
                idx = topk_idx(acc, self.k[i])
                sent = torch.zeros_like(acc)
                sent[idx] = acc[idx]
                self.e[r][i] = acc - sent
                out[i] += sent / self.P
        g = clip_(out, self.a.clip)
        self.decay(lr)
        for i, p in enumerate(self.params):
            p.data.add_(self.adam(g[i], lr, i).view_as(p), alpha=-lr)
        return sum(self.sparse_bytes(i) for i in range(len(self.n)))


class OneBit(Dense):
    """1-bit Adam (Tang et al. 2021) with top-k instead of sign: dense warm-up, v frozen, the full momentum
    compressed with worker EF, the shared momentum replaced by the average of the compressed ones.
    mode 'momentum' = faithful; mode 'grad' = EF on (1-b1)*g into a shared momentum (0/1-Adam-like)."""
    def __init__(self, *a, mode="momentum"):
        super().__init__(*a)
        self.e = self.zeros()
        self.mode = mode
        self.vfrozen = None

    def step(self, gw, lr):
        if self.t < self.a.warmup:
            return super().step(gw, lr)
        self.t += 1
        if self.vfrozen is None:
            self.vfrozen = [(v / (1 - self.b2 ** (self.t - 1))).sqrt() + self.eps for v in self.v]
            # bias-correct m once: from now on m is a plain EMA of a compressed quantity
            self.m = [m / (1 - self.b1 ** (self.t - 1)) for m in self.m]
        gw = [clip_(g, self.a.clip) for g in gw] if self.a.local_clip else gw
        out = [torch.zeros(n) for n in self.n]
        for r in range(self.P):
            for i in range(len(self.n)):
                if self.mode == "momentum":
                    q = self.b1 * self.m[i] + (1 - self.b1) * gw[r][i]
                else:
                    q = (1 - self.b1) * gw[r][i]
                if self.a.select_precond:
                    score = (q + self.e[r][i]) / self.vfrozen[i]
                else:
                    score = q + self.e[r][i]
                acc = q + self.e[r][i]
                idx = topk_idx(score, self.k[i])
                sent = torch.zeros_like(acc)
                sent[idx] = acc[idx]
                self.e[r][i] = acc - sent
                out[i] += sent / self.P
        self.decay(lr)
        for i, p in enumerate(self.params):
            if self.mode == "momentum":
                self.m[i] = out[i]
            else:
                self.m[i] = self.b1 * self.m[i] + out[i]
            p.data.add_((self.m[i] / self.vfrozen[i]).view_as(p), alpha=-lr)
        return sum(self.sparse_bytes(i) for i in range(len(self.n)))




class SharedM(Base):
    """Shared m from EF-compressed (1-b1)*g (0/1-Adam-like), a shared v from: 'frozen' after dense warm-up,
    'oracle_avg' ((avg g)^2, not deployable), 'oracle_local' (mean_r g_r^2, not deployable), 'factored'
    (Adafactor row/col statistics of mean_r g_r^2, allreduced every vevery steps; vectors in full)."""
    def __init__(self, *a):
        super().__init__(*a)
        self.m, self.v = self.zeros(False), self.zeros(False)
        self.e = self.zeros()
        self.R = [torch.zeros(p.shape[0]) if p.dim() == 2 else None for p in self.params]
        self.C = [torch.zeros(p.shape[1]) if p.dim() == 2 else None for p in self.params]
        self.acc2 = [[torch.zeros(p.numel()) for p in self.params] for _ in range(self.P)]
        self.vsteps = 0
        self.frozen = None

    def update_v(self, gw, i, dense_now):
        a, p = self.a, self.params[i]
        b2 = self.b2
        if a.vmode == "frozen" or dense_now:
            if dense_now or self.frozen is None:
                g = sum(g[i] for g in gw) / self.P
                self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            return 0
        if a.vmode == "oracle_avg":
            g = sum(g[i] for g in gw) / self.P
            self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            return 0
        sq = sum(g[i] * g[i] for g in gw) / self.P
        if a.vmode == "oracle_local":
            self.v[i].mul_(b2).add_(sq, alpha=1 - b2)
            return 0
        # factored
        self.acc2[0][i] += sq
        if self.t % a.vevery:
            return 0
        s = self.acc2[0][i] / a.vevery
        self.acc2[0][i] = torch.zeros_like(s)
        bb = b2 ** a.vevery
        if p.dim() == 2:
            s2 = s.view_as(p)
            self.R[i].mul_(bb).add_(s2.sum(1), alpha=1 - bb)
            self.C[i].mul_(bb).add_(s2.sum(0), alpha=1 - bb)
            self.v[i] = (torch.outer(self.R[i], self.C[i]) / self.R[i].sum().clamp_min(1e-30)).flatten()
            return ring(p.shape[0] + p.shape[1], self.P)
        self.v[i].mul_(bb).add_(s, alpha=1 - bb)
        return ring(p.numel(), self.P)

    def step(self, gw, lr):
        self.t += 1
        a = self.a
        gw = [clip_(g, a.clip) for g in gw] if a.local_clip else gw
        dense_now = self.t <= a.warmup
        nbytes = 0
        self.decay(lr)
        for i, p in enumerate(self.params):
            nbytes += self.update_v(gw, i, dense_now)
            if a.vmode == "frozen":
                vh = self.v[i] / (1 - self.b2 ** min(self.t, max(a.warmup, 1)))
            elif a.vmode == "factored":
                tt = (self.t // a.vevery) * a.vevery
                vh = self.v[i] / (1 - self.b2 ** max(tt, 1)) if tt else None
            else:
                vh = self.v[i] / (1 - self.b2 ** self.t)
            if vh is None:  # factored v not yet available: no update this step, gradients go to residual
                for r in range(self.P):
                    self.e[r][i] += (1 - self.b1) * gw[r][i]
                continue
            den = vh.sqrt() + self.eps
            out = torch.zeros(self.n[i])
            for r in range(self.P):
                acc = (1 - self.b1) * gw[r][i] + self.e[r][i]
                if dense_now:
                    out += acc / self.P
                    self.e[r][i] = torch.zeros_like(acc)
                    continue
                idx = topk_idx(acc / den if a.select_precond else acc, self.k[i])
                sent = torch.zeros_like(acc)
                sent[idx] = acc[idx]
                self.e[r][i] = acc - sent
                out += sent / self.P
            nbytes += ring(self.n[i], self.P) if dense_now else self.sparse_bytes(i)
            self.m[i].mul_(self.b1).add_(out)
            mh = self.m[i] / (1 - self.b1 ** self.t)
            p.data.add_((mh / den).view_as(p), alpha=-lr)
        return nbytes
