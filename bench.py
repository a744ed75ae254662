"""
Speed and memory, measured side by side on this machine, printed as tables with the command and the device:
- a training step: the projected state (h = x @ E, its noise factor once per step, METHOD.md 14) against the
  authors' dense input x_t (B, L, V), same model and batch; tokens/s, peak memory, MFU on CUDA;
- sampling: FMLM one step, FLM N Euler steps, and an autoregressive transformer of the same width and depth
  decoding L tokens with a static KV cache;
- keyed dropout (rng.dropout) against F.dropout on one activation (B, L, D): time, tensor operations and bytes
  written per element, beside 2183f63's int64 form.

    python bench.py  # D = 128 and the paper's D = 768
    python bench.py --model small --shapes 16x1024 --sample-len 1024 --sample-batch 32 --compile  # a GPU
"""

import gc
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flow import carry_factor_grad, cross_entropy, draw_noise, flm_loss, interpolate, sample
from flow import state_factor, stratified_tau, time_warp
from model import MODEL_PRESETS, DiT, DiTConfig, autocast_for, unwrap
import rng
from rng import slot_keys
from common import COUNT, checked, default_device, device_flag, parser_for, peak_flops


def shape(text):
    """B x L, written BxL."""
    try:
        B, L = (int(v) for v in text.lower().split("x"))
        assert B >= 1 and L >= 1
    except (ValueError, AssertionError):
        raise ValueError(text) from None
    return B, L


parser = parser_for("Training and sampling speed and memory of FLM / FMLM.", "bench.py")
a = parser.add_argument
a("--model", nargs="+", default=["ptb", "small"], choices=list(MODEL_PRESETS), help="model shapes")
V_OK = checked(int, lambda v: v >= 2, "an integer >= 2")
a("--vocab", type=V_OK, default=50258, help="V (50,258: the authors' GPT-2 with a pad token)")
SHAPE = checked(shape, lambda v: True, "BxL, e.g. 8x256")
DIMS = checked(
    lambda t: tuple(int(v) for v in t.lower().split("x")),
    lambda v: len(v) == 3 and min(v) >= 1,
    "BxLxD",
)
a("--shapes", nargs="+", type=SHAPE, default=[(4, 128), (8, 256)], help="training batches B x L")
a("--iters", type=COUNT, default=2, help="timed training steps (after one warmup step)")
ACTS = [(16, 1024, 768), (32, 32, 128)]  # the paper's micro-batch (OWT), the quick start's
a(
    "--dropout-shapes",
    nargs="+",
    type=DIMS,
    default=ACTS,
    help="keyed dropout activations B x L x D",
)
a("--sample-batch", type=COUNT, default=8, help="sampling batch B")
a("--sample-len", type=COUNT, default=128, help="sampling length L")
a("--flm-steps", type=COUNT, default=64, help="Euler steps of the FLM sampler")
a("--device", type=device_flag, help="cpu, cuda (None: cuda if available)")
a("--compile", action="store_true", help="torch.compile the models (training and sampling)")
a("--dtype", choices=["fp32", "bf16"], help="autocast (None: bf16 on CUDA, fp32 on CPU)")
PATHS = ["explicit", "flex", "flash"]
a("--attention", nargs="+", choices=PATHS, help="attention paths (None: explicit, flex on CUDA)")
args = parser.parse_args()
device = default_device(args.device)
cuda = device.startswith("cuda")
autocast, args.dtype = autocast_for(device, args.dtype)
torch.backends.cuda.matmul.fp32_precision = "tf32"  # as trainer.Run sets it


def sync():
    if cuda:
        torch.cuda.synchronize()


def reset_peak():
    """Start a new peak: CUDA's allocator statistics, or the process's resident high-water mark (Linux)."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_gib():
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


# -----------------------------------------------------------------------------
# training step: the projected state against the dense input


class WithAttention(nn.Module):
    """The DiT with one attention path in every forward (model.attention); flow.py finds the DiT as .module."""

    def __init__(self, module, path):
        super().__init__()
        self.module, self.path = module, path

    def forward(self, *args, **kwargs):
        return self.module(*args, backend=self.path, **kwargs)


def dense_loss(model, tokens, tau, keys):
    """The authors' formulation of flm_loss: the dense (B, L, V) noise and state, x_t @ E inside the network."""
    V = unwrap(model).config.vocab_size
    gens = [torch.Generator(device).manual_seed(int(k)) for k in keys.tolist()]
    x0 = torch.stack([torch.randn(tokens.shape[1], V, device=device, generator=g) for g in gens])
    x_t = interpolate(x0, F.one_hot(tokens, V).float(), time_warp(model).t(tau))
    return cross_entropy(model(unwrap(model).project(x_t), tau), tokens)


