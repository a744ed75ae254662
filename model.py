"""
The flow language model: a DiT denoiser over one-hot token vectors, and the flow mathematics around it.

Method: "Flow Map Language Models: One-step Language Modeling via Continuous Denoising" (arXiv 2602.16813);
every formula below cites its section of FLM.md. Architecture: the authors' DiT "small" (FLM.md 9), written
after facebookresearch/DiT (adaLN-Zero) and karpathy/nanoGPT.

Conventions (one, stated once):
- x_0 ~ N(0, I) is noise, x_1 = one_hot(tokens) is data, x_t = (1 - t) x_0 + t x_1, t from 0 (noise) to 1 (data).
- tau in [0, 1] is the reparameterized time (decoding error rate, FLM.md 3); the network only ever sees tau.
- Flow maps take (x_s, s, t) with s <= t, in physical time.
- Shape letters: B batch, L sequence length, V one-hot size (vocabulary), D hidden size.
- The projected state: the network reads x only through h = x @ E (E = `DiT.embed`, V x D), so everything
  linear in x runs on h in R^{B x L x D} and the (B, L, V) state never exists (DESIGN.md). The dense
  V-space path stays available (`dense=True`) as the reference the tests compare against.
"""

import collections
import json
import math
import os
import pickle
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # flash-attn is optional and GPU-only; its softcap argument keeps the attention soft-cap exact
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None
try:  # PyTorch's fused attention with a score_mod: the exact soft-cap without (B, H, L, L) scores in memory
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:
    flex_attention = None

# "auto": flash-attn if importable and on CUDA, else flex_attention on CUDA, else the explicit formula. flex has
# no backward on CPU and neither fused kernel supports forward-mode AD, so CPU training runs the explicit formula.
ATTENTION = "auto"

# -----------------------------------------------------------------------------
# small pure functions


def modulate(x, shift, scale):
    """adaLN modulation; x (B, L, D), shift and scale (B, 1, D)."""
    return x * (1 + scale) + shift


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(L, head_dim, device, base=10_000.0):
    """cos and sin tables of rotary embeddings, (L, 1, head_dim) each, fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(L, device=device, dtype=torch.float32), inv_freq)  # (L, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (L, 1, head_dim)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """x (B, L, H, head_dim) -> same, rotated in fp32."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


_flex_compiled = None


def _flex(q, k, v, softcap):
    """flex_attention, compiled once, with softcap * tanh(score / softcap) as its score_mod; (B, H, L, d)."""
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)

    def softcap_mod(score, b, h, q_idx, kv_idx):  # score is already scaled by 1 / sqrt(d)
        return softcap * torch.tanh(score / softcap)

    run = _flex_compiled if q.is_cuda else flex_attention  # eager flex on CPU: the reference the tests use
    return run(q, k, v, score_mod=softcap_mod)


def attention(q, k, v, softcap, backend=None):
    """Non-causal attention with logits soft-capped as softcap * tanh(logits / softcap); (B, L, H, d) each."""
    backend = backend or ATTENTION
    if backend == "auto":
        backend = ("flash" if flash_attn_func is not None else "flex" if flex_attention is not None
                   else "explicit") if q.is_cuda else "explicit"
    if backend == "flash":
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), causal=False, softcap=softcap)
        return out.to(q.dtype)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, L, d)
    if backend == "flex":
        return _flex(q, k, v, softcap).transpose(1, 2)
    # the explicit formula: exact, O(L^2) memory, differentiable in both modes on every device
    logits = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))  # (B, H, L, L)
    logits = softcap * torch.tanh(logits / softcap)
    out = logits.softmax(dim=-1).to(v.dtype) @ v  # (B, H, L, d)
    return out.transpose(1, 2)  # (B, L, H, d)


# -----------------------------------------------------------------------------
# randomness by row: the same run at any world size
#
# Every random number of a training step (the noise x_0, the dropout masks) is a pure function of (row key, stream,
# index), and a row's key is a function of (seed, step, slot in the global batch). The global batch, its noise and
# its dropout are therefore the same whatever the number of ranks and micro-steps, on CPU and CUDA alike, and the
# integer hash below is plain tensor arithmetic that torch.compile fuses into its kernels.

_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
NOISE, GIVEN, DROPOUT = 0, 1 << 23, 1 << 24  # stream bases: noise stream i uses 2i and 2i + 1, dropout of layer l
# uses 2l and 2l + 1, the conditioning masks GIVEN


