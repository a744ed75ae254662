"""
Stage 2: semigroup distillation of a trained FLM into its flow map (FMLM, FLM.md 5 and 6).

    python distill.py                                          # CPU quick start, teacher out/flm-ptb/ckpt.pt
    torchrun --standalone --nproc_per_node=8 distill.py --preset owt --teacher out/flm-owt/ckpt.pt --compile

The student is the teacher's DiT plus a second time embedder for tau_t (zero-initialized, so it starts as
delta_{s,t} = D_s). Its input matrix E stays frozen at the teacher's, so teacher and student read the same
projected state h = x_s @ E. Each batch mixes diagonal rows (target: the frozen teacher's denoiser) and
off-diagonal rows (target: the student's own two-step semigroup composition, without gradient).
"""

import argparse
import copy
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import Data, DataError
from model import (CheckpointError, TimeWarp, all_finite, distill_loss, distill_times, ema_update, load_checkpoint,
                   model_from_checkpoint, save_checkpoint)

# -----------------------------------------------------------------------------
# settings: a preset fills every flag that the command line leaves unset

RUN_PRESETS = {
    # the embedded corpus on a laptop CPU
    "ptb": dict(teacher="out/flm-ptb/ckpt.pt", batch_size=32, micro_batch=32, lr=1e-3, warmup=50, max_steps=400,
                ema=0.99, eval_every=100, eval_windows=64),
    # the paper's settings (FLM.md 6): AdamW 3e-4, betas (0.9, 0.95), 100K steps, batch 512 (LM1B) / 128 (OWT)
    "lm1b": dict(teacher="out/flm-lm1b/ckpt.pt", batch_size=512, micro_batch=64, lr=3e-4, warmup=1000,
                 max_steps=100_000, ema=0.9999, eval_every=5000, eval_windows=1024),
    "owt": dict(teacher="out/flm-owt/ckpt.pt", batch_size=128, micro_batch=8, lr=3e-4, warmup=1000,
                max_steps=100_000, ema=0.9999, eval_every=5000, eval_windows=256),
}

parser = argparse.ArgumentParser(description="Distill an FLM into its flow map (FMLM) with the semigroup loss.")
parser.add_argument("--preset", default="ptb", choices=list(RUN_PRESETS), help="run settings to start from")
parser.add_argument("--teacher", help="FLM checkpoint from train_flm.py (its EMA weights are the teacher)")
parser.add_argument("--data", help="prepared data folder (default: the teacher's)")
parser.add_argument("--out-dir", default=None, help="checkpoint and log folder (default out/fmlm-<preset>)")
parser.add_argument("--dropout", type=float, default=0.0, help="student dropout")
parser.add_argument("--batch-size", type=int, help="global batch in sequences, over all ranks and micro-steps")
parser.add_argument("--micro-batch", type=int, help="sequences per rank per forward; accumulation is derived")
parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the teacher's)")
parser.add_argument("--diag-frac", type=float, default=0.5, help="share of diagonal rows (tau_s = tau_t)")
parser.add_argument("--boundary-frac", type=float, default=1 / 32,
                    help="share of the non-diagonal rows with (tau_s, tau_t) = (0, 1), the one-step jump")
parser.add_argument("--lr", type=float, help="AdamW learning rate after warmup (constant), betas (0.9, 0.95)")
parser.add_argument("--warmup", type=int, help="linear warmup steps")
parser.add_argument("--max-steps", type=int, help="optimizer steps")
parser.add_argument("--ema", type=float, help="EMA decay (with warmup: min(ema, (1 + step) / (10 + step)))")
parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
parser.add_argument("--eval-every", type=int, help="steps between validation and checkpoint")
parser.add_argument("--eval-windows", type=int, help="validation windows (fixed windows, times and noise)")
parser.add_argument("--log-every", type=int, default=10, help="steps between log lines")
parser.add_argument("--seed", type=int, default=1337, help="seed; every step's randomness derives from it")
parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
parser.add_argument("--compile", action="store_true", help="torch.compile the student")
parser.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
args = parser.parse_args()
for key, value in RUN_PRESETS[args.preset].items():
    if getattr(args, key) is None:
        setattr(args, key, value)
args.out_dir = args.out_dir or f"out/fmlm-{args.preset}"

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
        print(f"distill.py: error: {message}")
    if ddp:
        dist.destroy_process_group()
    raise SystemExit(1)


if args.batch_size % (args.micro_batch * world):
    fail(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch} x world {world}")
accum = args.batch_size // (args.micro_batch * world)

# -----------------------------------------------------------------------------
# teacher (once, frozen), student, data, optimizer, resume

try:
    teacher_ckpt = load_checkpoint(args.teacher, kind="flm")
    data = Data(args.data or teacher_ckpt["data"]["dir"])
