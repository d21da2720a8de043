#!/usr/bin/python3
"""Independent PyTorch reference for vdist's model (docs/model.md) -> golden test values.

Run (Debian's python3-torch; the `python3` on PATH may lack torch):

    /usr/bin/python3 tests/golden/gen_golden.py          # from the repository root
    /usr/bin/python3 tests/golden/gen_golden.py --fp32-replay   # also print how far a float32
                                                 # rerun of this reference lands (tolerance guide)

It writes, next to this script (deterministic: fixed seeds, CPU, float64):

  tiny_config.json          Hugging Face config.json of the tiny MixtralForCausalLM.
  tiny_init.safetensors     initial weights, Hugging Face names/shapes, F32.
  tiny_golden.safetensors   golden values, F32 unless noted ("__metadata__" documents the
                            hyperparameters):
      inputs, targets             I32 [2,16]  the micro-batch (sequences 0,1 of train_tokens)
      <c>.logits                  [32,64]     for c in dropless, cf075_position, cf075_probs
      <c>.lm_loss/.aux_loss/.z_loss/.loss  [1]
      <c>.dropped                 [2]         dropped (token, slot) assignments per layer
      <c>.grad.<HF name>          d(<c>.loss)/d(param) of the single micro-batch
      train_tokens                I32 [97]    token stream of the training run (n_seq 6, T 16)
      train.loss/.lm_loss/.aux_loss/.z_loss  [5]  per step (means over the step's micro-batches)
      train.grad_norm [5] (global L2 norm before clipping), train.lr [5]
      train.final.<HF name>       parameters after 5 AdamW steps (dropless)

The model is written from docs/model.md only (no transformers code). All reference
arithmetic is float64, starting from the F32-rounded initial weights; results are rounded
to F32 when stored. The script asserts its self-checks (finite differences, balanced aux =
alpha, dropping semantics, stable top-k ties, hand AdamW == torch.optim.AdamW, routing
margins far above fp32 noise) and prints the losses and dropped counts.
"""
import json
import math
import os
import struct
import sys

import torch

torch.set_default_dtype(torch.float64)
DT = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- config
CFG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.01,
    "torch_dtype": "float32",
}
ALPHA = 0.01          # router_aux_loss_coef
BETA = 0.001          # router_z_loss_coef
B, T = 2, 16          # micro-batch
INIT_SEED = 1234      # torch.Generator seed for the initial weights
DATA_SEED = 4321      # torch.Generator seed for the token stream
CASES = [("dropless", None, None),
         ("cf075_position", 0.75, "position"),
         ("cf075_probs", 0.75, "probs")]
TRAIN = dict(steps=5, global_batch=4, micro_batch=2, n_seq=6, lr_max=1e-2, lr_min=1e-3,
             warmup=2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, max_norm=1.0)
# Routing decisions (top-k, probs-policy drop order) must not be decided by fp32 noise:
# every decisive gap between router probabilities must exceed this.
MIN_MARGIN = 1e-5

V = CFG["vocab_size"]; D = CFG["hidden_size"]; F = CFG["intermediate_size"]
L = CFG["num_hidden_layers"]; H = CFG["num_attention_heads"]; G = CFG["num_key_value_heads"]
E = CFG["num_local_experts"]; K = CFG["num_experts_per_tok"]; HD = D // H
THETA = CFG["rope_theta"]; EPS = CFG["rms_norm_eps"]


def param_shapes():
    """Hugging Face names and shapes in model.md order."""
    s = [("model.embed_tokens.weight", [V, D])]
    for l in range(L):
        p = f"model.layers.{l}."
        s += [(p + "input_layernorm.weight", [D]),
              (p + "self_attn.q_proj.weight", [H * HD, D]),
              (p + "self_attn.k_proj.weight", [G * HD, D]),
              (p + "self_attn.v_proj.weight", [G * HD, D]),
              (p + "self_attn.o_proj.weight", [D, H * HD]),
              (p + "post_attention_layernorm.weight", [D]),
              (p + "block_sparse_moe.gate.weight", [E, D])]
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            s += [(q + "w1.weight", [F, D]), (q + "w3.weight", [F, D]), (q + "w2.weight", [D, F])]
    s += [("model.norm.weight", [D]), ("lm_head.weight", [V, D])]
    return s