def train_variant(cfg, B, L, dense, attention):
    """ms per step, tokens/s, peak memory and MFU of FLM training steps, the projected one as train_flm.py
    runs it."""
    torch.manual_seed(0)
    raw = DiT(cfg).to(device)
    model = WithAttention(torch.compile(raw) if args.compile else raw, attention)
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(cfg.vocab_size, (B, L), device=device)
    tau = stratified_tau(B, torch.Generator().manual_seed(0)).to(device)
    for i in range(args.iters + 1):
        if i == 1:  # after the warmup step and its one-time costs (compilation, the time warp)
            sync()
            reset_peak()
            t0 = time.time()
        factor = None if dense else state_factor(raw)
        factor_leaf = None if factor is None else factor.detach().requires_grad_()
        keys = slot_keys(0, i, range(B))
        with autocast:
            if dense:
                loss = dense_loss(model, tokens, tau, keys)
            else:
                loss = flm_loss(model, tokens, tau, keys, factor=factor_leaf)
        loss.backward()
        carry_factor_grad(factor, factor_leaf)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    dt = (time.time() - t0) / args.iters
    peak, tok_s = peak_gib(), B * L / dt
    flops = raw.flops_per_token(L) * tok_s
    mfu = flops / peak_flops(device, args.dtype) if peak_flops(device, args.dtype) else None
    del raw, model, opt
    return dict(ms=dt * 1000, tok_s=tok_s, peak_gib=peak, mfu=mfu)


train = {}
for name in args.model:
    cfg = DiTConfig(vocab_size=args.vocab, **MODEL_PRESETS[name])
    for B, L in args.shapes:
        for attention in args.attention or (["explicit", "flex"] if cuda else ["explicit"]):
            for variant in ("projected", "dense"):
                what = f"{name} B x L = {B} x {L}, {variant}, {attention}"
                print(f"training {what} ...", file=sys.stderr, flush=True)
                try:
                    r = train_variant(cfg, B, L, variant == "dense", attention)
                except torch.OutOfMemoryError:
                    r = dict(error="out of memory")
                train[name, B, L, attention, variant] = r

# -----------------------------------------------------------------------------
# sampling: FMLM 1 step, FLM N steps, autoregressive with a static KV cache


