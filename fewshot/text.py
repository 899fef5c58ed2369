"""Class embeddings from text for zero-shot segmentation: templates, synonyms, background words and a cache.

A class is one name or several synonyms: `"sofa,couch"` or `["sofa", "couch"]`. Each synonym is put into every
template, the normalised text embeddings are averaged and re-normalised (open_clip `build_zero_shot_classifier`), and
each synonym keeps its own embedding row. The one synonym rule, SCLIP's, NACLIP's and ClearCLIP's: a class's
probability is the maximum over its synonyms' probabilities (`ClassEmbeddings.reduce`), both in the zero-shot
segmenter and in the text-conditioned head. Embeddings are computed once per (model, weights, classes, templates) and
cached by the `TextEncoder` that owns the text tower; `StoredText` hands back a checkpoint's instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SINGLE_TEMPLATES = ("a photo of a {}.",)

# The background class when `zeroshot.background` uses a prompt: the word itself plus the stuff classes SCLIP / NACLIP
# put in their VOC background line (sky, wall, ...). Words that are also one of the user's classes are left out.
BACKGROUND_WORDS = (
    "background", "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor", "hill",
    "rail", "fence",
)  # fmt: skip

# Readable prompts for dataset class names written as one word (PASCAL VOC); other names are used as they are.
READABLE_NAMES = {
    "aeroplane": "aeroplane,airplane",
    "diningtable": "dining table,table",
    "motorbike": "motorbike,motorcycle",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor,television monitor,monitor,television",
}


def _imagenet_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)  # the 80 CLIP prompt templates


# MaskCLIP's release adds five scene templates to CLIP's 80 (tools/maskclip_utils/prompt_engineering.py).
MASKCLIP_SCENE_TEMPLATES = (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)  # fmt: skip

TEMPLATE_SETS: dict[str, Callable[[], tuple[str, ...]]] = {
    "imagenet": _imagenet_templates,
    "maskclip": lambda: _imagenet_templates() + MASKCLIP_SCENE_TEMPLATES,
    "single": lambda: SINGLE_TEMPLATES,
}


def get_templates(templates: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """A template set by name (`imagenet`: CLIP's 80, `maskclip`: those and MaskCLIP's 5 scene templates, `single`:
    "a photo of a {}.") or a list of "{}" strings."""
    if templates is None:
        templates = "imagenet"
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise KeyError(f"unknown template set {templates!r}; choose from {sorted(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[templates]()
    templates = tuple(templates)
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates must be a non-empty list of strings holding '{{}}' for the class name; got {bad}")
    return templates


def parse_class(entry: str | Sequence[str]) -> tuple[str, ...]:
    """One class: "a,b" or ["a", "b"] -> ("a", "b"); blanks are stripped and an empty class is an error."""
    parts = entry.split(",") if isinstance(entry, str) else list(entry)
    synonyms = tuple(dict.fromkeys(str(p).strip() for p in parts if str(p).strip()))  # unique, in order
    if not synonyms:
        raise ValueError(f"class {entry!r} has no name; give a word or comma-separated synonyms such as 'sofa,couch'")
    return synonyms


def parse_classes(classes: Sequence[str | Sequence[str]]) -> list[tuple[str, ...]]:
    """A list of classes (each a name, "a,b" synonyms, or a list of synonyms) -> synonym tuples.

    Empty is an error, and so is a word given to two classes (case-insensitive): both would score the same, so one
    of them could never be predicted while the areas reported for it would be wrong.
    """
    if isinstance(classes, str) or not classes:
        raise ValueError(f"expected a non-empty list of class names, got {classes!r}; e.g. ['cat', 'sofa,couch']")
    parsed = [parse_class(entry) for entry in classes]
    owners: dict[str, list[int]] = {}
    for i, synonyms in enumerate(parsed, start=1):
        for word in {s.lower() for s in synonyms}:
            owners.setdefault(word, []).append(i)
    repeated = {word: where for word, where in owners.items() if len(where) > 1}
    if repeated:
        listed = "; ".join(f"{word!r} in classes {', '.join(map(str, where))}" for word, where in repeated.items())
        raise ValueError(f"classes repeat words: {listed} (1-based); give each class once, synonyms within one class")
    return parsed


def readable_name(name: str) -> str:
    """Prompt text for a dataset class name: 'pottedplant' -> 'potted plant'; other names unchanged."""
    return READABLE_NAMES.get(name.strip().lower(), name)


def background_words(classes: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """BACKGROUND_WORDS without the words that name one of `classes` (asking for 'sky' keeps sky out of background)."""
    taken = {s.lower() for synonyms in classes for s in synonyms}
    return tuple(w for w in BACKGROUND_WORDS if w not in taken) or ("background",)


@dataclass
class ClassEmbeddings:
    """Text embeddings of N classes with synonyms: one row per synonym, `owner` maps each row to its class."""

    embeddings: Tensor  # [M, D], L2-normalised
    owner: Tensor  # [M] long, class index 0..N-1 of each row
    classes: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.classes)

    def reduce(self, scores: Tensor) -> Tensor:
        """Scores per synonym [B, M, ...] -> per class [B, N, ...] (maximum over each class's synonyms; -inf for a
        class without rows)."""
        out = scores.new_full((scores.shape[0], len(self.classes), *scores.shape[2:]), float("-inf"))
        index = self.owner.to(scores.device).view(1, -1, *([1] * (scores.dim() - 2))).expand_as(scores)
        return out.scatter_reduce(1, index, scores, reduce="amax")


class TextEncoder:
    """Encodes class names with an open_clip model's text tower, caching one result per (classes, templates).

    `identity` names the model and its weights ("ViT-B-16|openai"); it is part of every cache key, so two encoders
    over different weights never share entries. `hits` / `misses` count cache use.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, identity: str, classes_per_batch: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.classes_per_batch = classes_per_batch
        self.hits = 0
        self.misses = 0
        self._cache: dict[tuple, Tensor] = {}

    def encode_names(
        self,
        names: Sequence[str],
        templates: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """One embedding per name (no synonym splitting): [N, D], L2-normalised, on the CPU in float32.

        The text tower runs on `device` (it is moved there for the call and back; None: where it is): 80 templates x
        80 classes take minutes on a CPU and well under a second on a GPU.
        """
        names = tuple(str(n) for n in names)
        if not names or any(not n.strip() for n in names):
            raise ValueError(f"expected non-empty class names, got {list(names)!r}")
        templates = get_templates(templates)
        key = (self.identity, names, templates)
        if key in self._cache:
            self.hits += 1
            return self._cache[key].clone()
        self.misses += 1
        from open_clip.zero_shot_classifier import build_zero_shot_classifier

        home = next(self.model.parameters()).device
        device = torch.device(device) if device is not None else home
        try:
            with torch.no_grad():
                weights = build_zero_shot_classifier(  # [D, N]: template mean of normalised embeddings, re-normalised
                    self.model.to(device),
                    self.tokenizer,
                    names,
                    templates,
                    num_classes_per_batch=self.classes_per_batch,
                    device=device,
                )
        finally:
            self.model.to(home)
        embeddings = weights.t().float().cpu().contiguous()
        self._cache[key] = embeddings
        log.debug("encoded %d names x %d templates with %s", len(names), len(templates), self.identity)
        return embeddings.clone()  # callers may change their copy; the cache keeps its own

    def encode(
        self,
        classes: Sequence[str | Sequence[str]],
        templates: str | Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> ClassEmbeddings:
        """Classes with synonyms ("a,b" or lists) -> ClassEmbeddings with one row per synonym, classes in order."""
        parsed = parse_classes(classes)
        flat = [s for synonyms in parsed for s in synonyms]
        return ClassEmbeddings(self.encode_names(flat, templates, device), synonym_owner(parsed), parsed)


def synonym_owner(classes: Sequence[tuple[str, ...]]) -> Tensor:
    """[M] long: the class index of each synonym row, rows in class order."""
    return torch.tensor([i for i, synonyms in enumerate(classes) for _ in synonyms], dtype=torch.long)


class StoredText:
    """A text source that hands back stored class embeddings (a checkpoint's) instead of running a text tower.

    Args:
        embeddings: [M, D], one row per synonym, classes in order, as `TextEncoder.encode` made them.
        owner: [M] long, the class id of each row (what the storing module recorded; checked against the classes).
    """

    def __init__(self, embeddings: Tensor, owner: Tensor):
        self.embeddings, self.owner = embeddings.float(), owner.long()

    @classmethod
    def from_state(cls, state: dict[str, Tensor] | None, prefix: str) -> StoredText | None:
        """The `<prefix>text_embeddings` / `<prefix>text_owner` pair of a state dict, or None when it holds none."""
        keys = (f"{prefix}text_embeddings", f"{prefix}text_owner")
        if not state or not all(k in state for k in keys):
            return None
        return cls(state[keys[0]], state[keys[1]])

    def encode_text(
        self, classes: Sequence[str | Sequence[str]], templates: str | Sequence[str] | None = None
    ) -> ClassEmbeddings:
        """The stored rows for `classes` (templates are what the rows were made with); a different number of
        synonyms is an error: the embeddings were made for other class names."""
        parsed = parse_classes(classes)
        owner = synonym_owner(parsed)
        if len(owner) != len(self.embeddings):
            raise ValueError(
                f"the stored class embeddings have {len(self.embeddings)} rows but {len(parsed)} classes with "
                f"{len(owner)} synonyms were asked for; were they made for another dataset's class names?"
            )
        return ClassEmbeddings(self.embeddings.clone(), owner, parsed)
