"""
Stage 1: train a flow language model (FLM), the denoiser D(x_t, tau) of FLM.md 2, with cross-entropy.

    python train_flm.py                                        # CPU quick start on the Penn Treebank
    torchrun --standalone --nproc_per_node=8 train_flm.py --preset owt --compile

Runs unchanged under plain python (CPU or one GPU) and under torchrun (DDP; NCCL on GPUs, gloo on CPUs).
"""

import argparse
import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import Data, DataError
from model import (MODEL_PRESETS, CheckpointError, DiT, DiTConfig, TimeWarp, all_finite, ema_update,
                   flm_loss, load_checkpoint, save_checkpoint, stratified_tau)

# -----------------------------------------------------------------------------
# settings: a preset fills every flag that the command line leaves unset

RUN_PRESETS = {
    # the embedded corpus on a laptop CPU: about 10 minutes on 2 cores
    "ptb": dict(data="data/ptb", model="ptb", batch_size=32, micro_batch=32, seq_len=64, lr=2e-3, warmup=100,
                max_steps=1000, ema=0.999, eval_every=100, eval_windows=128),
    # the paper's settings (FLM.md 10): AdamW 3e-4, warmup 2,500, batch 512, EMA 0.9999, 1M steps
    "lm1b": dict(data="data/lm1b", model="small", batch_size=512, micro_batch=64, seq_len=128, lr=3e-4,
                 warmup=2500, max_steps=1_000_000, ema=0.9999, eval_every=10_000, eval_windows=2048),
    "owt": dict(data="data/openwebtext", model="small", batch_size=512, micro_batch=16, seq_len=1024, lr=3e-4,
                warmup=2500, max_steps=1_000_000, ema=0.9999, eval_every=10_000, eval_windows=512),
}

parser = argparse.ArgumentParser(description="Train an FLM denoiser (stage 1).")
parser.add_argument("--preset", default="ptb", choices=list(RUN_PRESETS), help="run settings to start from")
parser.add_argument("--data", help="prepared data folder (python data.py)")
parser.add_argument("--out-dir", default=None, help="checkpoint and log folder (default out/flm-<preset>)")
parser.add_argument("--model", choices=list(MODEL_PRESETS), help="model shape preset (model.py)")
parser.add_argument("--dropout", type=float, default=None, help="override the model preset's dropout")
parser.add_argument("--batch-size", type=int, help="global batch in sequences, over all ranks and micro-steps")
parser.add_argument("--micro-batch", type=int, help="sequences per rank per forward; accumulation is derived")
parser.add_argument("--seq-len", type=int, help="tokens per sequence (windows of the token stream)")
parser.add_argument("--lr", type=float, help="AdamW learning rate after warmup (constant)")
parser.add_argument("--warmup", type=int, help="linear warmup steps")
parser.add_argument("--max-steps", type=int, help="optimizer steps")
parser.add_argument("--ema", type=float, help="EMA decay (with warmup: min(ema, (1 + step) / (10 + step)))")
parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
parser.add_argument("--eval-every", type=int, help="steps between validation and checkpoint")
parser.add_argument("--eval-windows", type=int, help="validation windows (fixed windows, fixed tau and noise)")
parser.add_argument("--log-every", type=int, default=10, help="steps between log lines")
parser.add_argument("--seed", type=int, default=1337, help="seed; every step's randomness derives from it")
parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
args = parser.parse_args()
for key, value in RUN_PRESETS[args.preset].items():
    if getattr(args, key) is None:
        setattr(args, key, value)
args.out_dir = args.out_dir or f"out/flm-{args.preset}"

# -----------------------------------------------------------------------------
# DDP and devices

ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def fail(message):
    if master:
        print(f"train_flm.py: error: {message}")
    if ddp:
        dist.destroy_process_group()
    raise SystemExit(1)


if args.batch_size % (args.micro_batch * world):
    fail(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch} x world {world}")
accum = args.batch_size // (args.micro_batch * world)
tokens_per_step = args.batch_size * args.seq_len

# -----------------------------------------------------------------------------
# data, model, optimizer, resume

try:
    data = Data(args.data)
except DataError as e:
    fail(e)
cfg = DiTConfig(vocab_size=data.vocab_size, **MODEL_PRESETS[args.model])
if args.dropout is not None:
    cfg.dropout = args.dropout
torch.manual_seed(args.seed)  # identical initial weights on every rank
raw_model = DiT(cfg).to(device)
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
warp = TimeWarp(cfg.vocab_size)
start_step, ckpt_path = 0, os.path.join(args.out_dir, "ckpt.pt")
if args.resume:
    try:
        ckpt = load_checkpoint(ckpt_path, kind="flm")
    except CheckpointError as e:
        fail(e)
    if ckpt["model_config"] != asdict(cfg):
        fail(f"{ckpt_path} has model {ckpt['model_config']}, these flags give {asdict(cfg)}")
    if ckpt["data"]["vocab"] != data.vocab:
        fail(f"{ckpt_path} was trained on data with another vocabulary than {args.data}")
    raw_model.load_state_dict(ckpt["model"])
    ema_model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    start_step = ckpt["step"]
    del ckpt