except (CheckpointError, DataError) as e:
    fail(e)
if data.vocab != teacher_ckpt["data"]["vocab"]:
    fail(f"{data.dir} was prepared with another vocabulary than the teacher {args.teacher} was trained on")
args.data, args.seq_len = data.dir, args.seq_len or teacher_ckpt["args"]["seq_len"]
teacher = model_from_checkpoint(teacher_ckpt).to(device).eval().requires_grad_(False)
raw_model = copy.deepcopy(teacher).train().requires_grad_(True)
raw_model.config = copy.deepcopy(teacher.config)
raw_model.config.dropout = args.dropout
for module in raw_model.modules():
    if isinstance(module, torch.nn.Dropout):
        module.p = args.dropout
torch.manual_seed(args.seed)
raw_model.add_second_time()
raw_model.embed.requires_grad_(False)  # E frozen: teacher and student read the same h = x_s @ E
cfg = raw_model.config
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
warp = TimeWarp(cfg.vocab_size)
start_step, ckpt_path = 0, os.path.join(args.out_dir, "ckpt.pt")
if args.resume:
    try:
        ckpt = load_checkpoint(ckpt_path, kind="fmlm")
    except CheckpointError as e:
        fail(e)
    if ckpt["model_config"] != asdict(cfg):
        fail(f"{ckpt_path} has model {ckpt['model_config']}, these flags give {asdict(cfg)}")
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
    print(f"student: {raw_model.num_params():,} parameters ({sum(p.numel() for p in params):,} trained), "
          f"V = {cfg.vocab_size:,}, teacher {args.teacher} (step {teacher_ckpt['step']}), on {device}")
    print(f"global batch {args.batch_size} = micro {args.micro_batch} x world {world} x accumulation {accum}; "
          f"{args.batch_size * args.seq_len:,} tokens per step, {args.max_steps:,} steps")


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
    """The distillation loss on fixed validation windows with fixed times and noise."""
    net.eval()
    noise_gen, total, count = generator(0, device), 0.0, 0
    tau_s, tau_t, diag = distill_times(args.eval_windows, generator(0), args.diag_frac, args.boundary_frac)
    for tokens in data.eval_batches("val", args.micro_batch, args.seq_len, args.eval_windows, device):
        rows = slice(count, count + len(tokens))
        with autocast:
            loss = distill_loss(net, net, teacher, tokens, tau_s[rows].to(device), tau_t[rows].to(device),
                                diag[rows].to(device), warp, noise_gen)
        total += loss.item() * len(tokens)
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
        kind="fmlm", model=raw_model.state_dict(), ema=ema_model.state_dict(), optimizer=optimizer.state_dict(),
        model_config=asdict(cfg), step=step, args=vars(args), val_loss=val_loss, teacher=args.teacher,
        data=teacher_ckpt["data"]))


def log(line):
    print(line)
    with open(os.path.join(args.out_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


# -----------------------------------------------------------------------------
# training loop

first_bad = torch.tensor(-1, device=device)  # first step with a non-finite loss or gradient, no host sync
t0 = time.time()
for step in range(start_step, args.max_steps + 1):
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if step % args.eval_every == 0 or step == args.max_steps:
        val, val_ema = evaluate(raw_model), evaluate(ema_model)
        if master:
            log(f"step {step} | val loss {val:.4f} | ema val loss {val_ema:.4f}")
            if step > start_step:
                checkpoint(step, val_ema)
        t0 = time.time()
    if step == args.max_steps:
        break

    data_gen, noise_gen = generator(step_seed(step, rank)), generator(step_seed(step, rank), device)
    torch.manual_seed(step_seed(step, rank))  # dropout
    tau_s_all, tau_t_all, diag_all = distill_times(args.batch_size, generator(step_seed(step, 0) + 1),
                                                   args.diag_frac, args.boundary_frac)  # shared by all ranks
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        tokens = data.get_batch("train", args.micro_batch, args.seq_len, data_gen, device)
        rows = slice((micro * world + rank) * args.micro_batch, (micro * world + rank + 1) * args.micro_batch)
        sync = nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
        with sync, autocast:
            loss = distill_loss(model, raw_model, teacher, tokens, tau_s_all[rows].to(device),
                                tau_t_all[rows].to(device), diag_all[rows].to(device), warp, noise_gen)
        (loss / accum).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
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
            log(f"step {step + 1} | loss {loss_sum.item() / accum:.4f} | lr {lr:.2e} | grad {grad_norm.item():.3f} "
                f"| {dt * 1000:.0f} ms | {args.batch_size * args.seq_len / dt:,.0f} tok/s")

if ddp:
    dist.destroy_process_group()
