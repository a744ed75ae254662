"""
Stage 1: train a flow language model (FLM), the denoiser D(x_t, tau) of FLM.md 2, with cross-entropy.

    python train_flm.py                                        # CPU quick start on the Penn Treebank
    torchrun --standalone --nproc_per_node=8 train_flm.py --preset owt --compile

Runs unchanged under plain python (CPU or one GPU) and under torchrun (DDP; NCCL on GPUs, gloo on CPUs), and
trains on the same global batches whatever the number of ranks and --micro-batch (trainer.py).
"""

import argparse
import copy
import math

import torch

from data import Data, DataError
from model import MODEL_PRESETS, DiT, DiTConfig, TimeWarp, flm_loss, slot_keys, step_generator, stratified_tau
from trainer import Trainer, add_run_args, apply_presets, usage_error

# -----------------------------------------------------------------------------
# settings: a preset fills every flag that the command line leaves unset

RUN_PRESETS = {
    # the embedded corpus on a laptop CPU: about 7 minutes on 2 cores; the lr falls to 0 over the last 30% of steps,
    # and a short EMA follows it (a long one averages in the weights of before the decay)
    "ptb": dict(data="data/ptb", model="ptb", batch_size=32, micro_batch=32, seq_len=32, lr=2e-3, warmup=100,
                decay=0.3, max_steps=1300, ema=0.99, eval_every=100, eval_windows=128, keep_every=500,
                cond_frac=0.2),
    # the paper's settings (FLM.md 10): AdamW 3e-4, warmup 2,500 then constant, batch 512, EMA 0.9999, 1M steps
    "lm1b": dict(data="data/lm1b", model="small", batch_size=512, micro_batch=64, seq_len=128, lr=3e-4, warmup=2500,
                 decay=0.0, max_steps=1_000_000, ema=0.9999, eval_every=10_000, eval_windows=2048, cond_frac=0.0),
    "owt": dict(data="data/openwebtext", model="small", batch_size=512, micro_batch=16, seq_len=1024, lr=3e-4,
                warmup=2500, decay=0.0, max_steps=1_000_000, ema=0.9999, eval_every=10_000, eval_windows=512,
                cond_frac=0.0),
}
# the longer CPU recipe (with distill.py --preset ptb-long, about 40 minutes on 2 cores): sequences of 64 tokens
# and the constant lr and long EMA that made its table (results-long.md)
RUN_PRESETS["ptb-long"] = dict(RUN_PRESETS["ptb"], seq_len=64, max_steps=1000, keep_every=500, decay=0.0, ema=0.999)

parser = argparse.ArgumentParser(description="Train an FLM denoiser (stage 1).")
parser.add_argument("--preset", default="ptb", choices=list(RUN_PRESETS), help="run settings to start from")
parser.add_argument("--data", help="prepared data folder (python data.py)")
parser.add_argument("--model", choices=list(MODEL_PRESETS), help="model shape preset (model.py)")
parser.add_argument("--dropout", type=float, default=None, help="override the model preset's dropout")
parser.add_argument("--seq-len", type=int, help="tokens per sequence (windows of the token stream)")
add_run_args(parser)
args = apply_presets(parser.parse_args(), RUN_PRESETS, "flm", "train_flm.py")
run = Trainer(args, "train_flm.py")  # DDP, device, precision, batch arithmetic
device = run.device

# -----------------------------------------------------------------------------
# data, model, optimizer, resume

try:
    data = Data(args.data)
except DataError as e:
    run.fail(e)
if args.seq_len > data.max_seq_len():
    usage_error("train_flm.py", f"argument --seq-len: got {args.seq_len}, expected at most {data.max_seq_len()}, "
                f"the longest window that both splits of {args.data} hold")
cfg = DiTConfig(vocab_size=data.vocab_size, **MODEL_PRESETS[args.model])
if args.dropout is not None:
    cfg.dropout = args.dropout
torch.manual_seed(args.seed)  # identical initial weights on every rank
raw_model = DiT(cfg).to(device)
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
warp = TimeWarp(cfg.vocab_size)
start_step = 0
if args.resume:
    ckpt = run.resume("flm", raw_model, ema_model, optimizer)
    if ckpt["data"]["vocab"] != data.vocab:
        run.fail(f"{run.ckpt_path} was trained on data with another vocabulary than {args.data}")
    start_step = ckpt["step"]
    del ckpt
model = run.wrap(raw_model)
run.print_setup(f"model {args.model}: {raw_model.num_params():,} parameters, V = {cfg.vocab_size:,}, "
                f"ln V = {math.log(cfg.vocab_size):.4f}")

# -----------------------------------------------------------------------------
# the loss of a micro-batch, validation, checkpoint contents


def micro_loss(model, step, slots):
    """FLM.md 2: cross-entropy of the denoiser at stratified tau; slot i's window, noise and dropout come from
    its key (seed, step, i) and its tau from the step's one stratified draw, so no rank draws its own."""
    keys = slot_keys(args.seed, step, slots)
    tokens = data.get_batch("train", args.seq_len, keys, device)
    tau = stratified_tau(args.batch_size, step_generator(args.seed, step))[slots]
    return flm_loss(model, tokens, tau.to(device), warp, keys, given=run.given(keys))


def evaluate(net):
    """Validation cross-entropy on fixed windows at fixed, evenly spread tau with fixed noise."""
    def loss_of(net, tokens, slots):
        tau, keys = (slots.double() + 0.5) / args.eval_windows, slot_keys(0, -1, slots)
        return flm_loss(net, tokens, tau.float().to(device), warp, keys, given=run.given(keys))
    return run.evaluate(net, data, loss_of)


def checkpoint():
    return dict(kind="flm", data=dict(dir=args.data, vocab_size=data.vocab_size, vocab=data.vocab,
                                      source=data.meta["source"]))


# -----------------------------------------------------------------------------
# training loop (trainer.py): lr -> eval and checkpoint -> micro-steps -> clip -> step -> EMA -> log

run.fit(model, ema_model, optimizer, micro_loss, evaluate, checkpoint, start_step,
        flops_per_token=raw_model.flops_per_token(args.seq_len))