model = torch.compile(raw_model) if args.compile else raw_model
if ddp:
    model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None)

if master:
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"model {args.model}: {raw_model.num_params():,} parameters, V = {cfg.vocab_size:,}, on {device}")
    print(f"global batch {args.batch_size} = micro {args.micro_batch} x world {world} x accumulation {accum}; "
          f"{tokens_per_step:,} tokens per step, {args.max_steps:,} steps")


def generator(seed, device="cpu"):
    g = torch.Generator(device)
    g.manual_seed(seed)
    return g


def step_seed(step, rank):
    """Every random draw of a step comes from generators seeded by (seed, step, rank): exact resume needs
    only the step, and each rank draws its own data and noise."""
    return (args.seed << 40) + (step << 12) + rank


def lr_at(step):
    return args.lr * min(1.0, (step + 1) / args.warmup)


@torch.no_grad()
def evaluate(net):
    """Mean validation cross-entropy on fixed windows at fixed, evenly spread tau with fixed noise."""
    net.eval()
    noise_gen, total, count = generator(0, device), 0.0, 0
    batches = data.eval_batches("val", args.micro_batch, args.seq_len, args.eval_windows, device)
    for tokens in batches:
        tau = (torch.arange(count, count + len(tokens), device=device) + 0.5) / args.eval_windows
        with autocast:
            total += flm_loss(net, tokens, tau, warp, noise_gen).item() * len(tokens)
        count += len(tokens)
    net.train()
    return total / count


def check_finite():
    if int(first_bad) >= 0:
        fail(f"non-finite loss or gradient at step {int(first_bad)}; {ckpt_path} keeps the last good "
             "checkpoint (try a lower --lr)")


def checkpoint(step, val_loss):
    check_finite()
    if not (all_finite(raw_model) and all_finite(ema_model)):
        fail(f"non-finite weights at step {step}: {ckpt_path} keeps the last good checkpoint")
    save_checkpoint(ckpt_path, dict(
        kind="flm", model=raw_model.state_dict(), ema=ema_model.state_dict(), optimizer=optimizer.state_dict(),
        model_config=asdict(cfg), step=step, args=vars(args), val_loss=val_loss,
        data=dict(dir=args.data, vocab_size=data.vocab_size, vocab=data.vocab, source=data.meta["source"])))


def log(line):
    print(line)
    with open(os.path.join(args.out_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


# -----------------------------------------------------------------------------
# training loop

first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss or gradient, no host sync
t0, step = time.time(), start_step
for step in range(start_step, args.max_steps + 1):
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if step % args.eval_every == 0 or step == args.max_steps:
        val, val_ema = evaluate(model), evaluate(ema_model)
        if master:
            log(f"step {step} | val loss {val:.4f} | ema val loss {val_ema:.4f} | ln V {math.log(cfg.vocab_size):.4f}")
            if step > start_step:
                checkpoint(step, val_ema)
        t0 = time.time()
    if step == args.max_steps:
        break

    data_gen, noise_gen = generator(step_seed(step, rank)), generator(step_seed(step, rank), device)
    torch.manual_seed(step_seed(step, rank))  # dropout
    tau_global = stratified_tau(args.batch_size, generator(step_seed(step, 0) + 1))  # shared by all ranks
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        tokens = data.get_batch("train", args.micro_batch, args.seq_len, data_gen, device)
        offset = (micro * world + rank) * args.micro_batch
        tau = tau_global[offset:offset + args.micro_batch].to(device)
        sync = nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
        with sync, autocast:
            loss = flm_loss(model, tokens, tau, warp, noise_gen, raw_model=raw_model)
        (loss / accum).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(ema_model, raw_model, min(args.ema, (1 + step) / (10 + step)))
    bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
    first_bad = torch.where((first_bad < 0) & bad, step + 1, first_bad)

    if (step + 1) % args.log_every == 0:
        check_finite()
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        dt = (time.time() - t0) / args.log_every
        t0 = time.time()
        if master:
            mfu = ""
            if device_type == "cuda":  # H100 bf16 dense peak, 989 TFLOP/s
                mfu = f" | mfu {raw_model.flops_per_token(args.seq_len) * tokens_per_step / dt / 989e12 / world:.1%}"
            log(f"step {step + 1} | loss {loss_sum.item() / accum:.4f} | lr {lr:.2e} | grad {grad_norm.item():.3f} "
                f"| {dt * 1000:.0f} ms | {tokens_per_step / dt:,.0f} tok/s{mfu}")

if ddp:
    dist.destroy_process_group()
