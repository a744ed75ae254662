"""
What the two training loops share around their loops: their flags and schedules (lr, EMA); `Ranks`, the process
group and its stop requests; `Log`, the log; and `Run`, which holds both with the run's autocast and
accumulation, its data, evaluation over ranks, the finite check and checkpoints. The loops themselves are written
out in train_flm.py and distill.py, as nanoGPT writes its loop in train.py, so that a reader sees each stage's
phases in its own file; the tests (torchrun, world-size invariance, exact resume, for both) keep the two from
drifting.

The same run at any world size: slot i of the global batch at step k draws its window, noise, time and dropout
from the key (seed, k, i) (rng.row_key), and rank r's micro-step m holds the slots from (m * world + r) *
micro_batch (`Run.slots`): 2 ranks x 1 micro-step train on the batch of 1 rank x 2, and a run resumes on any
number of ranks."""

import glob
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common import BELOW_1, COUNT, FRACTION, NONNEG, NONNEG_INT, POSITIVE, DataError, atomic_write
from common import default_device, device_flag, fail, out_path, peak_flops, to_device
from data import Data
from flow import given_mask
from model import DiTConfig, autocast_for


def add_run_args(parser):
    """The flags of both training stages; --preset sets their defaults (parse_with_preset)."""
    a = parser.add_argument
    a("--out-dir", type=out_path(folder=True), help="checkpoint and log folder")
    a("--batch-size", type=COUNT, help="global batch in sequences, over ranks and micro-steps")
    a("--micro-batch", type=COUNT, help="sequences per rank per forward (sets the accumulation)")
    a("--lr", type=POSITIVE, help="AdamW learning rate after warmup")
    a("--warmup", type=COUNT, help="linear warmup steps")
    a("--decay", type=FRACTION, help="share of the last steps where the lr falls linearly to 0")
    a("--max-steps", type=COUNT, help="optimizer steps")
    a("--ema", type=BELOW_1, help="EMA decay (with warmup: min(ema, (1 + step) / (10 + step)))")
    a("--grad-clip", type=NONNEG, default=1.0, help="gradient norm clip (0: off)")
    a("--eval-every", type=COUNT, help="steps between validation and checkpoint")
    a("--eval-windows", type=COUNT, help="validation windows (fixed times and noise)")
    a("--log-every", type=COUNT, default=10, help="steps between log lines")
    a("--keep-every", type=NONNEG_INT, help="also keep ckpt-STEP.pt at these validations (0: no)")
    a("--cond-frac", type=FRACTION, help="share of rows given a prompt or spans (METHOD.md 15)")
    a("--seed", type=int, default=1337, help="every draw of a step derives from (seed, step, slot)")
    a("--device", type=device_flag, help="cpu, cuda, cuda:N (None: cuda if available)")
    a("--dtype", choices=["fp32", "bf16"], help="autocast (None: bf16 on CUDA, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the trained model")
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt, on any number of ranks")
    a("--ckpt-every", type=NONNEG_INT, default=0, help="also checkpoint every N steps (0: no)")
    a("--wandb", metavar="PROJECT", help="also log to Weights & Biases (pip install wandb)")


def parse_with_preset(parser, presets, stage):
    """Read --preset first, make its settings the defaults (--help prints them), then parse the rest."""
    known = parser.parse_known_args([a for a in sys.argv[1:] if a not in ("-h", "--help")])[0]
    parser.set_defaults(**presets[known.preset], out_dir=f"out/{stage}-{known.preset}")
    return parser.parse_args()


# -----------------------------------------------------------------------------
# the loop's schedules


def get_lr(step, args):
    """Linear warmup, then constant, then (with --decay) linear to 0 over the last share of the steps."""
    warmup = (step + 1) / args.warmup
    decay = (args.max_steps - step) / max(args.decay * args.max_steps, 1e-9)
    return args.lr * min(1.0, warmup, decay)