def init_params(seed):
    """F32 initial weights from torch's RNG: N(0, 0.02), o_proj/w2 N(0, 0.02/sqrt(2L)),
    norms 1 + 0.1 N(0, 1) (not 1, so the norm gradients are not trivial)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in param_shapes():
        z = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 1:
            w = 1.0 + 0.1 * z
        elif name.endswith("o_proj.weight") or name.endswith("w2.weight"):
            w = z * (0.02 / math.sqrt(2 * L))
        else:
            w = z * 0.02
        out[name] = w.to(torch.float32).contiguous()
    return out


# ----------------------------------------------------------------------------- model
def rmsnorm(z, g):
    return z / torch.sqrt((z * z).mean(-1, keepdim=True) + EPS) * g


def rope(u):
    """u: (B, T, nheads, HD); rotate_half convention, positions 0..T-1."""
    t = torch.arange(u.shape[1], dtype=DT)
    freq = torch.tensor([THETA ** (-2.0 * i / HD) for i in range(HD // 2)], dtype=DT)
    ang = t[:, None] * freq[None, :]                       # (T, HD/2)
    c = torch.cos(ang)[None, :, None, :]
    s = torch.sin(ang)[None, :, None, :]
    u1, u2 = u[..., :HD // 2], u[..., HD // 2:]
    return torch.cat([u1 * c - u2 * s, u2 * c + u1 * s], dim=-1)


def attention(a, P, pre):
    Bn, Tn, _ = a.shape
    q = (a @ P[pre + "self_attn.q_proj.weight"].T).view(Bn, Tn, H, HD)
    kk = (a @ P[pre + "self_attn.k_proj.weight"].T).view(Bn, Tn, G, HD)
    v = (a @ P[pre + "self_attn.v_proj.weight"].T).view(Bn, Tn, G, HD)
    q, kk = rope(q), rope(kk)
    causal = torch.ones(Tn, Tn, dtype=torch.bool).tril()
    heads = []
    for i in range(H):
        j = i // (H // G)                                   # GQA: kv head floor(i/(H/G))
        s = q[:, :, i, :] @ kk[:, :, j, :].transpose(1, 2) / math.sqrt(HD)   # (B, T, T)
        s = s.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(s, dim=-1) @ v[:, :, j, :])              # (B, T, HD)
    o = torch.cat(heads, dim=-1)                            # concat heads -> (B, T, H*HD)
    return o @ P[pre + "self_attn.o_proj.weight"].T


def stable_topk(p, k):
    """Per row: the k largest p, ties -> lower expert index first (sort by (-p, index))."""
    rows = []
    for t in range(p.shape[0]):
        pv = p[t].tolist()
        rows.append(sorted(range(p.shape[1]), key=lambda e: (-pv[e], e))[:k])
    return torch.tensor(rows, dtype=torch.long)


def route(r, capacity_factor=None, policy=None, stats=None):
    """r: router logits (N, E). Returns (combine (N, E) with the kept w_te, aux, z, keep (N,k),
    idx (N,k), p). Dropping per model.md; c_e counted before dropping, no renormalization."""
    N = r.shape[0]
    p = torch.softmax(r, dim=-1)
    idx = stable_topk(p.detach(), K)                       # (N, K), slot j = j-th largest
    psel = torch.gather(p, 1, idx)
    w = psel / psel.sum(-1, keepdim=True)
    keep = torch.ones(N, K, dtype=DT)
    pd = p.detach()
    if stats is not None and K < E:                        # top-k decision margins
        srt = torch.sort(pd, dim=-1, descending=True).values
        stats["margin"] = min(stats.get("margin", 1.0), (srt[:, K - 1] - srt[:, K]).min().item())
    if capacity_factor is not None:
        C = math.ceil(capacity_factor * N * K / E)
        for e in range(E):
            asg = [(t, j) for t in range(N) for j in range(K) if idx[t, j].item() == e]
            if policy == "position":
                asg.sort(key=lambda tj: (tj[0], tj[1]))
            elif policy == "probs":
                asg.sort(key=lambda tj: (-pd[tj[0], e].item(), tj[0], tj[1]))
                if stats is not None and len(asg) > C:
                    gap = pd[asg[C - 1][0], e].item() - pd[asg[C][0], e].item()
                    stats["margin"] = min(stats.get("margin", 1.0), gap)
            else:
                raise ValueError(policy)
            for (t, j) in asg[C:]:
                keep[t, j] = 0.0
    combine = torch.zeros(N, E, dtype=DT).scatter_add(1, idx, w * keep)
    c = torch.bincount(idx.flatten(), minlength=E).to(DT)  # before dropping, constant
    P_e = p.mean(0)
    aux = ALPHA * (E / K) * ((c / N) * P_e).sum()
    z = BETA * (torch.logsumexp(r, dim=-1) ** 2).mean()
    return combine, aux, z, keep, idx, p


def expert(m, P, q):
    u = m @ P[q + "w1.weight"].T
    return (u / (1.0 + torch.exp(-u)) * (m @ P[q + "w3.weight"].T)) @ P[q + "w2.weight"].T


def forward(P, x, y, capacity_factor=None, policy=None, stats=None):
    """P: name -> float64 tensor. x, y: (B, T) long. Returns dict of results."""
    Bn, Tn = x.shape
    N = Bn * Tn
    h = P["model.embed_tokens.weight"][x]
    aux_l, z_l, dropped, keeps = [], [], [], []
    for l in range(L):
        pre = f"model.layers.{l}."
        a = rmsnorm(h, P[pre + "input_layernorm.weight"])
        h = h + attention(a, P, pre)
        m = rmsnorm(h, P[pre + "post_attention_layernorm.weight"]).reshape(N, D)
        r = m @ P[pre + "block_sparse_moe.gate.weight"].T
        combine, aux, z, keep, idx, _ = route(r, capacity_factor, policy, stats)
        moe = torch.zeros(N, D, dtype=DT)
        for e in range(E):
            moe = moe + combine[:, e:e + 1] * expert(m, P, pre + f"block_sparse_moe.experts.{e}.")
        h = h + moe.view(Bn, Tn, D)
        aux_l.append(aux); z_l.append(z)
        dropped.append(int((keep == 0).sum().item()))
        keeps.append((idx.clone(), keep.clone()))
    logits = (rmsnorm(h, P["model.norm.weight"]) @ P["lm_head.weight"].T).reshape(N, V)
    yt = y.reshape(N)
    lm = (torch.logsumexp(logits, -1) - logits.gather(1, yt[:, None])[:, 0]).mean()
    aux = sum(aux_l); z = sum(z_l)
    return dict(logits=logits, lm=lm, aux=aux, z=z, loss=lm + aux + z, dropped=dropped,
                aux_layers=aux_l, keeps=keeps)


def to64(P32, grad=True):
    return {n: t.to(DT).clone().requires_grad_(grad) for n, t in P32.items()}


# ----------------------------------------------------------------------------- safetensors
def write_safetensors(path, tensors, metadata):
    codes = {torch.float32: "F32", torch.int32: "I32"}
    header = {"__metadata__": metadata}
    blobs, off = [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        b = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b); off += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj))); f.write(hj)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    import numpy as np
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    meta = hdr.pop("__metadata__", {})
    out = {}
    for name, info in hdr.items():
        a, b = info["data_offsets"]
        dt = {"F32": "<f4", "I32": "<i4"}[info["dtype"]]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out, meta


# ----------------------------------------------------------------------------- self-checks
def check_finite_differences(P32, x, y, cf, pol, gen, nchecks=10):
    P = to64(P32)
    loss = forward(P, x, y, cf, pol)["loss"]
    grads = dict(zip(P.keys(), torch.autograd.grad(loss, list(P.values()))))
    names = list(P.keys())
    # always probe router, a norm, an expert and the embedding, plus random others
    probe = [n for n in names if n.endswith("gate.weight")][:1] + \
            [n for n in names if "layernorm" in n][:1] + \
            [n for n in names if "experts.1.w1" in n][:1] + ["model.embed_tokens.weight"]
    while len(probe) < nchecks:
        probe.append(names[int(torch.randint(len(names), (1,), generator=gen))])
    h = 1e-6
    worst = 0.0
    with torch.no_grad():
        for n in probe:
            t = P[n]
            gflat = grads[n].reshape(-1)
            if n == "model.embed_tokens.weight":      # pick a row of a token that occurs
                i = int(x[0, 0]) * D + int(torch.randint(D, (1,), generator=gen))
            else:
                i = int(torch.randint(t.numel(), (1,), generator=gen))
            base = {k: v.detach() for k, v in P.items()}
            tp = t.detach().clone(); tp.view(-1)[i] += h
            tm = t.detach().clone(); tm.view(-1)[i] -= h
            lp = forward({**base, n: tp}, x, y, cf, pol)["loss"].item()
            lm = forward({**base, n: tm}, x, y, cf, pol)["loss"].item()
            fd = (lp - lm) / (2 * h)
            ag = gflat[i].item()
            err = abs(fd - ag)
            assert err <= 1e-8 + 1e-6 * abs(ag), (n, i, fd, ag)
            worst = max(worst, err)
    return worst


def check_balanced_aux():
    # N = 8 tokens, E = 4, K = 2: token t strongly prefers experts t%E and (t+1)%E, so
    # every expert gets exactly N*K/E assignments and P_e = 1/E by symmetry.
    N = 8
    r = torch.full((N, E), -3.0, dtype=DT)
    for t in range(N):
        r[t, t % E] = 2.0; r[t, (t + 1) % E] = 1.0
    _, aux, _, _, idx, p = route(r)
    c = torch.bincount(idx.flatten(), minlength=E)
    assert torch.all(c == N * K // E)
    assert torch.allclose(p.mean(0), torch.full((E,), 1.0 / E)), p.mean(0)
    assert abs(aux.item() - ALPHA) < 1e-15, aux.item()


def check_ties():
    r = torch.tensor([[0.0, 0.0, 0.0, 0.0],       # all tied -> 0, 1
                      [1.0, 2.0, 2.0, 0.0],       # tie for first -> 1 (slot 0), 2 (slot 1)
                      [3.0, 1.0, 3.0, 3.0],       # three tied -> 0, 2
                      [0.0, 1.0, 0.5, 1.0]])      # tie for first -> 1, 3
    _, _, _, _, idx, _ = route(r)
    assert idx.tolist() == [[0, 1], [1, 2], [0, 2], [1, 3]], idx.tolist()


def check_dropping_semantics():
    # 6 tokens all route to experts {0, 1} (expert 0 first); capacity factor such that
    # C = ceil(cf*6*2/4) = 2: expert 0 keeps 2 of 6, expert 1 keeps 2 of 6.
    N = 6
    g = torch.Generator().manual_seed(7)
    r = torch.tensor([[3.0 + 0.1 * t, 2.0 - 0.05 * t, -1.0, -2.0] for t in range(N)])
    cf = 2.0 / 3.0  # C = ceil(2/3 * 6 * 2 / 4) = 2
    comb_free, aux_free, z_free, keep_free, idx, p = route(r)
    for pol, kept0, kept1 in [("position", {0, 1}, {0, 1}), ("probs", {5, 4}, {0, 1})]:
        comb, aux, z, keep, idx2, _ = route(r, cf, pol)
        assert torch.equal(idx, idx2)
        w = torch.gather(p, 1, idx); w = w / w.sum(-1, keepdim=True)
        for t in range(N):
            # slot 0 -> expert 0, slot 1 -> expert 1 (p_t0 > p_t1 for every t)
            assert idx[t].tolist() == [0, 1]
            k0, k1 = t in kept0, t in kept1
            assert keep[t].tolist() == [float(k0), float(k1)], (pol, t, keep[t])
            # a dropped assignment contributes nothing; the other weight is NOT renormalized
            assert comb[t, 0].item() == (w[t, 0].item() if k0 else 0.0)
            assert comb[t, 1].item() == (w[t, 1].item() if k1 else 0.0)
            assert comb[t, 2].item() == 0.0 and comb[t, 3].item() == 0.0
        assert int((keep == 0).sum()) == 8
        # c_e counts assignments before dropping: aux and z unchanged by dropping
        assert aux.item() == aux_free.item() and z.item() == z_free.item()
    # moe output check through a real expert layer: dropped slot adds nothing
    m = torch.randn(N, D, generator=g)
    Pm = {f"e{e}.w1.weight": 0.1 * torch.randn(F, D, generator=g) for e in range(E)}
    Pm.update({f"e{e}.w3.weight": 0.1 * torch.randn(F, D, generator=g) for e in range(E)})
    Pm.update({f"e{e}.w2.weight": 0.1 * torch.randn(D, F, generator=g) for e in range(E)})
    comb, _, _, keep, _, _ = route(r, cf, "position")
    out = sum(comb[:, e:e + 1] * expert(m, Pm, f"e{e}.") for e in range(E))
    w = torch.gather(p, 1, idx); w = w / w.sum(-1, keepdim=True)
    t = 3  # dropped on both experts under position policy -> zero output
    assert torch.all(out[t] == 0)
    t = 1  # kept on both
    ref = w[t, 0] * expert(m[t:t + 1], Pm, "e0.")[0] + w[t, 1] * expert(m[t:t + 1], Pm, "e1.")[0]
    assert torch.allclose(out[t], ref, atol=1e-15)


# ----------------------------------------------------------------------------- training
def lr_at(s):
    W, S = TRAIN["warmup"], TRAIN["steps"]
    if s < W:
        return TRAIN["lr_max"] * (s + 1) / W
    return TRAIN["lr_min"] + 0.5 * (TRAIN["lr_max"] - TRAIN["lr_min"]) * \
        (1 + math.cos(math.pi * (s - W) / (S - W)))


def batches(tokens, s):
    GB, MB, n_seq = TRAIN["global_batch"], TRAIN["micro_batch"], TRAIN["n_seq"]
    seqs = [(s * GB + j) % n_seq for j in range(GB)]
    out = []
    for mb in range(GB // MB):
        ids = seqs[mb * MB:(mb + 1) * MB]
        x = torch.stack([tokens[i * T:i * T + T] for i in ids]).long()
        y = torch.stack([tokens[i * T + 1:i * T + T + 1] for i in ids]).long()
        out.append((x, y))
    return out


def step_grads(P, tokens, s, stats):
    mbs = batches(tokens, s)
    res = [forward(P, x, y, stats=stats) for (x, y) in mbs]
    n = len(res)
    loss = sum(r["loss"] for r in res) / n
    grads = torch.autograd.grad(loss, list(P.values()))
    rec = dict(loss=loss.item(), lm=sum(r["lm"].item() for r in res) / n,
               aux=sum(r["aux"].item() for r in res) / n, z=sum(r["z"].item() for r in res) / n)
    return grads, rec


def train_by_hand(P32, tokens, stats):
    P = to64(P32)
    names = list(P.keys())
    b1, b2, eps, wd = TRAIN["beta1"], TRAIN["beta2"], TRAIN["eps"], TRAIN["weight_decay"]
    m = {n: torch.zeros_like(P[n]) for n in names}
    v = {n: torch.zeros_like(P[n]) for n in names}
    recs = []
    for s in range(TRAIN["steps"]):
        grads, rec = step_grads(P, tokens, s, stats)
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        clip = min(1.0, TRAIN["max_norm"] / (norm + 1e-6))
        lr = lr_at(s)
        t = s + 1
        with torch.no_grad():
            for n, g in zip(names, grads):
                g = g * clip
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                p = P[n]
                if p.dim() == 2:
                    p.mul_(1 - lr * wd)
                p.sub_(lr * (m[n] / (1 - b1 ** t)) / (torch.sqrt(v[n] / (1 - b2 ** t)) + eps))
        rec.update(grad_norm=norm, lr=lr, clip=clip)
        recs.append(rec)
    return {n: p.detach() for n, p in P.items()}, recs


def train_torch_optim(P32, tokens):
    P = to64(P32)
    decay = [p for p in P.values() if p.dim() == 2]
    nodecay = [p for p in P.values() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=TRAIN["lr_max"], betas=(TRAIN["beta1"], TRAIN["beta2"]),
                            eps=TRAIN["eps"], foreach=False)
    recs = []
    for s in range(TRAIN["steps"]):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(s)
        opt.zero_grad()
        mbs = batches(tokens, s)
        loss = sum(forward(P, x, y)["loss"] for (x, y) in mbs) / len(mbs)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(P.values()), TRAIN["max_norm"]).item()
        opt.step()
        recs.append(dict(loss=loss.item(), grad_norm=norm))
    return {n: p.detach() for n, p in P.items()}, recs


# ----------------------------------------------------------------------------- fp32 replay
def fp32_replay(P32, x, y, tokens, golden):
    """Diagnostic (--fp32-replay): rerun everything in float32 with this same code and print
    how far it lands from the float64 golden values -- a guide for the C tests' tolerances."""
    global DT
    DT = torch.float32
    torch.set_default_dtype(torch.float32)
    for cname, cf, pol in CASES:
        P = to64(P32)
        out = forward(P, x, y, cf, pol)
        grads = torch.autograd.grad(out["loss"], list(P.values()))
        dl = (out["logits"].detach() - golden[f"{cname}.logits"]).abs().max().item()
        dg = max((g - golden[f"{cname}.grad.{n}"]).abs().max().item()
                 for n, g in zip(P.keys(), grads))
        print(f"fp32 replay {cname:15s}: |loss diff| {abs(out['loss'].item() - golden[cname + '.loss'].item()):.2e}"
              f"  max |logit diff| {dl:.2e}  max |grad diff| {dg:.2e}")
    final, recs = train_by_hand(P32, tokens, {})
    dl = max(abs(r["loss"] - golden["train.loss"][s].item()) for s, r in enumerate(recs))
    dp = max((p - golden[f"train.final.{n}"]).abs().max().item() for n, p in final.items())
    print(f"fp32 replay train: max |step loss diff| {dl:.2e}  max |final param diff| {dp:.2e}")


