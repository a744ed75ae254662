"""
The DiT of a flow language model: f(h, tau_s[, tau_t]) -> logits over the vocabulary, for every position.

The paper: "Flow Map Language Models: One-step Language Modeling via Continuous Denoising" (arXiv 2602.16813);
METHOD.md states every formula. The network is its section 9, the authors' DiT "small", written after
facebookresearch/DiT (adaLN-Zero) and karpathy/nanoGPT; the flow mathematics around it is flow.py.

Conventions (METHOD.md 0): x_0 ~ N(0, I) is noise, x_1 = one_hot(tokens) data, x_t = (1 - t) x_0 + t x_1; the
network sees only the reparameterized time tau (METHOD.md 3), and reads x only through h = x @ E (E = `DiT.embed`,
V x D), the projected state of METHOD.md 14. Shapes: B batch, L length, V vocabulary, D hidden, H heads.
"""

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from rng import dropout, stream

# flash-attn is optional and GPU-only; 2.6 and newer, whose softcap argument keeps the attention exact.
# flex_attention applies the soft-cap as a score_mod, without (B, H, L, L) scores.
try:
    import flash_attn
    from flash_attn import flash_attn_func

    if tuple(int(v) for v in flash_attn.__version__.split(".")[:2]) < (2, 6):
        flash_attn_func = None
except ImportError:
    flash_attn_func = None

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
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device) / head_dim)
    freqs = torch.outer(torch.arange(L, device=device, dtype=torch.float32), inv_freq)  # (L, d / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (L, 1, head_dim)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """x (B, L, H, head_dim) -> same, rotated in fp32."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def attention_backend(device_type, dtype):
    """The path "auto" takes: on CUDA flash-attn for bf16 and fp16 inputs (it computes in 16 bits), else
    flex_attention, which keeps fp32 in fp32; the explicit formula on the CPU, where flex has no backward."""
    if device_type != "cuda":
        return "explicit"
    if flash_attn_func is not None and dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "flex"


def attention(q, k, v, softcap, backend="auto"):
    """Non-causal attention, logits soft-capped as softcap * tanh(logits / softcap); (B, L, H, d) each. backend:
    "flash" (flash-attn, in bf16), "flex" (flex_attention), "explicit" (the formula, which forward-mode AD
    needs) or "auto" (attention_backend)."""
    if backend == "auto":
        backend = attention_backend(q.device.type, q.dtype)
    if backend == "flash":
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), causal=False, softcap=softcap)
        return out.to(q.dtype)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, L, d)
    if backend == "flex":

        def softcap_mod(score, b, h, q_idx, kv_idx):  # score is already scaled by 1 / sqrt(d)
            return softcap * torch.tanh(score / softcap)

        run = _compiled_flex() if q.is_cuda else flex_attention  # eager on the CPU: the tests'
        return run(q, k, v, score_mod=softcap_mod).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))  # (B, H, L, L)
    out = (softcap * torch.tanh(scores / softcap)).softmax(dim=-1).to(v.dtype) @ v  # (B, H, L, d)
    return out.transpose(1, 2)  # (B, L, H, d)


@functools.cache
def _compiled_flex():
    # dynamic=None: compiled for the first shapes; a second batch size (validation, a short last batch) compiles
    # once more with the batch dynamic. Grad mode is guarded, so training and evaluation keep a graph each: a
    # handful of graphs, under the recompile limit past which an eager flex would materialize the scores.
    return torch.compile(flex_attention, dynamic=None)


# -----------------------------------------------------------------------------
# embedders