def _mul32(x, c):
    """x * c mod 2^32 for x in [0, 2^32) and a constant c < 2^32, split in 16-bit halves so int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    """lowbias32 (C. Wellons), a bijective 32-bit mix, on int64 tensors or Python ints in [0, 2^32)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_key(seed, step, slot):
    """The 63-bit key of one row of the global batch (step -1: evaluation)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ (step & _M64)) ^ (slot & _M64)) >> 1


def slot_keys(seed, step, slots):
    """int64 keys (n,) of the global-batch slots at a step."""
    return torch.tensor([row_key(seed, step, int(s)) for s in slots], dtype=torch.int64)


def step_generator(seed, step):
    """A CPU generator for the draws that a step shares across its whole batch (times, permutations)."""
    return torch.Generator().manual_seed(row_key(seed, step, -1))


def row_uniform(keys, n, stream):
    """U(0, 1) float32 (B, n), 24-bit resolution: entry (b, i) is a function of (keys[b], stream, i) alone."""
    stream = _hash32(stream & _M32)
    row = _hash32(_hash32((keys & _M32) ^ stream) ^ ((keys >> 32) & _M32))  # (B,)
    bits = _hash32(_hash32(torch.arange(n, device=keys.device))[None] ^ row[:, None])  # (B, n)
    return ((bits >> 8).float() + 0.5) * 2.0 ** -24


def row_normal(keys, n, stream):
    """N(0, 1) float32 (B, n) by Box-Muller from two uniform streams (tails cut at 5.9 sigma by the resolution)."""
    u1, u2 = row_uniform(keys, n, 2 * stream), row_uniform(keys, n, 2 * stream + 1)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def dropout(x, p, keys, stream):
    """Inverted dropout of x (B, ...) whose mask is a function of (row key, stream, index); torch's generator when
    no keys are given."""
    if p == 0:
        return x
    if keys is None:
        return F.dropout(x, p)
    keep = row_uniform(keys, x[0].numel(), stream).view_as(x) >= p
    return x * keep / (1 - p)


# -----------------------------------------------------------------------------
# embedders


class TimestepEmbedder(nn.Module):
    """Embeds tau in [0, 1] (unscaled) as sinusoidal features -> MLP (FLM.md 9)."""

    def __init__(self, cond_dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, tau):  # (B,) -> (B, cond_dim)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
        args = tau.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


# -----------------------------------------------------------------------------
# attention / MLP / block


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in fp32."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), (x.size(-1),), self.weight)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning (FLM.md 9)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.n_embd
        self.n_head, self.softcap = cfg.n_head, cfg.attn_softcap
        self.norm1, self.norm2 = LayerNorm(D), LayerNorm(D)
        self.attn_qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * D, D))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * D)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, c, cos, sin, p, keys, stream):  # x (B, L, D), c (B, cond_dim); p: dropout
        B, L, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # each (B, 1, D)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k, v = qkv.view(B, L, 3, self.n_head, D // self.n_head).unbind(dim=2)  # each (B, L, H, d)
        y = attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, self.softcap)
        x = x + gate_msa * dropout(self.attn_out(y.reshape(B, L, D)), p, keys, stream)
        x = x + gate_mlp * dropout(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), p, keys, stream + 1)
        return x


# -----------------------------------------------------------------------------
# final layer


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN (shift, scale) -> Linear(D, V); all zero-initialized, so a fresh model is uniform."""

    def __init__(self, cfg):
        super().__init__()
        self.norm_final = LayerNorm(cfg.n_embd)
        self.linear = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.n_embd)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):  # (B, L, D) -> (B, L, V)
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# -----------------------------------------------------------------------------
# config


@dataclass
class DiTConfig:
    vocab_size: int = 50257  # V, the one-hot size (a compact vocabulary makes it smaller, see data.py)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # D, hidden size
    cond_dim: int = 128  # time conditioning size
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * D
    dropout: float = 0.1  # dropout on the attention and MLP residual branches
    attn_softcap: float = 50.0  # attention logits -> softcap * tanh(logits / softcap)
    logit_cap: float = 0.0  # if > 0, output logits -> cap * tanh(logits / cap) (the authors' later code: 30)
    two_time: bool = False  # flow-map model: a second time embedder for tau_t (FLM.md 5)


# Presets of model shape; vocab_size is always set from the data.
MODEL_PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, cond_dim=32, dropout=0.0),  # tests
    "ptb": dict(n_layer=4, n_head=4, n_embd=128, cond_dim=64, dropout=0.0),  # CPU quick start
    "small": dict(n_layer=12, n_head=12, n_embd=768, cond_dim=128, dropout=0.1),  # the paper's, ~170M at V=50257
}

# -----------------------------------------------------------------------------
# the DiT