@torch.no_grad()
def ema_update(ema_model, model, step, decay):
    """ema <- d ema + (1 - d) model, with the warmup d = min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - d)


# -----------------------------------------------------------------------------
# one training run: plain python (CPU or one GPU) or torchrun (DDP: NCCL on GPUs, gloo on CPUs)


class Ranks:
    """The process group of a run and its stop requests: one process under plain python, or torchrun's (DDP: NCCL
    on GPUs, gloo on CPUs); this rank's device; the one way to stop every rank."""

    def __init__(self, script, device, out_dir):
        self.script, self.out_dir = script, out_dir
        self.ckpt_path = os.path.join(out_dir, "ckpt.pt")
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank, self.world = 0, 1
        self.device = default_device(device)
        if self.ddp:
            cuda = torch.cuda.is_available()
            self.device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"
            if (
                cuda
            ):  # NCCL bound to this rank's GPU from the start, not guessed at the first collective
                torch.cuda.set_device(self.device)
            device_id = torch.device(self.device) if cuda else None
            dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device_id)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            # the stop agreement's own group, on the host: a flag reduced every step without a device sync
            self.stop_group = dist.new_group(backend="gloo")
        self.master = self.rank == 0
        self.signals = []  # the names of the stop signals caught
        self.saved_step = (
            None  # the step of ckpt_path's checkpoint (None: none written or resumed yet)
        )
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame):
        """A stop request (SIGTERM, SIGUSR1, Ctrl-C), honoured after a step (stop_agreed); a second Ctrl-C stops
        at once, leaving the last checkpoint whole and no temporary file."""
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in self.signals:
            for tmp in glob.glob(os.path.join(self.out_dir, "*.tmp")) if self.master else []:
                os.remove(tmp)
            if self.master:
                line = f"stopped at once by a second Ctrl-C; {self.ckpt_path} holds the last checkpoint"
                print(f"{self.script}: {line}", file=sys.stderr, flush=True)
            os._exit(130)
        self.signals.append(name)

    def stop_agreed(self):
        """Whether every rank stops after this step: alone, after the step a request arrived in; under torchrun
        after the same step, once a request reached any rank (MAX over a one-element host tensor on the gloo
        stop group: no device sync, about a millisecond a step)."""
        if not self.ddp:
            return bool(self.signals)
        flag = torch.tensor([1 if self.signals else 0], dtype=torch.uint8)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stop_group)
        return bool(flag[0])

    def fail(self, message):
        """Stop every rank with one line from rank 0."""
        if self.ddp:
            dist.destroy_process_group()
        fail(self.script, message)

    @contextmanager
    def exit_at_out_of_memory(self, stage, advice):
        """Ends the run at a torch.OutOfMemoryError in `stage` (what was running) with one line from the rank
        that hit it, at once (os._exit: no collective is left waiting in a cleanup); torchrun then stops the
        other ranks, and ckpt.pt keeps the last checkpoint (no step writes inside)."""
        try:
            yield
        except torch.OutOfMemoryError:
            where = f"rank {self.rank} ran out of memory in {stage}"
            kept = f"{self.ckpt_path} keeps the checkpoint of step {self.saved_step}"
            if self.saved_step is None:
                kept = f"no checkpoint was written yet ({self.ckpt_path})"
            print(f"{self.script}: error: {where}, {advice}; {kept}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)

    def finish(self):
        """Every rank leaves together; exit code 130 after a Ctrl-C, as a shell reports one (so that
        `train && distill` stops there), 0 otherwise."""
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()
        if self.signals and self.signals[0] == "SIGINT":
            raise SystemExit(130)


class Log:
    """The log of a run: a line printed on rank 0 and appended to out_dir/log.txt, its metrics sent to --wandb."""

    def __init__(self, args, ranks):
        self.path = os.path.join(args.out_dir, "log.txt")
        self.master = ranks.master
        self.wandb = None
        if args.wandb and self.master:
            try:
                import wandb
            except ImportError:
                ranks.fail("--wandb needs the wandb package: pip install wandb")
            name = os.path.basename(os.path.abspath(args.out_dir))
            config = dict(project=args.wandb, name=name, config=vars(args), dir=args.out_dir)
            self.wandb = wandb.init(**config, id=self.resumed_id(args, ranks), resume="allow")

    @staticmethod
    def resumed_id(args, ranks):
        """The W&B run id the checkpoint to resume names (None: a new run); its tensors stay on disk (mmap)."""
        if not (args.resume and os.path.exists(ranks.ckpt_path)):
            return None
        try:
            return load_checkpoint(ranks.ckpt_path).get("wandb_id")
        except CheckpointError as e:
            ranks.fail(e)

    def __call__(self, line, **metrics):
        if self.master:
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")
            if self.wandb and metrics:
                self.wandb.log(metrics, step=metrics.pop("step"))

    def finish(self):
        if self.wandb:
            self.wandb.finish()


class Run(Ranks):
    """A training run around its loop: its ranks (Ranks), its log (Log), autocast and accumulation, the data,
    evaluation over ranks, and the end of every step: the finite check, the log line, the stop agreement and
    the checkpoint (checkpoint_with names what it holds)."""

    def __init__(self, args, script):
        super().__init__(script, args.device, args.out_dir)
        self.args = args
        self.autocast, args.dtype = autocast_for(self.device, args.dtype)
        # TF32 for the transformer's fp32 matmuls; the noise's covariance stays full fp32 (flow.ieee_fp32)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        if args.batch_size % (args.micro_batch * self.world):
            per = f"--micro-batch {args.micro_batch} x world {self.world}"
            self.fail(f"--batch-size {args.batch_size} must be a multiple of {per}")
        self.accum = args.batch_size // (args.micro_batch * self.world)
        # the first step with a non-finite loss or gradient, read only when logging (no host sync a step)
        self.first_bad = torch.tensor(-1, device=self.device)
        self.steps_run = 0  # steps begun in this process (Run.no_wait)
        self.clock = time.time()  # since the last log line or validation
        self.log = Log(args, self)

    def setup(self, model_line):
        """The output folder, and the model line and batch arithmetic, once, on rank 0."""
        args = self.args
        if self.master:
            try:
                os.makedirs(args.out_dir, exist_ok=True)
            except OSError as e:
                self.fail(f"cannot create --out-dir {args.out_dir}: {e.strerror}")
            print(model_line)
            batch = f"micro {args.micro_batch} x world {self.world} x accumulation {self.accum}"
            tokens = f"{args.batch_size * args.seq_len:,} tokens per step, {args.max_steps:,} steps"
            how = f"{args.dtype}{', compiled' if args.compile else ''}, on {self.device}"
            print(f"global batch {args.batch_size} = {batch}; {tokens}, {how}")

    def wrap(self, raw_model):
        """The module the loop trains: DDP under torchrun, then compiled if asked (dynamo then splits the graph at
        DDP's buckets, so the gradient all-reduce overlaps the backward)."""
        model = raw_model
        if self.ddp:
            cuda = self.device.startswith("cuda")
            model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if cuda else None)
        return torch.compile(model) if self.args.compile else model

    def resume(self, kind, raw_model, ema_model, optimizer):
        """Load out_dir/ckpt.pt into the model, EMA and optimizer; returns it (its step is the start)."""
        try:
            ckpt = load_checkpoint(self.ckpt_path, kind=kind)
        except CheckpointError as e:
            self.fail(e)
        ours = asdict(raw_model.config)
        if asdict(DiTConfig(**ckpt["model_config"])) != ours:
            self.fail(f"{self.ckpt_path} has model {ckpt['model_config']}, these flags give {ours}")
        raw_model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        self.saved_step = ckpt["step"]
        return ckpt

    def open_data(self, path):
        """The prepared data folder, checked to hold windows of --seq-len in both splits."""
        try:
            data = Data(path)
        except DataError as e:
            self.fail(e)
        L = self.args.seq_len
        longest = data.max_seq_len()
        if L > longest:
            both = f"the longest window that both splits of {data.dir} hold"
            self.fail(f"argument --seq-len: got {L}, expected at most {longest}, {both}")
        return data

    def given(self, keys):
        """The rows' given positions (a prompt or spans) under --cond-frac, from their keys; None when off."""
        if not self.args.cond_frac:
            return None
        return given_mask(keys.to(self.device), self.args.seq_len, self.args.cond_frac)

    def slots(self, micro):
        """The global-batch slots of this rank's micro-step: (micro * world + rank) * micro_batch onwards."""
        first = (micro * self.world + self.rank) * self.args.micro_batch
        return torch.arange(first, first + self.args.micro_batch)

    def to_device(self, x):
        return to_device(x, self.device)

    @torch.no_grad()
    def evaluate(self, net, data, loss_of):
        """Mean of loss_of(net, tokens, slots) over the fixed validation windows, each rank taking its share."""
        args = self.args
        was_training = net.training
        net.eval()
        share = -(-args.eval_windows // self.world)
        first, last = self.rank * share, min((self.rank + 1) * share, args.eval_windows)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        n, L = args.eval_windows, args.seq_len
        batches = data.eval_batches("val", L, n, args.micro_batch, self.device, first, last)
        for slots, tokens in batches:
            with self.autocast, self.out_of_memory("validation"):
                total += loss_of(net, tokens, slots).double() * len(slots)
        if self.ddp:
            dist.all_reduce(total)
        net.train(was_training)
        return total.item() / args.eval_windows

    def check_finite(self, *models):
        """Stop every rank at a non-finite loss, gradient or weight seen on any rank (reduced over ranks first,
        so that no rank waits at a collective); the last good checkpoint stays."""
        first_bad = self.first_bad.clone()
        if self.ddp:
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        if int(first_bad) >= 0:
            kept = f"{self.ckpt_path} keeps the last good checkpoint (try a lower --lr)"
            self.fail(f"non-finite loss or gradient at step {int(first_bad)}; {kept}")
        if not all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters()):
            self.fail(f"non-finite weights: {self.ckpt_path} keeps the last good checkpoint")

    def checkpoint_with(self, models, optimizer, flops_per_token, **stage):
        """What save writes, named once: models = (raw_model, ema_model), the optimizer and the stage's entries
        (kind, data, ...); and the stage's FLOPs per token, for the log line's MFU."""
        self.models, self.optimizer, self.stage = models, optimizer, stage
        self.flops_per_token = flops_per_token

    def save(self, step, val=None):
        """Rank 0 writes the checkpoint of `step` (steps done), atomically, once every rank has found the models
        finite: checkpoint_with's entries, the flags and the validation loss val; with --keep-every also a copy
        ckpt-STEP.pt (autoguidance's weak model)."""
        raw_model, ema_model = self.models
        self.check_finite(raw_model, ema_model)
        if not self.master:
            self.saved_step = step  # rank 0 writes it, or stops every rank
            return
        args = self.args
        ckpt = dict(self.stage, step=step, args=vars(args), val_loss=val)
        ckpt.update(model_config=asdict(raw_model.config))
        ckpt.update(model=raw_model.state_dict(), ema=ema_model.state_dict())
        ckpt.update(
            optimizer=self.optimizer.state_dict(), wandb_id=self.log.wandb and self.log.wandb.id
        )
        try:
            save_checkpoint(self.ckpt_path, ckpt)
            if args.keep_every and step % args.keep_every == 0 and step < args.max_steps:
                kept = os.path.join(args.out_dir, f"ckpt-{step}.pt")
                atomic_write(kept, lambda tmp: shutil.copyfile(self.ckpt_path, tmp))
        except DataError as e:
            self.fail(f"{e}; the previous checkpoint is kept as it was")
        self.saved_step = step

    def validated(self, step, start_step, line, **metrics):
        """The validation line of `step`, then its checkpoint (after the start), the EMA's loss recorded in it."""
        self.log(line, step=step, **metrics)
        if step > start_step:
            self.save(step, metrics["ema_val_loss"])
        self.clock = time.time()

    def end_step(self, step, loss_sum, grad_norm, lr):
        """The end of step `step` (steps done): the finite check's flag (no host sync), the log line at the log
        steps (their one sync), and the stop agreement; True when the run stops here, the step checkpointed."""
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        if step % self.args.log_every == 0:
            dt, self.clock = (time.time() - self.clock) / self.args.log_every, time.time()
            self.log_step(step, loss_sum, grad_norm, lr, dt)
        return self.preempted(step)

    def log_step(self, step, loss_sum, grad_norm, lr, dt):
        """The line of a logged step: loss (averaged over ranks), lr, grad norm, time, tokens/s, MFU."""
        self.check_finite()
        if self.ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        tokens = self.args.batch_size * self.args.seq_len
        loss, grad, ms = loss_sum.item() / self.accum, grad_norm.item(), dt * 1000
        metrics = dict(loss=loss, lr=lr, grad_norm=grad, ms_per_step=ms, tokens_per_s=tokens / dt)
        line = f"step {step} | loss {loss:.4f} | lr {lr:.2e} | grad {grad:.3f} | {ms:.0f} ms | "
        line += f"{tokens / dt:,.0f} tok/s"
        peak = peak_flops(self.device, self.args.dtype)
        if peak:
            metrics["mfu"] = self.flops_per_token * tokens / dt / peak / self.world
            line += f" | mfu {metrics['mfu']:.1%}"
        self.log(line, step=step, **metrics)

    def preempted(self, step):
        """True after a stop request that the ranks agree on (Ranks.stop_agreed, after every step), once the step
        is checkpointed."""
        if not self.stop_agreed():
            return False
        self.save(step)
        by = self.signals[0] if self.signals else "a signal on another rank"
        where = f"{self.ckpt_path} holds this step; continue with --resume"
        self.log(f"step {step} | stopped by {by}: {where}")
        return True

    @contextmanager
    def no_wait(self, models, optimizer):
        """The body of a training step, in which nothing makes the host wait for the device (the log steps, after
        it, hold the one sync): with FLM_SYNC_CHECK=1 on CUDA, any operation that would is an error
        (torch.cuda.set_sync_debug_mode), from the second step on (the first compiles). The tests run the step
        under a stricter mode of their own (test_scripts.NoWait), on the CPU; models and optimizer are what lives
        on the device."""
        self.steps_run += 1
        check = os.environ.get("FLM_SYNC_CHECK") == "1" and self.steps_run > 1
        check = check and self.device.startswith("cuda")
        if check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if check:
                torch.cuda.set_sync_debug_mode("default")

    def out_of_memory(self, stage):
        """A context that ends the run at out of memory in `stage`, with what to lower (Ranks.out_of_memory)."""
        a = self.args
        batch = f"--micro-batch {a.micro_batch} sequences of {a.seq_len} tokens"
        lower = "lower --micro-batch (--batch-size stays, with more accumulation) or --seq-len"
        return self.exit_at_out_of_memory(stage, f"{batch}: {lower}")

    def finish(self):
        """Every rank leaves together, after rank 0's last checkpoint (Ranks.finish)."""
        self.log.finish()
        super().finish()