class TimestepEmbedder(nn.Module):
    """Embeds tau in [0, 1] (unscaled) as sinusoidal features -> MLP (METHOD.md 9)."""

    def __init__(self, cond_dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        C = cond_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, C), nn.SiLU(), nn.Linear(C, C))

    def forward(self, tau):  # (B,) -> (B, cond_dim)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=tau.device) / half)
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
    """Pre-norm transformer block with adaLN-Zero conditioning (METHOD.md 9); block i draws the dropout masks of
    its attention and MLP branches from dropout streams 2i and 2i + 1 (rng.STREAMS)."""

    def __init__(self, cfg, i):
        super().__init__()
        self.streams = (stream("dropout", 2 * i), stream("dropout", 2 * i + 1))
        D = cfg.n_embd
        self.n_head, self.softcap = cfg.n_head, cfg.attn_softcap
        self.norm1, self.norm2 = LayerNorm(D), LayerNorm(D)
        self.attn_qkv = nn.Linear(D, 3 * D, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        H = cfg.mlp_ratio * D
        self.mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(approximate="tanh"), nn.Linear(H, D))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * D)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x, c, rope, p, keys, backend):  # x (B, L, D), c (B, cond_dim); p: dropout
        B, L, D = x.shape
        modulation = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # each (B, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k, v = qkv.view(B, L, 3, self.n_head, D // self.n_head).unbind(2)  # (B, L, H, d) each
        y = attention(apply_rotary(q, *rope), apply_rotary(k, *rope), v, self.softcap, backend)
        x = x + gate_msa * dropout(self.attn_out(y.reshape(B, L, D)), p, keys, self.streams[0])
        y = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * dropout(y, p, keys, self.streams[1])


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
    vocab_size: int = 50257  # V, the one-hot size (a compact vocabulary is smaller, data.py)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # D, hidden size
    cond_dim: int = 128  # time conditioning size
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * D
    dropout: float = 0.1  # dropout on the attention and MLP residual branches
    attn_softcap: float = 50.0  # attention logits -> softcap * tanh(logits / softcap)
    logit_cap: float = 0.0  # if > 0, logits -> cap * tanh(logits / cap) (the authors': 30)
    two_time: bool = False  # flow-map model: a second time embedder for tau_t (METHOD.md 5)
    time_warp: str = "exact"  # the tau(t) it is trained under: "exact" or "authors" (flow.py)


# Presets of model shape; vocab_size is always set from the data.
MODEL_PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, cond_dim=32, dropout=0.0),  # tests
    "ptb": dict(n_layer=4, n_head=4, n_embd=128, cond_dim=64, dropout=0.0),  # CPU quick start
    # the paper's, ~170M at V=50257, with the output logit cap of the authors' current code and released models
    "small": dict(n_layer=12, n_head=12, n_embd=768, cond_dim=128, dropout=0.1, logit_cap=30.0),
}

# -----------------------------------------------------------------------------
# the DiT


class DiT(nn.Module):
    """f(h, tau_s[, tau_t]) -> logits (B, L, V), with h = x @ E the projected one-hot state. keys (B,): the rows'
    keys, which make the dropout masks of a row independent of the batch it is in (training only)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.n_embd))  # E, V x D (METHOD.md 9)
        nn.init.kaiming_uniform_(self.embed, a=math.sqrt(5))
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        self.t2_embedder = TimestepEmbedder(cfg.cond_dim) if cfg.two_time else None
        self.blocks = nn.ModuleList([DiTBlock(cfg, i) for i in range(cfg.n_layer)])
        self.final_layer = FinalLayer(cfg)

    def add_second_time(self):
        """Turn a one-time denoiser into a two-time flow-map model that starts equal to it (METHOD.md 6)."""
        self.config.two_time = True
        self.t2_embedder = TimestepEmbedder(self.config.cond_dim).to(self.embed.device)
        nn.init.zeros_(self.t2_embedder.mlp[2].weight)
        nn.init.zeros_(self.t2_embedder.mlp[2].bias)

    def project(self, x):
        """x (B, L, V) -> x @ E (B, L, D), in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.embed

    def forward(self, h, tau_s, tau_t=None, keys=None, backend="auto"):
        """backend: the attention path of every block (see attention); keys: see the class docstring."""
        c = self.t_embedder(tau_s)
        if self.t2_embedder is not None:
            c = c + self.t2_embedder(tau_t)
        c = F.silu(c)  # (B, cond_dim)
        rope = rotary_cos_sin(h.size(1), self.config.n_embd // self.config.n_head, h.device)
        p = self.config.dropout if self.training else 0.0
        x = h
        for block in self.blocks:
            x = block(x, c, rope, p, keys, backend)
        logits = self.final_layer(x, c).float()
        cap = self.config.logit_cap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def num_params(self, exclude_embed=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.numel() if exclude_embed else n

    def flops_per_token(self, L):
        """Training FLOPs per token (forward + backward); the projected input layer costs O(V D^2 / (B L))."""
        cfg = self.config
        return 6 * self.num_params(exclude_embed=True) + 12 * cfg.n_layer * cfg.n_embd * L


# -----------------------------------------------------------------------------
# wrappers and precision


def unwrap(model):
    """The DiT inside DDP and torch.compile wrappers (flow.py takes all three alike)."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def autocast_for(device, dtype):
    """One autocast context for the transformer: bf16 (CPU or CUDA) or none; dtype None picks by device."""
    device_type = torch.device(device).type
    dtype = dtype or ("bf16" if device_type == "cuda" else "fp32")
    if dtype == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16), dtype
    return nullcontext(), dtype