# ----------------------------------------------------------------------------- main
def main():
    torch.manual_seed(0)
    check_ties(); print("self-check: top-k ties -> lower expert index: OK")
    check_balanced_aux(); print("self-check: perfectly balanced routing gives aux == alpha: OK")
    check_dropping_semantics()
    print("self-check: dropping semantics (dropped adds nothing, no renormalization, "
          "c_e before dropping, position/probs order): OK")

    P32 = init_params(INIT_SEED)
    n_tok = TRAIN["n_seq"] * T + 1
    tokens = torch.randint(0, V, (n_tok,), generator=torch.Generator().manual_seed(DATA_SEED),
                           dtype=torch.int64).to(torch.int32)
    x = torch.stack([tokens[b * T:b * T + T] for b in range(B)]).long()
    y = torch.stack([tokens[b * T + 1:b * T + T + 1] for b in range(B)]).long()
    N = B * T

    golden = {"inputs": x.to(torch.int32), "targets": y.to(torch.int32)}
    dropsets = {}
    aux0 = {}
    for cname, cf, pol in CASES:
        P = to64(P32)
        stats = {}
        out = forward(P, x, y, cf, pol, stats)
        grads = torch.autograd.grad(out["loss"], list(P.values()))
        golden[f"{cname}.logits"] = out["logits"].detach().float()
        for key, val in [("lm_loss", out["lm"]), ("aux_loss", out["aux"]),
                         ("z_loss", out["z"]), ("loss", out["loss"])]:
            golden[f"{cname}.{key}"] = val.detach().reshape(1).float()
        golden[f"{cname}.dropped"] = torch.tensor(out["dropped"], dtype=torch.float32)
        for n, g in zip(P.keys(), grads):
            golden[f"{cname}.grad.{n}"] = g.float()
        dropsets[cname] = [{(t, int(idx[t, j])) for t in range(N) for j in range(K)
                            if keep[t, j] == 0} for (idx, keep) in out["keeps"]]
        aux0[cname] = out["aux_layers"][0].item()
        C = math.ceil(cf * N * K / E) if cf else None
        print(f"case {cname:15s} C={C}  loss={out['loss'].item():.10f} lm={out['lm'].item():.10f} "
              f"aux={out['aux'].item():.10f} z={out['z'].item():.10f} dropped={out['dropped']} "
              f"min routing margin={stats['margin']:.3e}")
        assert stats["margin"] > MIN_MARGIN, "routing too close to a tie: change INIT_SEED"
        if cf is not None:
            assert all(d > 0 for d in out["dropped"]), "no assignment dropped"

    # c_e before dropping: layer 0 routes identical inputs in all cases -> identical aux
    assert abs(aux0["dropless"] - aux0["cf075_position"]) < 1e-15
    assert abs(aux0["dropless"] - aux0["cf075_probs"]) < 1e-15
    differ = [l for l in range(L) if dropsets["cf075_position"][l] != dropsets["cf075_probs"][l]]
    assert differ, "position and probs drop the same assignments: change INIT_SEED"
    print(f"self-check: position and probs drop different assignments in layers {differ}: OK")

    gen = torch.Generator().manual_seed(99)
    for cname, cf, pol in CASES:
        worst = check_finite_differences(P32, x, y, cf, pol, gen)
        print(f"self-check: autograd vs central finite differences ({cname}, 10 elements): "
              f"max abs err {worst:.2e}: OK")

    # training (dropless)
    stats = {}
    final, recs = train_by_hand(P32, tokens, stats)
    final_t, recs_t = train_torch_optim(P32, tokens)
    for a, b in zip(recs, recs_t):
        assert abs(a["loss"] - b["loss"]) < 1e-12 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-10
    maxdiff = max((final[n] - final_t[n]).abs().max().item() for n in final)
    assert maxdiff < 1e-12, maxdiff
    print(f"self-check: hand AdamW+clipping == torch.optim.AdamW+clip_grad_norm_ "
          f"(max param diff {maxdiff:.1e}): OK")
    assert stats["margin"] > MIN_MARGIN, "training routing too close to a tie"
    for s, r in enumerate(recs):
        print(f"train step {s}: loss={r['loss']:.10f} lm={r['lm']:.10f} aux={r['aux']:.10f} "
              f"z={r['z']:.10f} grad_norm={r['grad_norm']:.8f} clip={r['clip']:.6f} lr={r['lr']:.6g}")
    print(f"training min routing margin {stats['margin']:.3e}")
    golden["train_tokens"] = tokens
    for key, rk in [("loss", "loss"), ("lm_loss", "lm"), ("aux_loss", "aux"), ("z_loss", "z"),
                    ("grad_norm", "grad_norm"), ("lr", "lr")]:
        golden[f"train.{key}"] = torch.tensor([r[rk] for r in recs], dtype=torch.float32)
    for n, p in final.items():
        golden[f"train.final.{n}"] = p.float()

    meta = {
        "description": "vdist golden values from tests/golden/gen_golden.py (float64 PyTorch "
                       "reference of docs/model.md, stored as F32)",
        "config": json.dumps(CFG),
        "router_aux_loss_coef": str(ALPHA), "router_z_loss_coef": str(BETA),
        "micro_batch": str(B), "seq_len": str(T), "tokens_per_micro_batch": str(N),
        "init_seed": str(INIT_SEED), "data_seed": str(DATA_SEED),
        "init": "torch.randn float32 per tensor in HF order: std 0.02, o_proj/w2 0.02/sqrt(2L), "
                "norms 1+0.1*randn",
        "cases": "dropless; cf075_position: moe_capacity_factor 0.75 moe_drop_policy position; "
                 "cf075_probs: moe_capacity_factor 0.75 moe_drop_policy probs; capacity C = 12",
        "case_values": "<case>.grad.* = d(<case>.loss)/d(param) for the single micro-batch "
                       "(inputs, targets); <case>.dropped = dropped (token,slot) per layer",
        "train": json.dumps(dict(TRAIN, schedule="cosine", policy="dropless",
                                 n_tokens=n_tok)),
        "train_values": "per step: loss, lm/aux/z = means over the step's 2 micro-batches; "
                        "grad_norm = global L2 norm before clipping; lr = lr of the step; "
                        "train.final.* = params after 5 AdamW steps",
    }
    cfg_path = os.path.join(HERE, "tiny_config.json")
    with open(cfg_path, "w") as f:
        json.dump(CFG, f, indent=2); f.write("\n")
    init_path = os.path.join(HERE, "tiny_init.safetensors")
    write_safetensors(init_path, P32, {"format": "pt", "init_seed": str(INIT_SEED)})
    gold_path = os.path.join(HERE, "tiny_golden.safetensors")
    write_safetensors(gold_path, golden, meta)

    # read back and compare
    for path, ref in [(init_path, P32), (gold_path, golden)]:
        back, _ = read_safetensors(path)
        assert list(back.keys()) == list(ref.keys())
        for n in ref:
            assert back[n].dtype == ref[n].dtype and torch.equal(back[n], ref[n]), n
    print("self-check: safetensors files read back identical: OK")
    for pth in (cfg_path, init_path, gold_path):
        print(f"wrote {os.path.relpath(pth)} ({os.path.getsize(pth)} bytes)")
    if "--fp32-replay" in sys.argv[1:]:
        fp32_replay(P32, x, y, tokens, golden)


if __name__ == "__main__":
    sys.exit(main())
