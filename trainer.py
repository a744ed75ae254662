"""
What the scripts share around their loops: flag types that check values, the run flags and presets, the process
group, the lr schedule, EMA, evaluation sharded over ranks, the finite check, logging and checkpoint writing.
The training loops themselves are written out in train_flm.py and distill.py.

The same run at any world size: slot i of the global batch at step k gets its data window, noise, time and
dropout masks from the key (seed, k, i) (model.row_key), and rank r's micro-step m holds the slots
(m * world + r) * micro_batch ... + micro_batch - 1 (`micro_slots`). So 2 ranks x 1 micro-step and 1 rank x 2
micro-steps train on the same global batch, and a run resumes on any number of ranks.
"""

import argparse
import math
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model import autocast_for

# dense peak FLOP/s by device name (bf16; fp32 as tf32 matmuls), for MFU: vendors' datasheets, SXM parts
PEAK_FLOPS = {"H200": dict(bf16=989e12, fp32=494e12), "H100": dict(bf16=989e12, fp32=494e12),
              "A100": dict(bf16=312e12, fp32=156e12), "L40S": dict(bf16=362e12, fp32=181e12),
              "A10G": dict(bf16=70e12, fp32=35e12), "4090": dict(bf16=165e12, fp32=82.6e12)}

# -----------------------------------------------------------------------------
# flags: argparse type= functions, so that a bad value gets one line naming the flag, the value and what was
# expected, and exit code 2


def checked(cast, ok, expected):
    """An argparse type: cast the text, then check it with ok(value)."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {expected}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"got {value}, expected {expected}")
        return value
    return parse


COUNT = checked(int, lambda v: v >= 1, "an integer >= 1")
NONNEG_INT = checked(int, lambda v: v >= 0, "an integer >= 0")
NONNEG = checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
POSITIVE = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
FINITE = checked(float, math.isfinite, "a finite number")
FRACTION = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
BELOW_1 = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def usage_error(script, message):
    """Exit like argparse (code 2) with one line on stderr, printed by one rank only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{script}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parser_for(description, script):
    """An ArgumentParser whose --help shows every default and whose errors are one line (rank 0 only)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.error = lambda message: usage_error(script, message)
    return parser


def device_flag(text):
    """--device: a device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"got {text}, expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"got {text}, expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"got {text}, but this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def out_file(text):
    """An output file path that is not a folder."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"got {text}, which is a folder; expected a file path")
    return text


def out_folder(text):
    """An output folder path that is not a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"got {text}, which is a file; expected a folder")
    return text


def add_run_args(parser):
    """The flags every training stage has; --preset sets their defaults (parse_with_preset)."""
    a = parser.add_argument
    a("--out-dir", type=out_folder, help="checkpoint and log folder")
    a("--batch-size", type=COUNT, help="global batch in sequences, over all ranks and micro-steps")
    a("--micro-batch", type=COUNT, help="sequences per rank per forward; accumulation = batch / (micro x world)")
    a("--lr", type=POSITIVE, help="AdamW learning rate after warmup")
    a("--warmup", type=COUNT, help="linear warmup steps")
    a("--decay", type=FRACTION, help="share of the last steps over which the lr falls linearly to 0 (0: constant, "
      "the paper's)")
    a("--max-steps", type=COUNT, help="optimizer steps")
    a("--ema", type=BELOW_1, help="EMA decay (with warmup: min(ema, (1 + step) / (10 + step)))")
    a("--grad-clip", type=NONNEG, default=1.0, help="gradient norm clip (0: off)")
    a("--eval-every", type=COUNT, help="steps between validation and checkpoint")
    a("--eval-windows", type=COUNT, help="validation windows (fixed windows, times and noise), split over ranks")
    a("--log-every", type=COUNT, default=10, help="steps between log lines")
    a("--keep-every", type=NONNEG_INT, help="also keep the checkpoint of every multiple of this many steps as "
      "ckpt-STEP.pt, at validation steps (0: only the latest; an earlier one is autoguidance's weak model)")
    a("--cond-frac", type=FRACTION, help="conditioning: the share of rows given a prompt (a prefix of random length) "
      "or spans to fill, fed clean at every time and left out of the loss (0: off)")
    a("--seed", type=int, default=1337, help="seed; every random draw of a step derives from (seed, step, slot)")
    a("--device", type=device_flag, help="cpu, cuda, cuda:1, ... (None: cuda if available; torchrun: LOCAL_RANK)")
    a("--dtype", choices=["fp32", "bf16"], help="autocast precision of the transformer (None: bf16 on CUDA, "
      "fp32 on CPU); time warp, softmax, losses and sampler state stay fp32")
    a("--compile", action="store_true", help="torch.compile the trained model")
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt (on any number of ranks)")
    a("--ckpt-every", type=NONNEG_INT, default=0, help="also write the checkpoint every this many steps between "
      "validations (0: only at validations); SIGTERM or SIGUSR1 writes one at the step it interrupts")
    a("--wandb", metavar="PROJECT", help="also log to Weights & Biases under this project (pip install wandb; "
      "WANDB_MODE=offline works without an account)")


