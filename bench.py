"""
Speed and memory, measured side by side on this machine, printed as a table with the command and the device:
- training step: the projected state (h = x @ E, noise from N(0, E^T E)) against the dense V-space input of the
  authors' formulation (x_t of shape (B, L, V)), same model, same batch; tokens/s, peak memory, MFU on CUDA;
- sampling: FMLM one step, FLM N Euler steps, and an autoregressive transformer of the same width and depth
  decoding L tokens with a KV cache.

    python bench.py                                            # CPU: the ptb model shape at V = 50,257
    python bench.py --model small --seq-len 1024 --batch-size 8 --sample-len 1024 --sample-batch 32 --compile
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as flm_model
from flow import draw_noise, flm_loss, sample, stratified_tau
from model import MODEL_PRESETS, DiT, DiTConfig, autocast_for, slot_keys
from trainer import COUNT, checked, device_flag, parser_for

parser = parser_for("Training and sampling speed and memory of FLM / FMLM.", "bench.py")
parser.add_argument("--model", default="ptb", choices=list(MODEL_PRESETS), help="model shape preset")
parser.add_argument("--vocab", type=checked(int, lambda v: v >= 2, "an integer >= 2"), default=50257,
                    help="one-hot size V")
parser.add_argument("--batch-size", type=COUNT, default=8, help="training batch (sequences)")
parser.add_argument("--seq-len", type=COUNT, default=128, help="training sequence length")
parser.add_argument("--iters", type=COUNT, default=5, help="timed training steps (after 2 warmup steps)")
parser.add_argument("--sample-batch", type=COUNT, default=8, help="sampling batch B")
parser.add_argument("--sample-len", type=COUNT, default=128, help="sampling length L")
parser.add_argument("--flm-steps", type=COUNT, default=64, help="Euler steps of the FLM sampler")
parser.add_argument("--device", type=device_flag, help="cpu, cuda (None: cuda if available)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")
parser.add_argument("--dtype", choices=["fp32", "bf16"],
                    help="autocast precision (None: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--attention", nargs="+", default=None, choices=["explicit", "flex", "flash"],
                    help="attention paths to compare in training (default: explicit, and flex on CUDA)")
parser.add_argument("--only", nargs=2, help=argparse.SUPPRESS)  # one training variant: input, attention
args = parser.parse_args()
device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
cuda = device.startswith("cuda")
autocast, args.dtype = autocast_for(device, args.dtype)
PEAK = {"bf16": 989e12, "fp32": 67e12}[args.dtype]  # H100 SXM dense peak
cfg = DiTConfig(vocab_size=args.vocab, **MODEL_PRESETS[args.model])


def sync():
    if cuda:
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# training step, one variant per process so that peak memory is its own


def train_variant(dense, attention):
    flm_model.ATTENTION = attention
    torch.manual_seed(0)
    raw = DiT(cfg).to(device)
    model = torch.compile(raw) if args.compile else raw
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4)
    tokens = torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len), device=device)
    tau = stratified_tau(args.batch_size, torch.Generator().manual_seed(0)).to(device)
    for i in range(args.iters + 2):
        if i == 2:
            sync()
            t0 = time.time()
        with autocast:
            loss = flm_loss(model, tokens, tau, slot_keys(0, i, range(args.batch_size)), dense=dense)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    dt = (time.time() - t0) / args.iters
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tok_s = args.batch_size * args.seq_len / dt
    mfu = raw.flops_per_token(args.seq_len) * tok_s / PEAK if cuda else None
    return dict(ms=dt * 1000, tok_s=tok_s, peak_gib=peak / 2 ** 30, mfu=mfu)


if args.only:
    print(json.dumps(train_variant(args.only[0] == "dense", args.only[1])))
    raise SystemExit

train = {}
for attention in args.attention or (["explicit", "flex"] if cuda else ["explicit"]):
    for variant in ("projected", "dense"):
        cmd = [sys.executable, *sys.argv, "--only", variant, attention, "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            train[variant, attention] = dict(error=proc.stderr.strip().splitlines()[-1])
        else:
            train[variant, attention] = json.loads(proc.stdout.strip().splitlines()[-1])

# -----------------------------------------------------------------------------
# sampling: FMLM 1 step, FLM N steps, autoregressive with a KV cache


class CausalBlock(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.H, self.ln1, self.ln2 = H, nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(approximate="tanh"), nn.Linear(4 * D, D))

    def forward(self, x, cache):  # x (B, 1, D); cache: list [k, v] of (B, H, T, d), grown in place
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
        cache[0] = k if cache[0] is None else torch.cat([cache[0], k], dim=2)
        cache[1] = v if cache[1] is None else torch.cat([cache[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, cache[0], cache[1])  # one query attends to all cached keys
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """A GPT of the DiT's width and depth, for the autoregressive baseline."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([CausalBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f, self.head = nn.LayerNorm(cfg.n_embd), nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def generate(self, B, L):
        tok, caches = torch.zeros(B, 1, dtype=torch.long, device=self.head.weight.device), [[None, None]
                                                                                            for _ in self.blocks]
        for _ in range(L):
            x = self.wte(tok)
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache)
            tok = self.head(self.ln_f(x)).argmax(-1)  # (B, 1)
        return tok


