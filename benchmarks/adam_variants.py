"""The research simulator behind docs/adam_exchange.md's table of variants: P workers in one process, each with
its own data stream, gradient, optimizer state and error-feedback residual; the exchange is modelled exactly (the
sum of every worker's sparse selection, divided by P). The char-GPT of examples/char_gpt.py, AdamW (lr 3e-3,
betas (0.9, 0.99), weight decay 0.1 on matrices, gradient clipping at 1.0 per worker, 5 % warm-up then cosine to
10 %), batch 32 x 64 per worker, validation loss on 16 fixed batches. Every row of the table is one command::

    python benchmarks/adam_variants.py dense                                  # DDP: AdamW on the mean gradient
    python benchmarks/adam_variants.py topk_grad                              # top-k of the gradient + EF, then AdamW
    python benchmarks/adam_variants.py onebit --warmup 30                     # 1-bit Adam, top-k for sign
    python benchmarks/adam_variants.py onebit_grad --warmup 30                # EF gradient into a shared momentum
    python benchmarks/adam_variants.py sharedm --vmode oracle_avg --select-precond 1
    python benchmarks/adam_variants.py local_ef --vcorr 1 --beta1 0.5         # what sparsedist.optim.AdamW does
    python benchmarks/adam_variants.py local_ef21                             # EF21 tracking of the update
    python benchmarks/adam_variants.py local_ef --vcorr 1 --beta1 0.5 --local-model 1 --density 0.001  # error reset

Bytes are the values and int32 indices one rank sends (``(P-1) * k * (4 + value bytes)`` per tensor and step for
the allgather, ``2 (P-1)/P * n * 4`` for a dense ring allreduce), without headers; ``--value-bytes 2`` counts
half-precision values (the values are not rounded here). Research code: the package's optimizers are in
``sparsedist/optim`` and ``benchmarks/adam_exchange.py`` measures them.

This module holds the rules that put each worker's own Adam update on the wire (``LocalAdam`` and its index-set
variants) and the command line; ``benchmarks/adam_variant_rules.py`` holds those that keep Adam after the exchange
(dense, top-k of the gradient, 1-bit Adam, a shared momentum) and the primitives.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from adam_variant_rules import Base, Dense, OneBit, SharedM, TopkGradAdam, clip_, ring, topk_idx  # noqa: E402
from char_gpt import CharData, CharGPT, load_text  # noqa: E402

torch.set_num_threads(1)


class LocalAdam(Base):
    """Each worker: its own Adam moments from its local gradient; exchange of the preconditioned update.
    compress='ef'   : top-k(u + e) with error feedback;
    compress='ef21' : EF21 — each worker tracks its update with sparse corrections, applied estimate is dense;
    scale_lr: the wire carries lr*u (parameter units) so residual mass keeps the lr it was produced with."""
    def __init__(self, *a, compress="ef"):
        super().__init__(*a)
        self.m, self.v = self.zeros(), self.zeros()
        self.e = self.zeros()        # EF residual or EF21 per-worker tracked state
        self.G = self.zeros(False)   # EF21 shared estimate (the average of the workers' tracked states)
        self.S = self.zeros(False)   # shared rate estimate of the applied update (predictive EF)
        self.compress = compress
        self.dense_steps = 0

    def local_update(self, r, g, i):
        t = self.t
        self.m[r][i].mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v[r][i].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        mh = self.m[r][i] / (1 - self.b1 ** t)
        vh = self.v[r][i] / (1 - self.b2 ** t)
        if self.a.vcorr:  # noise-corrected: estimate of the second moment of the P-rank average gradient
            vh = vh / self.P + (1 - 1 / self.P) * mh * mh
        return mh / (vh.sqrt() + self.eps)

    def step(self, gw, lr):
        self.t += 1
        a = self.a
        gw = [clip_(g, a.clip) for g in gw]
        dense = self.t <= a.warmup
        out = [torch.zeros(n) for n in self.n]
        nbytes = 0
        shared_idx = None
        if a.shared == "gtopk" and not dense:
            return self.gtopk_step(gw, lr)
        if a.granularity == "global" and not dense:
            return self.global_step(gw, lr)
        if a.shared in ("leader", "union") and not dense:
            return self.shared_step(gw, lr)
        dens = a.density
        if a.dwarm and self.t <= a.dwarm:  # DGC-style density warm-up: geometric from dwarm_start to density
            frac = (self.t - 1) / max(1, a.dwarm - 1)
            dens = a.dwarm_start * (a.density / a.dwarm_start) ** frac
        for i in range(len(self.n)):
            k = max(1, math.ceil(dens * self.n[i]))
            small = self.n[i] < a.dense_below or bool(a.dense_names and a.dense_names in a.names[i])
            if small:
                k = self.n[i]
            if a.shared == "rand":
                gen = torch.Generator().manual_seed(1000003 * self.t + i)
                shared_idx = torch.randperm(self.n[i], generator=gen)[:k]
            if dense and a.dense_adam_warmup:
                g = sum(gg[i] for gg in gw) / self.P
                for r in range(self.P):
                    u = self.local_update(r, g, i)
                out[i] += u * lr if a.scale_lr else u
                nbytes += ring(self.n[i], self.P)
                continue
            for r in range(self.P):
                u = self.local_update(r, gw[r][i], i)
                q = u * lr if a.scale_lr else u
                if dense:
                    out[i] += q / self.P
                    if self.compress == "ef21":
                        self.e[r][i] = q.clone()
                    continue
                if self.compress == "ef":
                    acc = q + self.e[r][i] - (a.predict * self.S[i] if a.predict else 0)
                    if a.pure_reset:  # CSER's error reset proper: nothing fed back, the rest stays local
                        acc = q
                    if a.score == "gscale":
                        score = acc * (self.v[r][i] / (1 - self.b2 ** self.t)).sqrt()
                    else:
                        score = acc
                    if a.block > 1 and not small:  # whole blocks of a.block contiguous elements, by block norm
                        nb = -(-self.n[i] // a.block)
                        padded = torch.zeros(nb * a.block)
                        padded[:self.n[i]] = score
                        bsel = topk_idx(padded.view(nb, a.block).norm(dim=1), max(1, math.ceil(k / a.block)))
                        idx = (bsel[:, None] * a.block + torch.arange(a.block)).flatten()
                        idx = idx[idx < self.n[i]]
                    else:
                        idx = shared_idx if shared_idx is not None else topk_idx(score, k)
                    sent = torch.zeros_like(acc)
                    sent[idx] = acc[idx]
                    if a.pure_reset:
                        self.e[r][i] += acc - sent
                    else:
                        self.e[r][i] = (acc - sent) * a.ef_decay
                    out[i] += sent / self.P
                else:  # ef21: c = C(q - G_r); G_r += c
                    diff = q - self.e[r][i]
                    idx = shared_idx if shared_idx is not None else topk_idx(diff, k)
                    c = torch.zeros_like(diff)
                    c[idx] = diff[idx]
                    self.e[r][i] += c
                    out[i] += c / self.P
            if dense or small:
                nbytes += ring(self.n[i], self.P)
            elif shared_idx is not None:
                nbytes += ring(k, self.P, a.value_bytes)
            elif a.block > 1:
                nb_sent = max(1, math.ceil(k / a.block))
                nbytes += (self.P - 1) * nb_sent * (4 + a.block * a.value_bytes)
            else:
                nbytes += self.sparse_bytes(i, k)
        self.decay(lr)
        for i, p in enumerate(self.params):
            if self.compress == "ef21":
                if dense:
                    self.G[i] = out[i].clone()
                else:
                    self.G[i] += out[i]
                upd = self.G[i]
            else:
                upd = out[i]
                if a.predict and not dense:
                    upd = upd + a.predict * self.S[i]
                    self.S[i].mul_(a.predict_beta).add_(upd, alpha=1 - a.predict_beta)
            p.data.add_(upd.view_as(p), alpha=-1.0 if a.scale_lr else -lr)
        return nbytes




def _gtopk_step(self, gw, lr):
    a = self.a
    for i, p in enumerate(self.params):
        k = self.k[i]
        accs, sents = [], []
        tot = torch.zeros(self.n[i])
        for r in range(self.P):
            u = self.local_update(r, gw[r][i], i)
            acc = (u * lr if a.scale_lr else u) + self.e[r][i]
            idx = topk_idx(acc, k)
            sent = torch.zeros_like(acc)
            sent[idx] = acc[idx]
            accs.append(acc)
            sents.append(sent)
            tot += sent
        keep = torch.zeros(self.n[i], dtype=torch.bool)
        keep[topk_idx(tot, k)] = True
        for r in range(self.P):
            s = sents[r] * keep
            self.e[r][i] = accs[r] - s
        p.data.mul_(1 - lr * self.wd[i])
        p.data.add_((tot * keep / self.P).view_as(p), alpha=-1.0 if a.scale_lr else -lr)
    return sum(2 * (self.P - 1) / self.P * k * 8 for k in self.k)


LocalAdam.gtopk_step = _gtopk_step


def _global_step(self, gw, lr):
    """top-k over all parameters at once (the same total k), per worker, with EF."""
    a = self.a
    K = sum(self.k)
    offs = [0]
    for n in self.n:
        offs.append(offs[-1] + n)
    total = torch.zeros(offs[-1])
    for r in range(self.P):
        acc = torch.cat([(self.local_update(r, gw[r][i], i) * (lr if a.scale_lr else 1.0)) + self.e[r][i]
                         for i in range(len(self.n))])
        idx = topk_idx(acc, K)
        sent = torch.zeros_like(acc)
        sent[idx] = acc[idx]
        rest = acc - sent
        for i in range(len(self.n)):
            self.e[r][i] = rest[offs[i]:offs[i + 1]].clone()
        total += sent / self.P
    for i, p in enumerate(self.params):
        p.data.mul_(1 - lr * self.wd[i])
        p.data.add_(total[offs[i]:offs[i + 1]].view_as(p), alpha=-1.0 if a.scale_lr else -lr)
    return (self.P - 1) * K * (4 + a.value_bytes)


LocalAdam.global_step = _global_step


def _shared_step(self, gw, lr):
    """Shared index set, values averaged over every rank: 'leader' = ScaleCom's cyclic local top-k (rank t mod P
    picks its top-k, everyone sends its accumulation there); 'union' = each rank proposes its top-ceil(k/P)."""
    a = self.a
    nbytes = 0
    for i, p in enumerate(self.params):
        k = self.k[i]
        accs = []
        for r in range(self.P):
            u = self.local_update(r, gw[r][i], i)
            accs.append(u * lr + self.e[r][i])
        if a.shared == "leader":
            idx = topk_idx(accs[self.t % self.P], k)
            nbytes += (self.P - 1) / self.P * k * 4 + ring(k, self.P, a.value_bytes)
        else:
            kp = max(1, math.ceil(k / self.P))
            idx = torch.unique(torch.cat([topk_idx(acc, kp) for acc in accs]))
            nbytes += (self.P - 1) * kp * 4 + ring(idx.numel(), self.P, a.value_bytes)
        total = torch.zeros(self.n[i])
        for r in range(self.P):
            sent = torch.zeros(self.n[i])
            sent[idx] = accs[r][idx]
            self.e[r][i] = accs[r] - sent
            total += sent / self.P
        p.data.mul_(1 - lr * self.wd[i])
        p.data.sub_(total.view_as(p))
    return nbytes


LocalAdam.shared_step = _shared_step


METHODS = {
    "dense": Dense, "topk_grad": TopkGradAdam,
    "onebit": lambda *a: OneBit(*a, mode="momentum"), "onebit_grad": lambda *a: OneBit(*a, mode="grad"),
    "local_ef": lambda *a: LocalAdam(*a, compress="ef"), "local_ef21": lambda *a: LocalAdam(*a, compress="ef21"),
    "sharedm": SharedM,
}


def lr_at(step, steps, base, warm_frac=0.05):
    warm = max(1, int(steps * warm_frac))
    if step <= warm:
        return base * step / warm
    prog = (step - warm) / max(1, steps - warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


@torch.no_grad()
def val_loss(model, data, vb):
    model.eval()
    tot = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in vb)
    model.train()
    return tot / len(vb)


# every option: (type, default, what it does)
OPTIONS = {
    "--P": (int, 2, "simulated workers"),
    "--steps": (int, 300, "optimizer steps (the schedule follows)"),
    "--lr": (float, 3e-3, "peak learning rate"),
    "--beta1": (float, 0.9, "Adam's beta1 (local_ef: of each worker's moments)"),
    "--beta2": (float, 0.99, "Adam's beta2"),
    "--wd": (float, 0.1, "decoupled weight decay, matrices only"),
    "--clip": (float, 1.0, "gradient clipping norm (0: off)"),
    "--local-clip": (int, 1, "onebit/sharedm: clip each worker's gradient (else none)"),
    "--density": (float, 0.01, "fraction of each tensor sent per step"),
    "--warmup": (int, 0, "dense warm-up steps"),
    "--batch": (int, 32, "sequences of 64 characters per worker"),
    "--seed": (int, 0, "initial weights and data streams"),
    "--value-bytes": (int, 4, "bytes per value counted on the wire"),
    "--select-precond": (int, 0, "onebit/sharedm: select by acc / sqrt(v)"),
    "--scale-lr": (int, 1, "local_ef: the wire carries lr * u (else u, times the current lr at the end)"),
    "--shared": (str, "none", "local_ef index sets: none, rand (shared-seed), gtopk, union, leader"),
    "--vmode": (str, "frozen", "sharedm's second moment: frozen, oracle_avg, oracle_local, factored"),
    "--dense-adam-warmup": (int, 1, "local_ef warm-up: Adam on the mean gradient (else mean of local updates)"),
    "--score": (str, "acc", "local_ef selection score: acc, or gscale (acc * sqrt(v))"),
    "--vcorr": (int, 0, "local_ef: noise-corrected second moment v/P + (1 - 1/P) m^2"),
    "--dense-names": (str, "", "local_ef: tensors whose name contains this are sent densely"),
    "--block": (int, 1, "local_ef: select whole blocks of this many contiguous elements"),
    "--dense-below": (int, 0, "local_ef: tensors smaller than this are sent densely"),
    "--dwarm": (int, 0, "local_ef: DGC-style density warm-up over this many steps"),
    "--dwarm-start": (float, 0.25, "local_ef: the density warm-up's first density"),
    "--predict": (float, 0.0, "local_ef: apply this times an EMA of past applied updates densely, EF the rest"),
    "--predict-beta": (float, 0.99, "local_ef: that EMA's beta"),
    "--ef-decay": (float, 1.0, "local_ef: multiply the residual by this every step"),
    "--granularity": (str, "layer", "local_ef: top-k per tensor (layer) or over all tensors (global)"),
    "--vevery": (int, 1, "sharedm factored: exchange the factored second moment every this many steps"),
    "--local-model": (int, 0, "local_ef: each worker's gradient at its local model x - e_r (error reset)"),
    "--sync-every": (int, 0, "local_ef: every this many steps average the residuals into x densely (a sync)"),
    "--pure-reset": (int, 0, "local_ef: no error feedback; what is not sent stays in e_r until a sync (CSER)"),
    "--eval-every": (int, 100, "steps between validation losses"),
    "--tag": (str, "", "a label for the record"),
    "--out": (str, None, "append the JSON record to this file"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=sorted(METHODS))
    for flag, (kind, default, text) in OPTIONS.items():
        ap.add_argument(flag, type=kind, default=default, help=text)
    a = ap.parse_args()
    data = CharData(load_text(None))
    torch.manual_seed(a.seed)
    model = CharGPT(data.vocab_size, 128, 4, 4, 64)
    params = list(model.parameters())
    a.names = [n for n, _ in model.named_parameters()]
    opt = METHODS[a.method](params, a.P, a)
    gens = [torch.Generator().manual_seed(a.seed * 100 + r) for r in range(a.P)]
    vg = torch.Generator().manual_seed(1234)
    vb = [data.batch("val", 32, 64, vg) for _ in range(16)]
    total_bytes, hist, t0 = 0.0, [], time.time()
    for step in range(1, a.steps + 1):
        gw = []
        local = a.local_model and isinstance(opt, LocalAdam) and step > a.warmup
        for r in range(a.P):
            x, y = data.batch("train", a.batch, 64, gens[r])
            kept = [p.detach().clone() for p in params] if local else []
            with torch.no_grad():
                for i, p in enumerate(params[:len(kept)]):
                    p.sub_(opt.e[r][i].view_as(p))
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            gw.append([g.flatten() for g in torch.autograd.grad(loss, params)])
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.copy_(k)
        with torch.no_grad():
            total_bytes += opt.step(gw, lr_at(step, a.steps, a.lr))
            if a.sync_every and step % a.sync_every == 0 and isinstance(opt, LocalAdam):
                for i, p in enumerate(params):
                    p.sub_((sum(opt.e[r][i] for r in range(a.P)) / a.P).view_as(p))
                    for r in range(a.P):
                        opt.e[r][i].zero_()
                total_bytes += sum(ring(n, a.P) for n in opt.n)
        if step % a.eval_every == 0 or step == a.steps:
            vl = val_loss(model, data, vb)
            hist.append((step, round(vl, 4), total_bytes))
            print(step, round(vl, 4), f"{time.time() - t0:.0f}s", flush=True)
    flushed = None
    if isinstance(opt, LocalAdam) and opt.compress == "ef" and a.scale_lr:
        with torch.no_grad():  # diagnostic: apply the ranks' pending residual mass, then evaluate
            for i, p in enumerate(params):
                p.data.sub_((sum(opt.e[r][i] for r in range(a.P)) / a.P).view_as(p))
        flushed = round(val_loss(model, data, vb), 4)
        print("flushed", flushed)
    dense_bytes = a.steps * sum(ring(n, a.P) for n in opt.n)
    rec = {"method": a.method, "tag": a.tag, "args": vars(a), "final": hist[-1][1], "hist": hist,
           "ratio": dense_bytes / total_bytes if total_bytes else None, "secs": round(time.time() - t0), "flushed": flushed}
    print(json.dumps({k: rec[k] for k in ("method", "tag", "final", "ratio", "secs")}))
    if not a.out:
        return
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