class CausalBlock(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H, self.ln1, self.ln2 = H, nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU("tanh"), nn.Linear(4 * D, D))

    def forward(self, x, cache, pos):  # x (B, 1, D); cache (2, B, H, L, d), written at pos
        B, T, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.H, D // self.H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, 1, d)
        cache[0].index_copy_(2, pos, k)
        cache[1].index_copy_(2, pos, v)
        mask = (torch.arange(cache.size(3), device=x.device) <= pos)[None]  # (1, L): written
        y = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """A GPT of the DiT's width and depth, for the autoregressive baseline."""

    def __init__(self, cfg):
        super().__init__()
        V, D, self.H = cfg.vocab_size, cfg.n_embd, cfg.n_head
        self.wte = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([CausalBlock(D, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, V, bias=False)

    def step(self, tok, caches, pos):  # tok (B, 1) -> next token (B, 1)
        x = self.wte(tok)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, pos)
        return self.head(self.ln_f(x)).argmax(-1)

    @torch.no_grad()
    def generate(self, B, L, step):
        D, dev = self.wte.embedding_dim, self.head.weight.device
        caches = [torch.zeros(2, B, self.H, L, D // self.H, device=dev) for _ in self.blocks]
        tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        for i in range(L):
            tok = step(tok, caches, torch.tensor([i], device=dev))
        return tok


def timed(fn, repeats=2):
    fn()  # warmup (and compilation)
    sync()
    t0 = time.time()
    for _ in range(repeats):
        fn()
    sync()
    return (time.time() - t0) / repeats


print("sampling ...", file=sys.stderr, flush=True)
torch.manual_seed(0)
B, L = args.sample_batch, args.sample_len
cfg = DiTConfig(vocab_size=args.vocab, **MODEL_PRESETS[args.model[-1]])
flm = DiT(cfg).to(device).eval()
fmlm = DiT(DiTConfig(**{**cfg.__dict__, "two_time": True})).to(device).eval()
ar = CausalLM(cfg).to(device).eval()
ar_step = torch.compile(ar.step) if args.compile else ar.step
with autocast:
    keys = slot_keys(0, 0, range(B))
    t_fmlm = timed(lambda: sample(fmlm, draw_noise(fmlm, keys, L), 1))
    t_flm = timed(lambda: sample(flm, draw_noise(flm, keys, L), args.flm_steps), repeats=1)
    t_ar = timed(lambda: ar.generate(B, L, ar_step), repeats=1)

# -----------------------------------------------------------------------------
# keyed dropout: the same masks as 2183f63's int64 row_uniform (test_simplex), in fewer and narrower passes


class Writes(TorchDispatchMode):
    """Counts the tensor operations run inside and the bytes their outputs take."""

    ops, bytes = 0, 0  # of this instance, once it counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops += 1
        self.bytes += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
        return out


def dropout_rows(B, L, D, p=0.1):
    """(variant, seconds, operations, bytes written per element) of each dropout on one (B, L, D) activation."""
    x = torch.randn(B, L, D, device=device)
    keys = rng.slot_keys(0, 0, range(B)).to(device)
    s = rng.stream("dropout", 0)
    old = lambda x: x.mul(rng.row_uniform(keys, L * D, s).view_as(x) >= p).div_(1 - p)
    variants = [("F.dropout", lambda x: F.dropout(x, p)), ("keyed, 2183f63 (int64)", old)]
    variants.append(("keyed (rng.dropout)", lambda x: rng.dropout(x, p, keys, s)))
    if args.compile:
        variants.append(("F.dropout, compiled", torch.compile(lambda x: F.dropout(x, p))))
        variants.append(("keyed, compiled", torch.compile(lambda x: rng.dropout(x, p, keys, s))))
    rows = []
    for label, fn in variants:
        fn(x)  # warmup, compilation
        counts = ("-", "-")  # a compiled kernel's work is not seen operation by operation
        if "compiled" not in label:
            with Writes() as w:
                fn(x)
            counts = (w.ops, f"{w.bytes / x.numel():.0f}")
        rows.append((label, timed(lambda: fn(x), repeats=3), *counts))
    return rows


print("keyed dropout ...", file=sys.stderr, flush=True)
dropouts = {dims: dropout_rows(*dims) for dims in args.dropout_shapes}

# -----------------------------------------------------------------------------
# report

name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
print(f"command: python {' '.join(sys.argv)}")
peak = "max allocated" if cuda else "max RSS of the process, weights and runtime included"
how = f"V = {args.vocab:,}, {args.dtype}{', compiled' if args.compile else ''}"
print(f"device: {name}; torch {torch.__version__}; {how}; peak memory: {peak}\n")
head = "| model | B x L | attention | input | ms / step | tokens/s | peak memory (GiB) | MFU |"
print(f"training step:\n{head}")
print("|---|---|---|---|---|---|---|---|")
for (model_name, B_, L_, attention, variant), r in train.items():
    row = f"| {model_name} | {B_} x {L_} | {attention} | {variant} |"
    if "error" in r:
        print(f"{row} failed: {r['error']} | | | |")
        continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    print(f"{row} {r['ms']:,.0f} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {mfu} |")


def flop_ratio(cfg, B, L):
    """The tokens/s ratio if a step's time were its multiply-adds: the shared network plus the dense input's
    x_t @ E and its gradient in E (4 B L V D FLOPs), or the projected state's E^T E (2 V D^2 forward, 4 V D^2
    backward) and its noise z @ F with F's gradient (4 B L D^2)."""
    V, D, N = cfg.vocab_size, cfg.n_embd, B * L
    shared = DiT(DiTConfig(**{**cfg.__dict__, "vocab_size": 2})).flops_per_token(L) * N
    shared += 6 * N * V * D
    return (shared + 4 * N * V * D) / (shared + 6 * V * D * D + 4 * N * D * D)


for (model_name, B_, L_, attention, variant), r in train.items():
    d = train[model_name, B_, L_, attention, "dense"]
    if variant == "projected" and "error" not in r and "error" not in d:
        bound = flop_ratio(DiTConfig(vocab_size=args.vocab, **MODEL_PRESETS[model_name]), B_, L_)
        what = f"{model_name}, {B_} x {L_} = {B_ * L_:,} tokens, {attention}"
        speed = f"{r['tok_s'] / d['tok_s']:.2f}x tokens/s ({bound:.2f}x if only multiply-adds took time)"
        memory = f"peak memory {r['peak_gib'] / d['peak_gib']:.2f}x"
        print(f"projected / dense, {what}: {speed}, {memory}")
print(f"\nsampling, model {args.model[-1]}, B = {B}, L = {L}:")
print("| sampler | forward passes | seconds | vs autoregressive |\n|---|---|---|---|")
n = args.flm_steps
samplers = [("FMLM, 1 step", 1, t_fmlm), (f"FLM, {n} Euler steps", n, t_flm)]
for label, passes, t in samplers + [("autoregressive, static KV cache", L, t_ar)]:
    print(f"| {label} | {passes} | {t:.3f} | {t / t_ar:.4f} |")
print("\nkeyed dropout, p = 0.1, one activation (the masks of 2183f63's int64 form, test_simplex):")
print("| B x L x D | dropout | ms | vs F.dropout | tensor operations | bytes written / element |")
print("|---|---|---|---|---|---|")
for (B_, L_, D_), rows in dropouts.items():
    for label, t, ops, per in rows:
        ms, ratio = f"{t * 1e3:.1f}", f"{t / rows[0][1]:.2f}x"
        print(f"| {B_} x {L_} x {D_} | {label} | {ms} | {ratio} | {ops} | {per} |")