def timed(fn, repeats=2):
    fn()  # warmup
    sync()
    t0 = time.time()
    for _ in range(repeats):
        fn()
    sync()
    return (time.time() - t0) / repeats


torch.manual_seed(0)
B, L = args.sample_batch, args.sample_len
flm = DiT(cfg).to(device).eval()
fmlm = DiT(DiTConfig(**{**cfg.__dict__, "two_time": True})).to(device).eval()
ar = CausalLM(cfg).to(device).eval()
with autocast:
    keys = slot_keys(0, 0, range(B))
    t_fmlm = timed(lambda: sample(fmlm, draw_noise(fmlm, keys, L), 1))
    t_flm = timed(lambda: sample(flm, draw_noise(flm, keys, L), args.flm_steps), repeats=1)
    t_ar = timed(lambda: ar.generate(B, L), repeats=1)

# -----------------------------------------------------------------------------
# report

name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
print(f"command: python {' '.join(sys.argv)}")
print(f"device: {name}; torch {torch.__version__}; model {args.model} ({flm.num_params():,} parameters), "
      f"V = {args.vocab:,}\n")
print(f"training step, B = {args.batch_size}, L = {args.seq_len}, {args.dtype}{', compiled' if args.compile else ''}:")
print("| input | attention | ms / step | tokens/s | peak memory (GiB) | MFU |\n|---|---|---|---|---|---|")
for (variant, attention), r in train.items():
    if "error" in r:
        print(f"| {variant} | {attention} | failed: {r['error']} | | | |")
    else:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {variant} | {attention} | {r['ms']:.0f} | {r['tok_s']:,.0f} | {r['peak_gib']:.2f} | {mfu} |")
for attention in dict.fromkeys(a for _, a in train):
    p, d = train["projected", attention], train["dense", attention]
    if "error" not in p and "error" not in d:
        print(f"projected / dense ({attention}): {p['tok_s'] / d['tok_s']:.2f}x tokens/s, "
              f"{d['peak_gib'] / p['peak_gib']:.2f}x less peak memory "
              f"({'max allocated' if cuda else 'max RSS of the process, weights and runtime included'})")
print(f"\nsampling B = {B}, L = {L}:")
print("| sampler | forward passes | seconds | vs autoregressive |\n|---|---|---|---|")
for label, passes, t in (("FMLM, 1 step", 1, t_fmlm), (f"FLM, {args.flm_steps} Euler steps", args.flm_steps, t_flm),
                         ("autoregressive, KV cache", L, t_ar)):
    print(f"| {label} | {passes} | {t:.3f} | {t / t_ar:.4f} |")
