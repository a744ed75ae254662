"""
What every script shares and no training needs: flags that check their values, the one way to stop at a bad flag
or file, files written whole (a temporary name, then a rename), and the device. The ground floor: it imports no
module of this repository.
"""

import argparse
import math
import os
import pathlib
import re
import sys

import torch


class DataError(Exception):
    """A file that cannot be read or written as expected (data, a checkpoint, an output), or a bad data request;
    the message names the file and what was expected."""


def first_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def to_device(x, device):
    """A host tensor on the device; from pinned memory without blocking the host on CUDA."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device, non_blocking=True)


def default_device(name=None):
    """--device as given, else cuda when this machine has it, else cpu."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


# -----------------------------------------------------------------------------
# writing files: every file the project writes goes through atomic_write


def atomic_write(path, write):
    """write(tmp), then rename tmp to path, durably: tmp's data reaches the disk before the rename, and the
    rename before the return (the folder fsynced), so that a power loss leaves the old file or the new one,
    never an empty one. On any failure (a full disk, Ctrl-C) tmp is removed and the file at path is left as it
    was; an OSError, or torch.save's RuntimeError, becomes one DataError."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise DataError(f"cannot write {path}: {reason}") from None
        raise


def write_text(path, text):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def writable(path, folder):
    """None if path can be written as a file (folder=False) or created as a folder, else why not."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return f"{path} is a {'file' if folder else 'folder'}; expected a {'folder' if folder else 'file'}"
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f"{above} is a file, so {path} cannot be created"
    return None if os.access(above, os.W_OK) else f"{above} is not writable"


# -----------------------------------------------------------------------------
# flags: a bad value gets one line naming the flag, the value and what was expected, and exit code 2


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
TOP_P = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def device_flag(text):
    """--device: a device this machine has."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"got {text}, expected cpu, cuda or cuda:N")
    if text != "cpu" and int(text[5:] or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise argparse.ArgumentTypeError(f"got {text}, but this machine has {count} CUDA devices")
    return text


def out_path(folder):
    """An argparse type: an output file (folder=False) or folder that can be written (writable), checked
    when the flags are read, before a model loads or a step runs."""

    def parse(text):
        why = writable(text, folder)
        if why:
            raise argparse.ArgumentTypeError(f"got {text}: {why}")
        return text

    return parse


def fail(script, message):
    """The one way a script stops at a bad flag or file: one line on stderr (from rank 0) and exit code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{script}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def parser_for(description, script):
    """An ArgumentParser whose --help shows every default and whose errors are one line (rank 0 only)."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=description, formatter_class=formatter)
    parser.error = lambda message: fail(script, message)
    return parser


def add_sampling_args(parser):
    """The flags of the scripts that load a checkpoint and sample from it (sample.py, eval_ppl.py)."""
    a = parser.add_argument
    a("--logit-cap", type=NONNEG, help="output logit cap (0: none; None: the checkpoint's)")
    a("--reward-form", choices=["endpoint", "lookahead"], default="endpoint", help="guidance form")
    a("--reward-iters", type=COUNT, default=1, help="reward gradient steps per sampler step")
    a("--reward-label", help="classifier rewards: the class, an index or a name (None: 0)")
    a("--device", type=device_flag, help="cpu, cuda, cuda:N (None: cuda if available)")
    a("--dtype", choices=["fp32", "bf16"], help="autocast of the network (None: bf16 on CUDA)")


# dense peak FLOP/s by device name (bf16; fp32 as tf32 matmuls), for MFU: vendors' datasheets, SXM parts
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 181e12),
    "A10G": (70e12, 35e12),
    "4090": (165e12, 82.6e12),
}


def peak_flops(device, dtype):
    """The dense peak FLOP/s of a CUDA device by its name; None when unknown (no MFU)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[dtype == "fp32"] for key, peaks in PEAK_FLOPS.items() if key in name), None)