class DiT(nn.Module):
    """f(h, tau_s[, tau_t]) -> logits (B, L, V), with h = x @ E the projected one-hot state. keys (B,): the rows'
    keys, which make the dropout masks of a row independent of the batch it is in (training only)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.n_embd))  # E, V x D (FLM.md 9)
        nn.init.kaiming_uniform_(self.embed, a=math.sqrt(5))
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        self.t2_embedder = TimestepEmbedder(cfg.cond_dim) if cfg.two_time else None
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.n_layer)])
        self.final_layer = FinalLayer(cfg)

    def add_second_time(self):
        """Turn a one-time denoiser into a two-time flow-map model that starts equal to it (FLM.md 6)."""
        self.config.two_time = True
        self.t2_embedder = TimestepEmbedder(self.config.cond_dim).to(self.embed.device)
        nn.init.zeros_(self.t2_embedder.mlp[2].weight)
        nn.init.zeros_(self.t2_embedder.mlp[2].bias)

    def project(self, x):
        """x (B, L, V) -> x @ E (B, L, D), in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.embed

    def forward(self, h, tau_s, tau_t=None, keys=None):
        c = self.t_embedder(tau_s)
        if self.t2_embedder is not None:
            c = c + self.t2_embedder(tau_t)
        c = F.silu(c)  # (B, cond_dim)
        cos, sin = rotary_cos_sin(h.size(1), self.config.n_embd // self.config.n_head, h.device)
        p, x = (self.config.dropout if self.training else 0.0), h
        for i, block in enumerate(self.blocks):
            x = block(x, c, cos, sin, p, keys, DROPOUT + 2 * i)
        logits = self.final_layer(x, c).float()
        if self.config.logit_cap > 0:
            logits = self.config.logit_cap * torch.tanh(logits / self.config.logit_cap)
        return logits

    def num_params(self, exclude_embed=False):
        return sum(p.numel() for n, p in self.named_parameters() if not (exclude_embed and n == "embed"))

    def flops_per_token(self, L):
        """Training FLOPs per token (forward + backward); the projected input layer costs O(V D^2 / (B L))."""
        cfg = self.config
        return 6 * self.num_params(exclude_embed=True) + 12 * cfg.n_layer * cfg.n_embd * L


# -----------------------------------------------------------------------------
# the flow math: time warp (FLM.md 3)


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of the increasing table (xp, fp) at x, on x's device, no host sync."""
    x64 = x.double().clamp(0.0, 1.0)
    i = torch.searchsorted(xp, x64, right=True).clamp(1, len(xp) - 1)
    w = (x64 - xp[i - 1]) / (xp[i] - xp[i - 1])
    return (fp[i - 1] + w * (fp[i] - fp[i - 1])).to(x.dtype)


class TimeWarp:
    """tau(t) = (q(t) - 1/V) / (1 - 1/V), q the argmax decoding rate of x_t (FLM.md 3), tabulated once."""

    def __init__(self, vocab_size, n_grid=10_000, n_quad=100):
        V = vocab_size
        nodes, weights = np.polynomial.hermite.hermgauss(n_quad)
        z = torch.tensor(nodes * math.sqrt(2.0))  # E_{z~N(0,1)} f(z) = sum_k w_k / sqrt(pi) f(sqrt(2) x_k)
        w = torch.tensor(weights / math.sqrt(math.pi))
        t = torch.linspace(0, 1, n_grid + 1, dtype=torch.float64)[:-1]
        m = t / (1 - t)
        # P_e = 1 - q = E[1 - Phi(z + m)^(V-1)], with expm1 so that tiny error rates keep their precision
        p_err = (w * -torch.expm1((V - 1) * torch.special.log_ndtr(z + m[:, None]))).sum(-1)
        tau = 1 - V / (V - 1) * p_err
        # the quadrature's error is about 1e-7 in tau near t = 0 (it can dip below 0 there), and near t = 1
        # the error rate underflows so tau is 1.0 in float64: keep the strictly increasing points, then (1, 1)
        tau[0] = 0.0
        keep = torch.cat([torch.tensor([True]), tau[1:] > torch.cummax(tau, 0).values[:-1]]) & (tau < 1.0)
        self.t_table = torch.cat([t[keep], torch.ones(1, dtype=torch.float64)])
        self.tau_table = torch.cat([tau[keep], torch.ones(1, dtype=torch.float64)])
        self._tables = {}

    def _on(self, device):
        if device not in self._tables:
            self._tables[device] = (self.t_table.to(device), self.tau_table.to(device))
        return self._tables[device]

    def t(self, tau):
        """Physical time of reparameterized time tau (any shape)."""
        t_tab, tau_tab = self._on(tau.device)
        return _interp(tau, tau_tab, t_tab)

    def tau(self, t):
        """Reparameterized time of physical time t (any shape)."""
        t_tab, tau_tab = self._on(t.device)
        return _interp(t, t_tab, tau_tab)

    def dtau_dt(self, t):
        """d tau / dt at physical time t: the slope of the interpolated segment, so exactly the derivative of
        tau(t) as computed here (the chain rule of the Lagrangian and Eulerian objectives)."""
        t_tab, tau_tab = self._on(t.device)
        i = torch.searchsorted(t_tab, t.double().clamp(0.0, 1.0), right=True).clamp(1, len(t_tab) - 1)
        return ((tau_tab[i] - tau_tab[i - 1]) / (t_tab[i] - t_tab[i - 1])).to(t.dtype)


def stratified_tau(n, generator):
    """n stratified tau ~ U(0, 1), randomly permuted: tau_i = (u + i) / n (FLM.md 3); slice it per rank."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    tau = (u + torch.arange(n, dtype=torch.float64)) / n
    return tau[torch.randperm(n, generator=generator)].float()


# -----------------------------------------------------------------------------
# the flow math: interpolant, denoiser, flow map, semigroup (FLM.md 1, 2, 4, 5)


def unwrap(model):
    """The DiT inside DDP and torch.compile wrappers, for its E, config and project: every function below takes
    the bare, the DDP-wrapped and the compiled module alike."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model._orig_mod
    return model


def noise_factor(embed):
    """C (D, D) with C C^T = E^T E, so that z C^T ~ x_0 @ E for z ~ N(0, I_D) (DESIGN.md, projected state)."""
    e = embed.double()
    return torch.linalg.cholesky(e.T @ e).to(embed.dtype)


def joint_noise_factor(embed):
    """W (D', D') with W^T W = E^T E for an E (V, D') whose columns may be dependent, as in the joint state below,
    where the student's E starts equal to the teacher's. With E^T E = U diag(lam) U^T, Q = E U diag(lam)^-1/2 is an
    orthonormal basis of E's columns (its dependent directions dropped) and W = Q^T E, so x_0 @ E = (x_0 @ Q) W with
    x_0 @ Q ~ N(0, I) exactly. Q is held without gradient: the gradient in E is then the pathwise one of x_0 @ E
    projected on E's column space, whose complement is independent of the loss, so it is unbiased."""
    with torch.no_grad():
        e = embed.double()
        lam, U = torch.linalg.eigh(e.T @ e)
        inv_sqrt = torch.where(lam > lam.max() * 1e-10, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
        Q = (e @ (U * inv_sqrt)).to(embed.dtype)
    return Q.T @ embed


class JointView(nn.Module):
    """Two DiTs with input matrices of their own read one x: the state is h = x @ [E_a, E_b] (B, L, D_a + D_b) and
    each network reads its own columns. Distillation with a trained student E reads the teacher and the student
    this way, and autoguidance the model and its weaker checkpoint. The noise x_0 @ [E_a, E_b] is one Gaussian of
    dimension D_a + D_b (joint_noise_factor), and the flow-map arithmetic is linear, so it runs on h unchanged."""

    def __init__(self, net, embed, cols):
        super().__init__()
        self.net, self.embed, self.cols, self.config = net, embed, cols, net.config

    def project(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.embed

    def forward(self, h, *args, **kwargs):
        return self.net(h[..., self.cols], *args, **kwargs)


def joint_views(a, b):
    """JointView of each of two DiTs on the state x @ [E_a, E_b]."""
    a, b = unwrap(a), unwrap(b)
    embed, D = torch.cat([a.embed, b.embed], dim=1), a.config.n_embd
    return JointView(a, embed, slice(0, D)), JointView(b, embed, slice(D, None))


def draw_noise(model, keys, L, stream=NOISE, dense=False):
    """x_0 ~ N(0, I) for rows with keys (B,): dense (B, L, V), or projected x_0 @ E (B, L, D) without forming x_0."""
    model = unwrap(model)
    E, keys = model.embed, keys.to(model.embed.device)
    (V, D), B = E.shape, len(keys)
    if dense:  # the authors' (B, L, V) state: torch's generator per row (the hash is slow at V = 50,257 on CPU)
        return torch.stack([torch.randn(L, V, device=E.device, generator=torch.Generator(E.device).manual_seed(
            row_key(int(k), stream, 0))) for k in keys.tolist()])
    if V <= D:  # E^T E is singular; such vocabularies are tiny, so draw x_0 itself
        return model.project(row_normal(keys, L * V, stream).view(B, L, V))
    z = row_normal(keys, L * D, stream).view(B, L, D)
    if isinstance(model, JointView):
        return z @ joint_noise_factor(E)
    return z @ noise_factor(E).T


def interpolate(x0, x1, t):
    """x_t = (1 - t) x_0 + t x_1 (FLM.md 1); t (B,) broadcast over the trailing dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * x1


def noisy_input(model, tokens, t, keys, dense=False, given=None):
    """The network input h_t = x_t @ E for tokens (B, L) at times t (B,), noise from the rows' keys -> (B, L, D).
    given (B, L) bool: positions fed clean, x_1 = one_hot(token), at every time (conditioning)."""
    model = unwrap(model)
    x0 = draw_noise(model, keys, tokens.size(1), dense=dense)
    if dense:
        x1 = F.one_hot(tokens, model.config.vocab_size).float()
        return model.project(clamp_given(interpolate(x0, x1, t), given, x1))
    x1 = model.embed[tokens]  # one_hot(tokens) @ E = E[tokens]
    return clamp_given(interpolate(x0, x1, t), given, x1)


def flm_loss(model, tokens, tau, warp, keys, dense=False, given=None):
    """Token cross-entropy of the denoiser at reparameterized times tau (B,) (FLM.md 2); keys (B,) give each
    row its noise and dropout. given (B, L): positions fed clean and left out of the loss (conditioning)."""
    keys = keys.to(tokens.device)
    h = noisy_input(model, tokens, warp.t(tau), keys, dense, given)
    logits = model(h, tau, keys=keys)
    if given is None:
        return F.cross_entropy(logits.view(-1, logits.size(-1)), tokens.view(-1))
    return free_mean(F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none"), given)


def soft_cross_entropy(logits, target, given=None):
    """-sum_V target * log_softmax(logits), mean over positions (FLM.md 6), or over the free ones of each row."""
    ce = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return ce.mean() if given is None else free_mean(ce, given)


# -----------------------------------------------------------------------------
# conditioning: given positions stay clean at every time and are left out of the loss (the authors' answer to
# prompts, david3684/flm#8); the time stays one global time per row


def given_mask(keys, L, frac):
    """(B, L) bool from each row's key: a row is conditional with probability frac; half of those are given a
    prefix of 1 to L - 1 tokens (a prompt), the others alternating given and free spans (infilling), a boundary
    after each position with probability 4 / L and a random first span. The last position of an all-given row
    is freed."""
    u = row_uniform(keys, L + 4, GIVEN)
    cond, prefix = u[:, :1] < frac, u[:, 1:2] < 0.5
    pos = torch.arange(L, device=keys.device)
    prompt = pos < 1 + (u[:, 2:3] * (L - 1)).long()
    spans = ((u[:, 4:] < 4 / L).long().cumsum(1) + (u[:, 3:4] < 0.5).long()) % 2 == 1
    given = cond & torch.where(prefix, prompt, spans)
    return given & ~(given.all(1, keepdim=True) & (pos == L - 1))


def clamp_given(h, given, clean):
    """h with its given positions set to their clean state; h itself when nothing is given."""
    return h if given is None else torch.where(given[..., None], clean, h)


def free_mean(loss, given):
    """Mean of a per-position loss (B, L) over each row's free positions, then over rows: a row weighs the same
    whatever it is given, so the mean does not depend on how the batch is split."""
    free = (~given).float()
    return ((loss * free).sum(1) / free.sum(1).clamp_min(1)).mean()


def denoiser(model, h, tau_s, tau_t=None, keys=None):
    """D = softmax(f(h, tau_s[, tau_t])) in fp32: the posterior mean of x_1, or delta_{s,t} (FLM.md 2, 5)."""
    return model(h, tau_s, tau_t, keys=keys).float().softmax(dim=-1)


def flow_map(x, delta, s, t):
    """X_{s,t}(x) = ((1 - t) x + (t - s) delta) / (1 - s) (FLM.md 5). With delta = D_s it is the Euler step
    x + (t - s) (D - x) / (1 - s) of FLM.md 4. s, t: scalars or (B,) tensors."""
    if torch.is_tensor(s) and s.dim() == 1:
        s, t = s.view(-1, 1, 1), t.view(-1, 1, 1)
    return ((1 - t) * x + (t - s) * delta) / (1 - s)


def semigroup_weight(s, u, t):
    """g = (1 - t)(u - s) / ((1 - u)(t - s)) for s < u < t (FLM.md 5); g is in [0, 1]."""
    g = (1 - t) * (u - s) / ((1 - u) * (t - s))
    return g.clamp(0.0, 1.0)  # float32 rounding when u is within an ulp of s or t


@torch.no_grad()
def semigroup_target(model, h_s, tau_s, tau_u, tau_t, warp, keys=None, given=None, clean=None):
    """g delta_{s,u}(x_s) + (1 - g) delta_{u,t}(X_{s,u}(x_s)), from the model itself (FLM.md 6); (B, L, V).
    keys + 1 and keys + 2 give the two passes dropout masks of their own; given positions stay clean."""
    model = unwrap(model)
    s, u, t = warp.t(tau_s), warp.t(tau_u), warp.t(tau_t)
    more = (lambda i: None) if keys is None else (lambda i: keys + i)
    delta_su = denoiser(model, h_s, tau_s, tau_u, more(1))
    y = clamp_given(flow_map(h_s, model.project(delta_su), s, u), given, clean)
    delta_ut = denoiser(model, y, tau_u, tau_t, more(2))
    g = semigroup_weight(s, u, t).view(-1, 1, 1)
    return g * delta_su + (1 - g) * delta_ut


def distill_times(n, generator, diag_frac=0.5, boundary_frac=1 / 32):
    """tau_s, tau_t (n,) and a diagonal mask for a global distillation batch (FLM.md 6), randomly permuted:
    round(diag_frac n) diagonal rows tau_s = tau_t; of the rest, a boundary_frac share with (tau_s, tau_t) = (0, 1)
    and the others off-diagonal with d ~ U(0, 1), tau_s = U' (1 - d), tau_t = tau_s + d."""
    n_diag = round(n * diag_frac)
    n_bnd = round((n - n_diag) * boundary_frac)
    n_off = n - n_diag - n_bnd
    tau_diag = torch.rand(n_diag, generator=generator)
    d = torch.rand(n_off, generator=generator)
    tau_off = torch.rand(n_off, generator=generator) * (1 - d)
    tau_s = torch.cat([tau_diag, torch.zeros(n_bnd), tau_off])
    tau_t = torch.cat([tau_diag, torch.ones(n_bnd), tau_off + d])
    diag = torch.arange(n) < n_diag
    perm = torch.randperm(n, generator=generator)
    return tau_s[perm], tau_t[perm], diag[perm]


# the Lagrangian and Eulerian characterizations of the flow map (FLM.md 6), as targets for delta_{s,t}; s < t are
# physical times, D the teacher's denoiser, x = I_s the state at s. They are written on given quantities so that
# the tests can check them on an exact flow map; *_target below builds them from a student and a teacher.


def lagrangian(D_t_of_X, ddelta_dt, s, t):
    """D_t(X_{s,t}(x)) - (1 - t)(t - s) / (1 - s) d/dt delta_{s,t}(x): d/dt X_{s,t} = b_t(X_{s,t}) solved for delta."""
    s, t = (z.view(-1, 1, 1) if torch.is_tensor(z) and z.dim() == 1 else z for z in (s, t))
    return D_t_of_X - (1 - t) * (t - s) / (1 - s) * ddelta_dt


def eulerian(D_s, directional, s, t):
    """D_s(x) + (t - s) / (1 - t) ((1 - s) d/ds delta_{s,t}(x) + (D_s(x) - x) . grad_x delta_{s,t}(x)), the second
    factor given as `directional`: d/ds X_{s,t} + b_s . grad X_{s,t} = 0 solved for delta."""
    s, t = (z.view(-1, 1, 1) if torch.is_tensor(z) and z.dim() == 1 else z for z in (s, t))
    return D_s + (t - s) / (1 - t) * directional


def jvp_denoiser(model, h, tau_s, tau_t, dh, dtau_s, dtau_t):
    """delta_{s,t}(h) (B, L, V) and its derivative along the tangent (dh, dtau_s, dtau_t), in forward mode. The
    explicit attention formula runs here: flash-attn and flex_attention have no forward-mode AD."""
    global ATTENTION
    net, saved, ATTENTION = unwrap(model), ATTENTION, "explicit"
    try:
        return torch.func.jvp(lambda h, a, b: net(h, a, b).float().softmax(dim=-1), (h, tau_s, tau_t),
                              (dh, dtau_s, dtau_t))
    finally:
        ATTENTION = saved


@torch.no_grad()
def lagrangian_target(student, teacher_denoiser, h_s, tau_s, tau_t, warp, given=None, clean=None):
    """The Lagrangian target from the student (stop-gradient) and D = teacher_denoiser(h, tau); (B, L, V)."""
    s, t = warp.t(tau_s), warp.t(tau_t)
    zero = torch.zeros_like(tau_s)
    delta, ddelta_dtau_t = jvp_denoiser(student, h_s, tau_s, tau_t, torch.zeros_like(h_s), zero, torch.ones_like(tau_s))
    X = clamp_given(flow_map(h_s, unwrap(student).project(delta), s, t), given, clean)  # X_{s,t}(x_s), student's delta
    return lagrangian(teacher_denoiser(X, tau_t), ddelta_dtau_t * warp.dtau_dt(t).view(-1, 1, 1), s, t)


@torch.no_grad()
def eulerian_target(student, teacher_denoiser, h_s, tau_s, tau_t, warp, given=None, clean=None):
    """The Eulerian target; in the projected state the x-tangent D_s - x_s is D_s @ E - h_s, and 0 at given
    positions, which do not move; (B, L, V)."""
    s, t = warp.t(tau_s), warp.t(tau_t)
    D_s = teacher_denoiser(h_s, tau_s)
    dh = unwrap(student).project(D_s) - h_s
    dh = clamp_given(dh, given, torch.zeros_like(dh))
    _, directional = jvp_denoiser(student, h_s, tau_s, tau_t, dh, (1 - s) * warp.dtau_dt(s), torch.zeros_like(tau_t))
    return eulerian(D_s, directional, s, t.clamp(max=1 - 1e-3))  # (1 - t) -> 0 at the one-step jump t = 1


def onto_simplex(target):
    """The Lagrangian and Eulerian targets are not convex combinations and can leave the simplex, and the soft
    cross-entropy is unbounded below for a negative target: clip at 0 and renormalize (FLM.md 6)."""
    target = target.clamp_min(0)
    return target / target.sum(-1, keepdim=True).clamp_min(1e-12)


OBJECTIVES = ("semigroup", "lagrangian", "eulerian")


def distill_loss(student, teacher, tokens, tau_s, tau_t, diag, warp, keys, objective="semigroup", given=None):
    """Flow-map distillation loss (FLM.md 6): soft cross-entropy of the student's delta_{s,t}(x_s) against the
    frozen teacher's D_s(x_s) on diagonal rows and against the objective's target on the others (semigroup:
    the student's own two-step composition; lagrangian, eulerian: from the student's JVP and the teacher).
    teacher None: self-distillation, with the one-hot data as the diagonal target and the student's own diagonal
    delta_{s,s} as D. A student with a frozen E (the teacher's) reads the teacher's h = x_s @ E; one that trains
    its E reads its own columns of the joint state x_s @ [E_teacher, E_student] (JointView). keys (B,) give each
    row its noise and dropout; given (B, L): positions kept clean and left out of the loss (conditioning)."""
    keys = keys.to(tokens.device)
    net, cols = unwrap(student), slice(None)
    if teacher is not None and net.embed.requires_grad:
        teacher, net = joint_views(teacher, net)
        cols = net.cols
    h = noisy_input(net, tokens, warp.t(tau_s), keys, given=given)
    if teacher is None:
        D = lambda h, tau: denoiser(net, h, tau, tau)  # noqa: E731 (the student's own denoiser, no gradient)
    else:
        D = lambda h, tau: denoiser(teacher, h, tau)  # noqa: E731
    with torch.no_grad():
        target = torch.empty(*tokens.shape, net.config.vocab_size, device=h.device)
        if diag.any():
            target[diag] = (F.one_hot(tokens[diag], net.config.vocab_size).float() if teacher is None
                            else D(h[diag], tau_s[diag]))
        off = ~diag
        if off.any():
            args = (h[off], tau_s[off], tau_t[off])
            fix = {} if given is None else dict(given=given[off], clean=net.embed[tokens[off]])
            if objective == "semigroup":
                mid = (tau_s[off] + tau_t[off]) / 2
                target[off] = semigroup_target(net, args[0], args[1], mid, args[2], warp, keys[off], **fix)
            elif objective == "lagrangian":
                target[off] = onto_simplex(lagrangian_target(net, D, *args, warp, **fix))
            else:
                target[off] = onto_simplex(eulerian_target(net, D, *args, warp, **fix))
    return soft_cross_entropy(student(h[..., cols], tau_s, tau_t, keys=keys), target, given)

# -----------------------------------------------------------------------------
# the samplers (FLM.md 4, 7, 8)


@torch.no_grad()
def sample(model, warp, x, steps, gamma=0.0, weak_model=None, eta=1.0, keys=None, dense=False, progress=None,
           given=None, tokens=None):
    """Generate tokens (B, L) from noise x: the Euler ODE for a denoiser, the flow map for a two-time model.

    x is the dense state x_0 (B, L, V) if dense, else the projected x_0 @ E (B, L, D) from draw_noise.
    gamma > 0: the stochastic flow-map sampler (FLM.md 7), its noise from the rows' keys (B,).
    weak_model, eta: autoguidance (FLM.md 8); in the projected state both must read x (JointView, as generate does).
    given (B, L) bool and tokens (B, L): conditioning, given positions clamped to their tokens at every step.
    """
    net = unwrap(model)
    two_time = net.config.two_time
    if gamma > 0 and (not two_time or keys is None):
        raise ValueError("gamma > 0 needs a flow-map (two-time) model and the rows' keys")
    B = x.size(0)
    lift = (lambda p: p) if dense else net.project  # denoiser (B, L, V) -> the state space
    read = (lambda m, z: unwrap(m).project(z)) if dense else (lambda m, z: z)  # state -> each network's input
    clean = None if given is None else F.one_hot(tokens, net.config.vocab_size).float() if dense else net.embed[tokens]
    x = clamp_given(x, given, clean)
    taus = torch.linspace(0, 1, steps + 1, device=x.device)
    ts = warp.t(taus)
    for i in (progress or (lambda r: r))(range(steps)):
        s, t = ts[i], ts[i + 1]
        t_jump = 1 - (1 - t) * math.sqrt(1 - gamma ** 2) if gamma > 0 else t
        tau_s = taus[i].expand(B)
        tau_t = (warp.tau(t_jump) if gamma > 0 else taus[i + 1]).expand(B) if two_time else None
        d = denoiser(model, read(model, x), tau_s, tau_t)
        if weak_model is not None:  # affine in D, so the step stays exact (FLM.md 8); eta = 1 and 0 are exact
            d = eta * d + (1 - eta) * denoiser(weak_model, read(weak_model, x), tau_s, tau_t)
        x = flow_map(x, lift(d), s, t_jump)
        if gamma > 0:
            noise = draw_noise(net, keys, x.size(1), NOISE + 1 + i, dense)
            x = x + (t - t_jump) * lift(d) + gamma * (1 - t) * noise
        x = clamp_given(x, given, clean)
    out = d.argmax(dim=-1)  # the last step lands on t = 1, where x = d
    return out if given is None else torch.where(given, tokens, out)


def generate(model, warp, num_samples, L, steps, batch_size=64, seed=0, progress=None, weak_model=None,
             given=None, tokens=None, **kwargs):
    """num_samples sequences (num_samples, L) in batches; sample i comes from the key (seed, 0, i), so it is the
    same whatever the batch size. given, tokens (num_samples, L) or (L,): conditioning. A weak model with
    another E than the model's reads the same x through the joint state (JointView)."""
    if weak_model is not None and not torch.equal(unwrap(model).embed, unwrap(weak_model).embed):
        model, weak_model = joint_views(model, weak_model)
    if given is not None:
        given, tokens = given.expand(num_samples, L), tokens.expand(num_samples, L)
    out = []
    for start in range(0, num_samples, batch_size):
        rows = slice(start, min(start + batch_size, num_samples))
        keys = slot_keys(seed, 0, range(rows.start, rows.stop))
        x = draw_noise(model, keys, L)
        cond = {} if given is None else dict(given=given[rows], tokens=tokens[rows])
        out.append(sample(model, warp, x, steps, keys=keys, progress=progress, weak_model=weak_model, **cond,
                          **kwargs))
    return torch.cat(out)


def factorized_sample(model, warp, num_samples, L, batch_size=64, seed=0):
    """The one-step control (FLM.md 11): each position drawn independently from the model's own per-position
    marginal D(x_0, tau = 0), which is what a discrete diffusion sampler does in one step. Tokens (num_samples, L)."""
    net, out = unwrap(model), []
    for start in range(0, num_samples, batch_size):
        keys = slot_keys(seed, 0, range(start, min(start + batch_size, num_samples)))
        tau = torch.zeros(len(keys), device=net.embed.device)
        p = denoiser(net, draw_noise(net, keys, L), tau, tau if net.config.two_time else None)  # (B, L, V)
        u = row_uniform(keys.to(p.device), L, NOISE + 1)[..., None]  # inverse CDF, one uniform per position
        idx = (p.cumsum(-1) < u * p.sum(-1, keepdim=True)).sum(-1)
        out.append(idx.clamp_max(p.size(-1) - 1))
    return torch.cat(out)


# -----------------------------------------------------------------------------
# evaluation metrics (FLM.md 11)


def unigram_entropy(tokens):
    """Unigram entropy in nats of each row's own token ids (B, L), averaged over rows."""
    entropies = []
    for row in tokens:
        p = torch.unique(row, return_counts=True)[1].double() / len(row)
        entropies.append(-(p * p.log()).sum())
    return torch.stack(entropies).mean().item()


def causal_nll(logits, ids, mask):
    """Summed NLL and token count of ids (B, T) under causal-LM logits (B, T, V'); the first token is unscored."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T - 1)
    m = mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum().item(), int(m.sum().item())

# -----------------------------------------------------------------------------
# precision


def autocast_for(device, dtype):
    """One autocast context for the transformer: bf16 (CPU or CUDA) or none; dtype None picks by device."""
    device_type = torch.device(device).type
    dtype = dtype or ("bf16" if device_type == "cuda" else "fp32")
    return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext(), dtype


# -----------------------------------------------------------------------------
# EMA and checkpoints (one flat dict of plain types, DESIGN.md)

CKPT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, of another format version, or of the wrong kind."""


@torch.no_grad()
def ema_update(ema_model, model, decay):
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - decay)


def all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(path, ckpt):
    """torch.save under a temporary name, then rename: a crash never leaves a half-written file at path."""
    tmp = path + ".tmp"
    torch.save(dict(ckpt, format_version=CKPT_VERSION), tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind=None, logit_cap=None):
    """Load and validate a checkpoint: ours (train_flm.py, distill.py), or the authors' released models (a Hugging
    Face repo id, a folder with config.json + model.safetensors, or a Lightning .ckpt), converted to ours.
    kind ('flm' or 'fmlm') is checked if given; logit_cap, if given, overrides the model's output logit cap."""
    if os.path.isdir(path) or path.endswith(".ckpt") or (not os.path.exists(path) and _is_hub_id(path)):
        ckpt = load_authors_checkpoint(path)
    elif not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    else:
        ckpt = _torch_load(path, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CKPT_VERSION:
        version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
        raise CheckpointError(f"{path} has checkpoint format version {version}; this code reads version "
                              f"{CKPT_VERSION}")
    if kind is not None and ckpt["kind"] != kind:
        what = {"flm": "an FLM denoiser (train_flm.py)", "fmlm": "a flow-map model (distill.py)"}
        raise CheckpointError(f"{path} holds {what[ckpt['kind']]}, but {what[kind]} is needed here")
    if logit_cap is not None:
        ckpt["model_config"]["logit_cap"] = logit_cap
    return ckpt


def _torch_load(path, **kwargs):
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or not a torch file): "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


# -----------------------------------------------------------------------------
# the authors' released checkpoints (FLM.md 9): one key map, like nanoGPT's from_pretrained
#
# Hugging Face david3684/{FLM,FMLM}-B-{OWT,LM1B} (config.json + model.safetensors, EMA weights) and the same
# models as Lightning .ckpt files (raw weights in state_dict, EMA weights in ema["shadow_params"]).

AUTHORS_LOGIT_CAP = 30.0  # the authors' original and later code cap output logits at 30 (FLM.md 9)
AUTHORS_KEYS = [("vocab_embed.embedding", "embed"), ("sigma_map_prime.", "t2_embedder."),
                ("sigma_map.", "t_embedder."), ("output_layer.", "final_layer.")]
AUTHORS_DROPPED = ("rotary_emb.inv_freq", "learnable_loss_weighting.", "teacher")


def _is_hub_id(path):
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.endswith((".pt", ".ckpt", ".json"))


def authors_key(name):
    """Our parameter name for one of the authors', or None for what we drop."""
    name = name.replace("._orig_mod.", ".").removeprefix("_orig_mod.").removeprefix("backbone.")
    if name.startswith(AUTHORS_DROPPED):
        return None
    for theirs, ours in AUTHORS_KEYS:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


class _Inert:
    """Stands in for any class a pickle names that is not a tensor or a plain container: it keeps the call's
    arguments and state as data and runs nothing (an OmegaConf config, a tokenizer, os.system alike)."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)


class _SafeUnpickler(pickle.Unpickler):
    """Admits tensors, storages, dtypes and plain containers; every other class becomes an inert _Inert."""
    SAFE = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter}

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return self.SAFE[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Inert,), {"source": f"{module}.{name}"})


def _plain(obj):
    """Plain Python data from an inert OmegaConf config (its _content, its nodes' _val)."""
    if isinstance(obj, _Inert):
        state = getattr(obj, "state", None)
        if isinstance(state, dict) and ("_content" in state or "_val" in state):
            return _plain(state.get("_content", state.get("_val")))
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _read_lightning(path):
    """(raw, ema, hydra config, step) of a Lightning .ckpt, read with the restricted unpickler (never runs code)."""
    restricted = types.SimpleNamespace(Unpickler=_SafeUnpickler, __name__="flm_safe_pickle")
    # torch.load hands storages to its own loader and every class lookup to _SafeUnpickler.find_class
    ckpt = _torch_load(path, pickle_module=restricted, weights_only=False)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint of the authors' code (no state_dict)")
    raw = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    names = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]  # the backbone's parameters, in order
    shadow = (ckpt.get("ema") or {}).get("shadow_params")
    if not isinstance(shadow, list) or len(shadow) != len(names):
        raise CheckpointError(f"{path}: ema['shadow_params'] should list the {len(names)} backbone parameters, "
                              f"found {len(shadow) if isinstance(shadow, list) else 'none'}")
    config = _plain((ckpt.get("hyper_parameters") or {}).get("config")) or {}
    return raw, dict(zip(names, shadow)), config, int(ckpt.get("global_step", 0))


def _read_hub_folder(path):
    """(weights, hydra config) of a folder in the layout of the authors' Hugging Face repos; a repo id is
    downloaded first (huggingface_hub, optional)."""
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{path} is neither a file nor a folder; to download it from the Hugging Face "
                                  "hub: pip install huggingface_hub") from None
        try:
            path = snapshot_download(path, allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:
            raise CheckpointError(f"{path}: not found locally and not downloadable from the Hugging Face hub "
                                  f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    files = [os.path.join(path, f) for f in ("config.json", "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{path} has no {os.path.basename(f)}: expected config.json + model.safetensors "
                                  "(an authors' Hugging Face repo) or a checkpoint file")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{files[1]} needs safetensors: pip install safetensors") from None
    try:
        with open(files[0]) as f:
            config = json.load(f)
        weights = load_file(files[1])
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable config.json or model.safetensors "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    return weights, dict(config.get("config") or {}, vocab_size=config.get("vocab_size"))


def load_authors_checkpoint(path):
    """One of the authors' models as a checkpoint dict of ours (kind, model_config, model, ema, tokenizer)."""
    if path.endswith(".ckpt"):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        raw, ema, config, step = _read_lightning(path)
    else:
        ema, config = _read_hub_folder(path)
        raw, step = ema, 0
    raw, ema = ({authors_key(k): v for k, v in d.items() if authors_key(k)} for d in (raw, ema))
    model_cfg = config.get("model") or {}
    two_time = "t2_embedder.mlp.0.weight" in ema
    try:
        V, D = ema["embed"].shape
        cfg = DiTConfig(vocab_size=V, n_layer=int(model_cfg["n_blocks"]), n_head=int(model_cfg["n_heads"]),
                        n_embd=D, cond_dim=int(model_cfg["cond_dim"]), dropout=float(model_cfg.get("dropout", 0.1)),
                        logit_cap=AUTHORS_LOGIT_CAP, two_time=two_time)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config lacks the model size {e} (config.model: n_blocks, n_heads, "
                              "cond_dim) or its weights lack vocab_embed.embedding") from None
    expected = DiT(cfg).state_dict()
    for weights in (raw, ema):
        for key in sorted(set(expected) | set(weights)):
            if key not in weights or key not in expected or weights[key].shape != expected[key].shape:
                got = tuple(weights[key].shape) if key in weights else "missing"
                want = tuple(expected[key].shape) if key in expected else "no such parameter"
                raise CheckpointError(f"{path}: weight {key} is {got}, the config {model_cfg} needs {want}")
    tokenizer = (config.get("data") or {}).get("tokenizer_name_or_path") or "gpt2"
    seq_len = int(model_cfg.get("length") or (128 if "bert" in tokenizer else 1024))
    return dict(kind="fmlm" if two_time else "flm", model=raw, ema=ema, model_config=asdict(cfg), step=step,
                args=dict(seq_len=seq_len), format_version=CKPT_VERSION, source=path,
                data=dict(dir=None, vocab_size=V, vocab=None, tokenizer=tokenizer))


def model_from_checkpoint(ckpt, ema=True):
    """The DiT of a checkpoint, with its EMA weights unless ema=False."""
    model = DiT(DiTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"] if ema else ckpt["model"])
    return model