def parse_with_preset(parser, presets, stage):
    """Read --preset first, make its settings the defaults (so that --help prints them), then parse the rest."""
    preset = parser.parse_known_args([a for a in sys.argv[1:] if a not in ("-h", "--help")])[0].preset
    parser.set_defaults(**presets[preset], out_dir=f"out/{stage}-{preset}")
    return parser.parse_args()


# -----------------------------------------------------------------------------
# ranks and devices: plain python (CPU or one GPU) or torchrun (DDP: NCCL on GPUs, gloo on CPUs)


@dataclass
class Ranks:
    ddp: bool
    rank: int
    world: int
    device: str
    script: str

    @property
    def master(self):
        return self.rank == 0


def init_ranks(device, script):
    """Join the process group under torchrun; the device of this rank."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Ranks(False, 0, 1, device or ("cuda" if torch.cuda.is_available() else "cpu"), script)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return Ranks(True, dist.get_rank(), dist.get_world_size(), device, script)


def fail(ranks, message):
    """Stop every rank with one line from rank 0 and exit code 1."""
    if ranks.master:
        print(f"{ranks.script}: error: {message}", flush=True)
    if ranks.ddp:
        dist.destroy_process_group()
    raise SystemExit(1)


def init_run(args, script):
    """The ranks, the autocast context and the accumulation (micro-steps per optimizer step) of a training run;
    SIGTERM and SIGUSR1 are caught from here on (preempted), and --wandb starts its run on rank 0."""
    ranks = init_ranks(args.device, script)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: _signals.append(signal.Signals(signum).name))
    if args.wandb and ranks.master:
        try:
            import wandb
        except ImportError:
            fail(ranks, "--wandb needs the wandb package: pip install wandb")
        _wandb.append(wandb.init(project=args.wandb, name=os.path.basename(os.path.abspath(args.out_dir)),
                                 config=vars(args), dir=args.out_dir, resume="allow"))
    autocast, args.dtype = autocast_for(ranks.device, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.batch_size % (args.micro_batch * ranks.world):
        fail(ranks, f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch} "
                    f"x world {ranks.world}")
    return ranks, autocast, args.batch_size // (args.micro_batch * ranks.world)


def resume(ckpt_path, kind, raw_model, ema_model, optimizer, ranks):
    """Load a checkpoint of ours into the model, EMA and optimizer; returns it (its step is the start)."""
    try:
        ckpt = load_checkpoint(ckpt_path, kind=kind)
    except CheckpointError as e:
        fail(ranks, e)
    if ckpt["model_config"] != asdict(raw_model.config):
        fail(ranks, f"{ckpt_path} has model {ckpt['model_config']}, these flags give {asdict(raw_model.config)}")
    raw_model.load_state_dict(ckpt["model"])
    ema_model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


def micro_slots(micro, ranks, micro_batch):
    """The global-batch slots of this rank's micro-step: (micro * world + rank) * micro_batch onwards."""
    first = (micro * ranks.world + ranks.rank) * micro_batch
    return torch.arange(first, first + micro_batch)


def wrap(raw_model, args, ranks):
    """The module the loop trains: DDP under torchrun, then compiled if asked (compiling the DDP module lets
    dynamo split the graph at DDP's buckets, so the gradient all-reduce overlaps the backward)."""
    model = raw_model
    if ranks.ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if ranks.device.startswith("cuda") else None)
    return torch.compile(model) if args.compile else model


def to_device(x, device):
    """A host tensor on the device; from pinned memory without blocking the host on CUDA."""
    return x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x.to(device)


def peak_flops(device, dtype):
    """The dense peak FLOP/s of a CUDA device at bf16 or fp32 (tf32), by its name; None when unknown (no MFU)."""
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[dtype]
    return None


def print_setup(args, ranks, accum, line):
    """The model line and the batch arithmetic, once, on rank 0."""
    if ranks.master:
        os.makedirs(args.out_dir, exist_ok=True)
        print(line)
        print(f"global batch {args.batch_size} = micro {args.micro_batch} x world {ranks.world} x accumulation "
              f"{accum}; {args.batch_size * args.seq_len:,} tokens per step, {args.max_steps:,} steps, "
              f"{args.dtype}{', compiled' if args.compile else ''}, on {ranks.device}")


# -----------------------------------------------------------------------------
# the pieces of the loop


def get_lr(step, args):
    """Linear warmup, then constant, then (with --decay) linear to 0 over the last share of the steps."""
    warmup = (step + 1) / args.warmup
    decay = (args.max_steps - step) / max(args.decay * args.max_steps, 1e-9)
    return args.lr * min(1.0, warmup, decay)


def factor_leaf(factor):
    """The step's noise factor (flow.state_factor) cut from E's graph: every micro-step's loss reads this leaf and
    gathers its gradient there, so the V D^2 Gram product and its backward run once per optimizer step."""
    return None if factor is None else factor.detach().requires_grad_(factor.requires_grad)


