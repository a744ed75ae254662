"""
Checkpoints: ours, one flat dict of plain types read with torch.load(weights_only=True); and the authors' released
models (a Hugging Face repo id or folder with config.json + model.safetensors, or a Lightning .ckpt), converted to
ours through one key map, like nanoGPT's from_pretrained. Reading a pickled .ckpt never runs code from it: a
restricted unpickler admits tensors and plain containers and turns every other class into inert data.
"""

import collections
import json
import os
import pickle
import sys
import types
from dataclasses import asdict

import torch

from common import DataError, atomic_write, first_line, out_path, parser_for, write_text
from model import DiT, DiTConfig

CKPT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, of another format version, or of the wrong kind."""


def save_checkpoint(path, ckpt):
    """torch.save under a temporary name, then rename: a crash never leaves a half-written file at path."""
    atomic_write(path, lambda tmp: torch.save(dict(ckpt, format_version=CKPT_VERSION), tmp))


def load_checkpoint(path, kind=None, logit_cap=None):
    """Ours (train_flm.py, distill.py) or the authors' (a Hugging Face repo id, a folder, a Lightning .ckpt),
    validated; kind ('flm' or 'fmlm') is checked if given; logit_cap overrides the model's output cap."""
    exists = os.path.exists(path)
    if os.path.isdir(path) or path.endswith(".ckpt") or (not exists and _is_hub_id(path)):
        ckpt = load_authors_checkpoint(path)
    elif not exists:
        raise CheckpointError(f"checkpoint {path} does not exist")
    else:
        ckpt = _torch_load(path, weights_only=True, mmap=True)  # read from disk only where used
    version = ckpt.get("format_version") if isinstance(ckpt, dict) else None
    if version != CKPT_VERSION:
        msg = f"{path} has checkpoint format version {version}; this code reads {CKPT_VERSION}"
        raise CheckpointError(msg)
    if kind is not None and ckpt["kind"] != kind:
        what = {"flm": "an FLM denoiser (train_flm.py)", "fmlm": "a flow-map model (distill.py)"}
        raise CheckpointError(f"{path} holds {what[ckpt['kind']]}, but {what[kind]} is needed here")
    if logit_cap is not None:
        ckpt["model_config"]["logit_cap"] = logit_cap
    return ckpt


def _torch_load(path, **kwargs):
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except Exception as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        msg = f"{path} is not a readable checkpoint (corrupt or not a torch file): {why}"
        raise CheckpointError(msg) from None


