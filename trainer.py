"""
The command-line checks that every script uses, and the training harness that train_flm.py and distill.py share,
so that the two loops cannot drift apart:
the run flags, DDP and devices, precision, the batch arithmetic, per-slot randomness, warmup, evaluation
sharded over ranks, logging, the finite check and checkpoint guard, resume, and the loop skeleton.

Each script keeps its own algorithm: what one micro-batch's loss is (`micro_loss`), what is evaluated, what its
checkpoint records. The loop here runs in the obvious order: lr -> periodic eval and checkpoint -> micro-steps
-> clip -> step -> zero_grad -> EMA -> log.

The same run at any world size: slot i of the global batch at step k gets its data window, noise, time and
dropout masks from the key (seed, k, i) (model.row_key), and rank r's micro-step m holds the slots
(m * world + r) * micro_batch ... + micro_batch - 1. So 2 ranks x 1 micro-step and 1 rank x 2 micro-steps
train on the same global batch, and a run resumes on any number of ranks.
"""

import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import (CheckpointError, all_finite, autocast_for, ema_update, given_mask, load_checkpoint, save_checkpoint,
                   unwrap)

PEAK_FLOPS = {"bf16": 989e12, "fp32": 67e12}  # H100 SXM dense peak, for the MFU of the log line


# -----------------------------------------------------------------------------
# command-line checks: a bad value gets one line naming the flag, the value and what was expected, and exit 2

AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
NONNEG = (lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
FINITE = (lambda v: math.isfinite(v), "a finite number")
FRACTION = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
BELOW_1 = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def usage_error(script, message):
    """Exit like argparse (code 2) with one line on stderr, printed by one rank only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{script}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_args(args, script, **rules):
    """rules: flag name -> (predicate, what is expected); unset flags (None) are not checked."""
    for name, (ok, expected) in rules.items():
        value = getattr(args, name)
        for v in (value if isinstance(value, list) else [value]):
            if v is not None and not ok(v):
                usage_error(script, f"argument --{name.replace('_', '-')}: got {v}, expected {expected}")


def check_device(args, script):
    """--device names a device this machine has."""
    if args.device is None:
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        usage_error(script, f"argument --device: got {args.device}, expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        usage_error(script, f"argument --device: got {args.device}, but this machine has "
                            f"{torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        usage_error(script, f"argument --device: got {args.device}, expected cpu, cuda or cuda:N")


def check_out_file(path, flag, script):
    """An output file path whose folder can be made and which is not a folder itself."""
    if path is not None and os.path.isdir(path):
        usage_error(script, f"argument {flag}: got {path}, which is a folder; expected a file path")


RUN_RULES = dict(batch_size=AT_LEAST_1, micro_batch=AT_LEAST_1, lr=POSITIVE, warmup=AT_LEAST_1, decay=FRACTION,
                 max_steps=AT_LEAST_1, ema=BELOW_1, grad_clip=NONNEG, eval_every=AT_LEAST_1, eval_windows=AT_LEAST_1,
                 log_every=AT_LEAST_1, dropout=BELOW_1, seq_len=AT_LEAST_1, cond_frac=FRACTION, keep_every=NONNEG)


def add_run_args(parser):
    """The flags every training stage has; a preset fills those left unset (None)."""
    a = parser.add_argument
    a("--out-dir", default=None, help="checkpoint and log folder (default out/<stage>-<preset>)")
    a("--batch-size", type=int, help="global batch in sequences, over all ranks and micro-steps")
    a("--micro-batch", type=int, help="sequences per rank per forward; accumulation = batch / (micro x world)")
    a("--lr", type=float, help="AdamW learning rate after warmup")
    a("--warmup", type=int, help="linear warmup steps")
    a("--decay", type=float, help="share of the last steps over which the lr falls linearly to 0 (0: constant, the "
      "paper's; default: the preset's)")
    a("--max-steps", type=int, help="optimizer steps")
    a("--ema", type=float, help="EMA decay (with warmup: min(ema, (1 + step) / (10 + step)))")
    a("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    a("--eval-every", type=int, help="steps between validation and checkpoint")
    a("--eval-windows", type=int, help="validation windows (fixed windows, times and noise), split over ranks")
    a("--log-every", type=int, default=10, help="steps between log lines")
    a("--keep-every", type=int, help="also keep the checkpoint of every multiple of this many steps as "
      "ckpt-STEP.pt, at validation steps (0: only the latest; an earlier one is autoguidance's weak model)")
    a("--cond-frac", type=float,
      help="conditioning: the share of rows given a prompt (a prefix of random length) or spans to fill, fed clean "
           "at every time and left out of the loss (0: off, the training of an unconditional model unchanged; "
           "default: the preset's, 0.2 for the quick start, 0 for the paper's)")
    a("--seed", type=int, default=1337, help="seed; every random draw of a step derives from (seed, step, slot)")
    a("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available; torchrun: LOCAL_RANK)")
    a("--dtype", choices=["fp32", "bf16"], default=None,
      help="autocast precision of the transformer (default: bf16 on CUDA, fp32 on CPU); time warp, softmax, "
           "losses and sampler state stay fp32")
    a("--compile", action="store_true", help="torch.compile the trained model")
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt (on any number of ranks)")


def apply_presets(args, presets, stage, script):
    """Check the flags given, then fill those left unset from the preset."""
    check_args(args, script, **RUN_RULES)
    check_device(args, script)
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out_dir = args.out_dir or f"out/{stage}-{args.preset}"
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        usage_error(script, f"argument --out-dir: got {args.out_dir}, which is a file; expected a folder")
    return args


class Trainer:
    """One training run: its ranks, device, precision, batch arithmetic, log and checkpoint."""

    def __init__(self, args, script):
        self.args, self.script = args, script
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if self.ddp:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
            if self.device.startswith("cuda"):
                torch.cuda.set_device(self.device)
        else:
            self.rank, self.world = 0, 1
            self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.master = self.rank == 0
        self.autocast, args.dtype = autocast_for(self.device, args.dtype)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if args.batch_size % (args.micro_batch * self.world):
            self.fail(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch} "
                      f"x world {self.world}")
        self.accum = args.batch_size // (args.micro_batch * self.world)
        self.ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def fail(self, message):
        if self.master:
            print(f"{self.script}: error: {message}", flush=True)
        if self.ddp:
            dist.destroy_process_group()
        raise SystemExit(1)

    def log(self, line):
        if self.master:
            print(line, flush=True)
            with open(os.path.join(self.args.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    def wrap(self, raw_model):
        """The module the loop trains: compiled if asked, inside DDP under torchrun."""
        model = torch.compile(raw_model) if self.args.compile else raw_model
        if self.ddp:
            model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if self.device.startswith("cuda") else None)
        return model

    def resume(self, kind, raw_model, ema_model, optimizer):
        """Load out_dir/ckpt.pt into the model, EMA and optimizer; returns the checkpoint (its step is the start)."""
        try:
            ckpt = load_checkpoint(self.ckpt_path, kind=kind)
        except CheckpointError as e:
            self.fail(e)
        if ckpt["model_config"] != asdict(raw_model.config):
            self.fail(f"{self.ckpt_path} has model {ckpt['model_config']}, these flags give {asdict(raw_model.config)}")
        raw_model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return ckpt

    def print_setup(self, line):
        if self.master:
            os.makedirs(self.args.out_dir, exist_ok=True)
            a = self.args
            print(line)
            print(f"global batch {a.batch_size} = micro {a.micro_batch} x world {self.world} x accumulation "
                  f"{self.accum}; {a.batch_size * a.seq_len:,} tokens per step, {a.max_steps:,} steps, {a.dtype}"
                  f"{', compiled' if a.compile else ''}, on {self.device}")

    @torch.no_grad()
    def evaluate(self, net, data, loss_of):
        """Mean of loss_of(net, tokens, slots) over the fixed validation windows, each rank taking its share."""
        a, was_training = self.args, net.training
        net.eval()
        share = -(-a.eval_windows // self.world)
        first, last = self.rank * share, min((self.rank + 1) * share, a.eval_windows)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for slots, tokens in data.eval_batches("val", a.seq_len, a.eval_windows, a.micro_batch, self.device,
                                               first, last):
            with self.autocast:
                total += loss_of(net, tokens, slots).double() * len(slots)
        if self.ddp:
            dist.all_reduce(total)
        net.train(was_training)
        return total.item() / a.eval_windows

    def given(self, keys):
        """--cond-frac: the rows' given positions (a prompt or spans), from their keys; None when off."""
        a = self.args
        return given_mask(keys.to(self.device), a.seq_len, a.cond_frac) if a.cond_frac > 0 else None

    def fit(self, model, ema_model, optimizer, micro_loss, evaluate, checkpoint, start_step, flops_per_token):
        """The loop. micro_loss(model, step, slots) -> mean loss of those global-batch slots; evaluate(net) ->
        validation loss; checkpoint() -> what the script's checkpoint adds to the common keys."""
        a, raw_model = self.args, unwrap(model)
        params = [p for p in raw_model.parameters() if p.requires_grad]
        tokens_per_step = a.batch_size * a.seq_len
        first_bad = torch.tensor(-1, device=self.device)  # first step with a non-finite loss or gradient
        t0 = time.time()
        for step in range(start_step, a.max_steps + 1):
            lr = a.lr * min(1.0, (step + 1) / a.warmup, (a.max_steps - step) / max(a.decay * a.max_steps, 1e-9))
            for group in optimizer.param_groups:
                group["lr"] = lr

            if step % a.eval_every == 0 or step == a.max_steps:
                val, val_ema = evaluate(raw_model), evaluate(ema_model)
                self.log(f"step {step} | val loss {val:.4f} | ema val loss {val_ema:.4f}")
                if step > start_step:
                    self.check_finite(first_bad, raw_model, ema_model)
                    if self.master:
                        save_checkpoint(self.ckpt_path, dict(
                            checkpoint(), model=raw_model.state_dict(), ema=ema_model.state_dict(),
                            optimizer=optimizer.state_dict(), model_config=asdict(raw_model.config), step=step,
                            args=vars(a), val_loss=val_ema))
                        if a.keep_every and step % a.keep_every == 0 and step < a.max_steps:  # e.g. autoguidance
                            kept = os.path.join(a.out_dir, f"ckpt-{step}.pt")
                            shutil.copyfile(self.ckpt_path, kept + ".tmp")
                            os.replace(kept + ".tmp", kept)
                t0 = time.time()
            if step == a.max_steps:
                break

            loss_sum = torch.zeros((), device=self.device)
            for micro in range(self.accum):
                first = (micro * self.world + self.rank) * a.micro_batch
                slots = torch.arange(first, first + a.micro_batch)
                sync = model.no_sync() if self.ddp and micro < self.accum - 1 else nullcontext()
                with sync, self.autocast:
                    loss = micro_loss(model, step, slots)
                (loss / self.accum).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema_model, raw_model, min(a.ema, (1 + step) / (10 + step)))
            bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
            first_bad = torch.where((first_bad < 0) & bad, step + 1, first_bad)

            if (step + 1) % a.log_every == 0:
                self.check_finite(first_bad)
                if self.ddp:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                dt = (time.time() - t0) / a.log_every
                t0 = time.time()
                mfu = ""
                if self.device.startswith("cuda"):
                    mfu = f" | mfu {flops_per_token * tokens_per_step / dt / PEAK_FLOPS[a.dtype] / self.world:.1%}"
                self.log(f"step {step + 1} | loss {loss_sum.item() / self.accum:.4f} | lr {lr:.2e} | grad "
                         f"{grad_norm.item():.3f} | {dt * 1000:.0f} ms | {tokens_per_step / dt:,.0f} tok/s{mfu}")
        if self.ddp:
            dist.barrier()  # every rank leaves together, after rank 0 has written the last checkpoint
            dist.destroy_process_group()

    def check_finite(self, first_bad, *models):
        """Stop (on every rank) at a non-finite loss, gradient or weight; the last good checkpoint stays."""
        if int(first_bad) >= 0:
            self.fail(f"non-finite loss or gradient at step {int(first_bad)}; {self.ckpt_path} keeps the last good "
                      "checkpoint (try a lower --lr)")
        if not all(all_finite(m) for m in models):
            self.fail(f"non-finite weights: {self.ckpt_path} keeps the last good checkpoint")