def carry_factor_grad(factor, leaf, embed, ranks):
    """Carry the gradient gathered on the leaf back through the factor to E, once, after the micro-steps; averaged
    over ranks first, as DDP averages every other gradient (autograd.grad leaves DDP's hooks alone)."""
    if leaf is None or leaf.grad is None:
        return
    if ranks.ddp:
        dist.all_reduce(leaf.grad, op=dist.ReduceOp.AVG)
    embed.grad += torch.autograd.grad(factor, embed, leaf.grad)[0]


@torch.no_grad()
def ema_update(ema_model, model, decay):
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - decay)


@torch.no_grad()
def evaluate(net, data, loss_of, args, ranks, autocast):
    """Mean of loss_of(net, tokens, slots) over the fixed validation windows, each rank taking its share."""
    was_training = net.training
    net.eval()
    share = -(-args.eval_windows // ranks.world)
    first, last = ranks.rank * share, min((ranks.rank + 1) * share, args.eval_windows)
    total = torch.zeros((), device=ranks.device, dtype=torch.float64)
    for slots, tokens in data.eval_batches("val", args.seq_len, args.eval_windows, args.micro_batch, ranks.device,
                                           first, last):
        with autocast:
            total += loss_of(net, tokens, slots).double() * len(slots)
    if ranks.ddp:
        dist.all_reduce(total)
    net.train(was_training)
    return total.item() / args.eval_windows


def all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def check_finite(ranks, first_bad, ckpt_path, *models):
    """Stop every rank at a non-finite loss, gradient or weight seen on any rank (reduced over ranks first, so that
    no rank waits for the others at a collective); the last good checkpoint stays."""
    if ranks.ddp:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    if int(first_bad) >= 0:
        fail(ranks, f"non-finite loss or gradient at step {int(first_bad)}; {ckpt_path} keeps the last good "
                    "checkpoint (try a lower --lr)")
    if not all(all_finite(m) for m in models):
        fail(ranks, f"non-finite weights: {ckpt_path} keeps the last good checkpoint")


_signals, _wandb = [], []  # the names of the signals caught; the wandb run of rank 0


def preempted(ranks, step, save, ckpt_path, args):
    """True after a SIGTERM or SIGUSR1 caught by any rank: every rank gets the same answer (reduced over ranks, one
    host sync a step), so all of them stop after the same step, which save(step) has checkpointed."""
    flag = torch.tensor(1.0 if _signals else 0.0, device=ranks.device)
    if ranks.ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return False
    save(step)
    log(f"step {step} | stopped by {_signals[0] if _signals else 'a signal on another rank'}: {ckpt_path} holds "
        "this step; continue with --resume", args, ranks)
    return True


def write_checkpoint(ckpt_path, ckpt, args):
    """Rank 0's checkpoint, atomically; with --keep-every also a copy ckpt-STEP.pt (e.g. autoguidance's weak model)."""
    save_checkpoint(ckpt_path, ckpt)
    step = ckpt["step"]
    if args.keep_every and step % args.keep_every == 0 and step < args.max_steps:
        kept = os.path.join(args.out_dir, f"ckpt-{step}.pt")
        shutil.copyfile(ckpt_path, kept + ".tmp")
        os.replace(kept + ".tmp", kept)


def log(line, args, ranks):
    """Print on rank 0 and append to out_dir/log.txt."""
    if ranks.master:
        print(line, flush=True)
        with open(os.path.join(args.out_dir, "log.txt"), "a") as f:
            f.write(line + "\n")


def log_step(step, loss, grad_norm, lr, dt, flops_per_token, args, ranks):
    """The fixed-format line of a logged step: loss (averaged over ranks), lr, grad norm, time, tokens/s, MFU."""
    tokens_per_step = args.batch_size * args.seq_len
    peak = peak_flops(ranks.device, args.dtype) if ranks.device.startswith("cuda") else None
    mfu = f" | mfu {flops_per_token * tokens_per_step / dt / peak / ranks.world:.1%}" if peak else ""
    log(f"step {step} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | {dt * 1000:.0f} ms | "
        f"{tokens_per_step / dt:,.0f} tok/s{mfu}", args, ranks)
    log_metrics(step, loss=loss, lr=lr, grad_norm=grad_norm, ms_per_step=dt * 1000, tokens_per_s=tokens_per_step / dt,
                **({"mfu": flops_per_token * tokens_per_step / dt / peak / ranks.world} if peak else {}))


def log_metrics(step, **metrics):
    """What the log lines print, to the --wandb run (rank 0), if there is one."""
    for run in _wandb:
        run.log(metrics, step=step)


def finish_run(ranks):
    """Every rank leaves together, after rank 0 has written its last checkpoint; the wandb run ends."""
    for run in _wandb:
        run.finish()
    if ranks.ddp:
        dist.barrier()
        dist.destroy_process_group()