def model_from_checkpoint(ckpt, ema=True):
    """The DiT of a checkpoint, with its EMA weights unless ema=False."""
    model = DiT(DiTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"] if ema else ckpt["model"])
    return model


# -----------------------------------------------------------------------------
# the authors' released models (METHOD.md 9): Hugging Face david3684/{FLM,FMLM}-B-{OWT,LM1B} (config.json +
# model.safetensors, EMA weights), and Lightning .ckpt files (raw weights in state_dict, EMA in ema.shadow_params)

AUTHORS_LOGIT_CAP = 30.0  # their code caps output logits at 30
AUTHORS_KEYS = [
    ("vocab_embed.embedding", "embed"),
    ("sigma_map_prime.", "t2_embedder."),
    ("sigma_map.", "t_embedder."),
    ("output_layer.", "final_layer."),
]
AUTHORS_DROPPED = ("rotary_emb.inv_freq", "learnable_loss_weighting.", "teacher")


def _is_hub_id(path):
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.endswith((".pt", ".ckpt", ".json"))


def authors_key(name):
    """Our parameter name for one of the authors', or None for what we drop."""
    name = name.replace("._orig_mod.", ".").removeprefix("_orig_mod.").removeprefix("backbone.")
    if name.startswith(AUTHORS_DROPPED):
        return None
    for theirs, ours in AUTHORS_KEYS:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    return name


class _Inert:
    """Any class a pickle names that is not a tensor or a plain container (an OmegaConf config, a tokenizer,
    os.system alike): it keeps the call's arguments and state as data and runs nothing."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)


class _SafeUnpickler(pickle.Unpickler):
    """Admits tensors, storages, dtypes and plain containers; every other class becomes an inert _Inert."""

    SAFE = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    }

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return self.SAFE[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Inert,), {"source": f"{module}.{name}"})


def _plain(obj):
    """Plain Python data from an inert OmegaConf config (its _content, its nodes' _val)."""
    if isinstance(obj, _Inert):
        state = getattr(obj, "state", None)
        if isinstance(state, dict) and ("_content" in state or "_val" in state):
            return _plain(state.get("_content", state.get("_val")))
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def _read_lightning(path):
    """(raw, ema, hydra config, step) of a Lightning .ckpt, read with the restricted unpickler."""
    restricted = types.SimpleNamespace(Unpickler=_SafeUnpickler, __name__="flm_safe_pickle")
    # torch.load hands storages to its own loader and every class lookup to _SafeUnpickler.find_class
    ckpt = _torch_load(path, pickle_module=restricted, weights_only=False)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        msg = f"{path} is not a Lightning checkpoint of the authors' code (no state_dict)"
        raise CheckpointError(msg)
    state = ckpt["state_dict"]
    raw = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    names = [k for k in raw if not k.endswith("rotary_emb.inv_freq")]  # the parameters, in order
    shadow = (ckpt.get("ema") or {}).get("shadow_params")
    if not isinstance(shadow, list) or len(shadow) != len(names):
        found = len(shadow) if isinstance(shadow, list) else "none"
        should = f"ema['shadow_params'] should list the {len(names)} backbone parameters"
        raise CheckpointError(f"{path}: {should}, found {found}")
    config = _plain((ckpt.get("hyper_parameters") or {}).get("config")) or {}
    return raw, dict(zip(names, shadow)), config, int(ckpt.get("global_step", 0))


def _download(repo_id):
    """The local folder of a Hugging Face repo id (huggingface_hub, optional; HF_HUB_OFFLINE=1: the cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        hint = "to download it from the Hugging Face hub: pip install huggingface_hub"
        raise CheckpointError(f"{repo_id} is neither a file nor a folder; {hint}") from None
    try:
        return snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.ckpt"])
    except Exception as e:
        msg = f"{repo_id}: not found locally nor on the Hugging Face hub ({first_line(e)})"
        raise CheckpointError(msg) from None


def _read_hub_folder(path):
    """(weights, hydra config) of a folder in the authors' Hugging Face layout. config.json is
    {"config": hydra config, "vocab_size": V} or, as huggingface_hub's save_pretrained writes it, the hydra
    config itself with vocab_size beside it; our exports carry their metadata under "flm"."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        msg = f"{path}/model.safetensors needs safetensors: pip install safetensors"
        raise CheckpointError(msg) from None
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        weights = load_file(os.path.join(path, "model.safetensors"))
    except Exception as e:
        msg = f"{path}: unreadable config.json or model.safetensors ({first_line(e)})"
        raise CheckpointError(msg) from None
    hydra = config.get("config") if isinstance(config.get("config"), dict) else config
    return weights, dict(hydra, vocab_size=config.get("vocab_size"), flm=config.get("flm"))


def _authors_files(path):
    """("hub", folder) or ("ckpt", file) of an authors' model given as a .ckpt, a folder or a repo id."""
    if path.endswith(".ckpt"):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        return "ckpt", path
    folder = path if os.path.isdir(path) else _download(path)
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "model.safetensors")):
        return "hub", folder
    ckpts = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt"))
    if len(ckpts) == 1:
        return "ckpt", os.path.join(folder, ckpts[0])
    found = f"the .ckpt files {', '.join(ckpts)}: name one" if ckpts else "neither"
    expected = "config.json + model.safetensors (an authors' Hugging Face repo) or one .ckpt"
    raise CheckpointError(f"{path} holds {found}; expected {expected}")


def _authors_config(path, weights, model_cfg):
    """Our DiTConfig of an authors' model: the sizes from config.model, else from the weight shapes; the head
    count cannot be read off the weights, so without it the authors' head size 64 is taken."""
    if "embed" not in weights or "t_embedder.mlp.0.weight" not in weights:
        raise CheckpointError(f"{path}: its weights lack vocab_embed.embedding or sigma_map")
    V, D = weights["embed"].shape
    n_head = model_cfg.get("n_heads")
    if n_head is None:
        n_head = max(1, D // 64)
        note = f"{path} names no head count; taking the authors' head size 64: {n_head} heads"
        print(f"note: {note}", file=sys.stderr)
    n_layer = model_cfg.get("n_blocks", len({k.split(".")[1] for k in weights if "blocks." in k}))
    cond_dim = model_cfg.get("cond_dim", weights["t_embedder.mlp.0.weight"].shape[0])
    cfg = DiTConfig(V, int(n_layer), int(n_head), D, int(cond_dim), logit_cap=AUTHORS_LOGIT_CAP)
    cfg.dropout = float(model_cfg.get("dropout", 0.1))
    cfg.two_time = "t2_embedder.mlp.0.weight" in weights
    cfg.time_warp = "authors"
    return cfg


def load_authors_checkpoint(path):
    """One of the authors' models as a checkpoint of ours (kind, model_config, model, ema, tokenizer)."""
    layout, where = _authors_files(path)
    if layout == "ckpt":
        raw, ema, config, step = _read_lightning(where)
    else:
        ema, config = _read_hub_folder(where)
        raw, step = ema, 0
    raw, ema = ({authors_key(k): v for k, v in d.items() if authors_key(k)} for d in (raw, ema))
    if isinstance(config.get("flm"), dict):  # one of ours, exported by export_hf
        return _ours_from_export(path, ema, config["flm"])
    model_cfg = config.get("model") or {}
    cfg = _authors_config(path, ema, model_cfg)
    expected = DiT(cfg).state_dict()
    for weights in (raw, ema):
        for key in sorted(set(expected) | set(weights)):
            missing = key not in weights or key not in expected
            if missing or weights[key].shape != expected[key].shape:
                got = tuple(weights[key].shape) if key in weights else "missing"
                want = tuple(expected[key].shape) if key in expected else "no such parameter"
                msg = f"{path}: weight {key} is {got}, the config {model_cfg} needs {want}"
                raise CheckpointError(msg)
    tokenizer = (config.get("data") or {}).get("tokenizer_name_or_path") or "gpt2"
    seq_len = int(model_cfg.get("length") or (128 if "bert" in tokenizer else 1024))
    data = dict(dir=None, vocab_size=cfg.vocab_size, vocab=None, tokenizer=tokenizer)
    kind = "fmlm" if cfg.two_time else "flm"
    meta = dict(kind=kind, step=step, args=dict(seq_len=seq_len), source=path, data=data)
    return dict(meta, model=raw, ema=ema, model_config=asdict(cfg), format_version=CKPT_VERSION)


def _ours_from_export(path, ema, meta):
    if meta.get("format_version") != CKPT_VERSION:
        version = meta.get("format_version")
        msg = f"{path} was exported with format version {version}; this code reads {CKPT_VERSION}"
        raise CheckpointError(msg)
    cfg = DiTConfig(**meta["model_config"])
    expected = DiT(cfg).state_dict()
    if set(ema) != set(expected) or any(ema[k].shape != expected[k].shape for k in expected):
        msg = f"{path}: its weights do not match its config.json['flm']['model_config']"
        raise CheckpointError(msg)
    ours = dict(kind=meta["kind"], step=meta.get("step", 0), objective=meta.get("objective"))
    ours.update(args=meta["args"], source=path, data=dict(meta["data"], dir=None))
    return dict(ours, model=ema, ema=ema, model_config=asdict(cfg), format_version=CKPT_VERSION)


# -----------------------------------------------------------------------------
# export: ours in the authors' Hugging Face layout (config.json + model.safetensors, their key names, the EMA
# weights), which their class reads with strict=True; our metadata under config.json["flm"]


def export_hf(ckpt, folder):
    """Write folder/config.json and folder/model.safetensors, each under a temporary name, then renamed."""
    from safetensors.torch import save_file

    cfg, data = ckpt["model_config"], ckpt["data"]
    theirs = {}
    for name, tensor in ckpt["ema"].items():
        for their_prefix, ours_prefix in AUTHORS_KEYS:
            if name.startswith(ours_prefix):
                name = their_prefix + name[len(ours_prefix) :]
                break
        theirs[name] = tensor.detach().cpu().contiguous()
    head = cfg["n_embd"] // cfg["n_head"]  # the rotary buffer, which their class keeps in its state
    theirs["rotary_emb.inv_freq"] = 1.0 / 10_000 ** (torch.arange(0, head, 2).float() / head)
    # what their DIT.__init__ reads: algo.name holding "flm" or "fmlm", and algo.double_temb, make the second
    # time embedder; vocab_size beside the hydra config, as huggingface_hub's save_pretrained writes it
    two = bool(cfg["two_time"])
    tokenizer = data.get("tokenizer", "gpt2")
    algo_name = "fmlm" if two else "flm"
    algo = dict(name=algo_name, double_temb=two, backbone="dit", parameterization="mean")
    algo.update(time_conditioning=True, causal_attention=False, learnable_loss_weighting=False)
    model = dict(hidden_size=cfg["n_embd"], n_blocks=cfg["n_layer"], n_heads=cfg["n_head"])
    model.update(cond_dim=cfg["cond_dim"], dropout=cfg["dropout"], length=ckpt["args"]["seq_len"])
    model.update(name="small", type="ddit", scale_by_sigma=False, tie_word_embeddings=False)
    vocab = dict(vocab=data.get("vocab"), tokenizer=tokenizer, vocab_size=data.get("vocab_size"))
    ours = dict(format_version=CKPT_VERSION, kind=ckpt["kind"], model_config=cfg, step=ckpt["step"])
    ours.update(objective=ckpt.get("objective"), args=ckpt["args"], data=vocab)
    their_data = dict(tokenizer_name_or_path=tokenizer)
    config = dict(algo=algo, model=model, data=their_data, vocab_size=cfg["vocab_size"], flm=ours)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder}: {e.strerror}") from None
    weights = os.path.join(folder, "model.safetensors")
    atomic_write(weights, lambda tmp: save_file(theirs, tmp, metadata=dict(format="pt")))
    write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2))


# -----------------------------------------------------------------------------
# the Python API: load, then flow.generate, then decode


def load(path, device="cpu", ema=True):
    """The model of a checkpoint (ours, an export, or the authors'), in eval mode, with what sampling needs:
    .kind ('flm' or 'fmlm'), .seq_len, .vocab and .tokenizer (for decode)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, ema=ema).to(device).eval()
    model.kind, model.seq_len = ckpt["kind"], ckpt["args"]["seq_len"]
    model.vocab, model.tokenizer = ckpt["data"]["vocab"], ckpt["data"].get("tokenizer", "gpt2")
    return model


def decode(model, tokens):
    """The texts of token rows (B, L) sampled from a model of load()."""
    from data import decode as decode_ids

    return [decode_ids(row, model.vocab, model.tokenizer) for row in tokens.tolist()]


if __name__ == "__main__":
    about = "Export a checkpoint in the authors' Hugging Face layout (EMA weights), for sample.py --ckpt."
    parser = parser_for(about, "checkpoint.py")
    parser.add_argument("ckpt", help="checkpoint of train_flm.py or distill.py")
    parser.add_argument("folder", type=out_path(folder=True), help="output folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload it (hf auth login)")
    args = parser.parse_args()
    try:
        ckpt = load_checkpoint(args.ckpt)
        export_hf(ckpt, args.folder)
    except ImportError:
        parser.error("the export writes safetensors: pip install safetensors")
    except (CheckpointError, DataError) as e:
        parser.error(str(e))
    files = f"{args.folder}/config.json and {args.folder}/model.safetensors"
    print(f"wrote {files} ({ckpt['kind']}, step {ckpt['step']}, EMA weights)")
    if args.push_to_hub:
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(args.push_to_hub, exist_ok=True)
            api.upload_folder(folder_path=args.folder, repo_id=args.push_to_hub)
        except ImportError:
            parser.error("--push-to-hub needs huggingface_hub: pip install huggingface_hub")
        except Exception as e:
            parser.error(f"--push-to-hub {args.push_to_hub}: {first_line(e)}")
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
