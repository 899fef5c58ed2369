"""Text side of zero-shot segmentation: templates, synonyms, background words, cached class embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshot.text import (
    BACKGROUND_WORDS,
    SINGLE_TEMPLATES,
    TextEncoder,
    background_words,
    get_templates,
    parse_class,
    parse_classes,
    readable_name,
)


@pytest.fixture
def encoder(tiny_clip) -> TextEncoder:
    import open_clip

    from fewshot.backbones.weights import create_open_clip_model

    torch.manual_seed(0)
    model = create_open_clip_model(tiny_clip, "none")
    return TextEncoder(model, open_clip.get_tokenizer(tiny_clip), f"{tiny_clip}|none")


def test_templates():
    imagenet = get_templates("imagenet")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert all("{}" in t for t in imagenet)
    assert get_templates(None) == imagenet
    assert get_templates("single") == SINGLE_TEMPLATES == ("a photo of a {}.",)
    assert get_templates(["a {} here."]) == ("a {} here.",)
    with pytest.raises(KeyError, match="imagenet"):
        get_templates("coco")
    with pytest.raises(ValueError, match="holding"):
        get_templates(["no placeholder"])


def test_parse_classes():
    assert parse_class("sofa, couch ,") == ("sofa", "couch")
    assert parse_class(["tv", "monitor", "tv"]) == ("tv", "monitor")
    assert parse_classes(["cat", "sofa,couch", ["a", "b"]]) == [("cat",), ("sofa", "couch"), ("a", "b")]
    with pytest.raises(ValueError, match="non-empty list"):
        parse_classes([])
    with pytest.raises(ValueError, match="non-empty list"):
        parse_classes("cat")  # a bare string would be read letter by letter
    with pytest.raises(ValueError, match="no name"):
        parse_classes(["cat", " , "])
    with pytest.raises(ValueError, match="'dog' in classes 1, 3"):  # both would score alike: refused, not guessed
        parse_classes(["dog", "cat", "Dog,puppy"])


def test_readable_names_and_background_words():
    assert readable_name("pottedplant") == "potted plant"
    assert readable_name("zebra") == "zebra"
    words = background_words([("sky",), ("cat", "tree")])
    assert "sky" not in words and "tree" not in words and "background" in words
    assert len(words) == len(BACKGROUND_WORDS) - 2


def test_encode_averages_templates_and_renormalises(encoder):
    templates = ["a photo of a {}.", "a drawing of a {}."]
    got = encoder.encode_names(["cat", "dog"], templates)
    assert got.shape == (2, 32) and torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        tokens = encoder.tokenizer([t.format(c) for c in ["cat", "dog"] for t in templates])
        each = F.normalize(encoder.model.encode_text(tokens), dim=-1).view(2, 2, -1)
    assert torch.allclose(got, F.normalize(each.mean(1), dim=-1), atol=1e-5)


def test_cache_hits_on_second_call(encoder):
    calls = []
    original = encoder.model.encode_text
    encoder.model.encode_text = lambda *a, **k: calls.append(1) or original(*a, **k)
    first = encoder.encode(["cat", "sofa,couch"], "single")
    n = len(calls)
    second = encoder.encode(["cat", ["sofa", "couch"]], "single")
    assert n > 0 and len(calls) == n, "the second call must not run the text tower"
    assert (encoder.hits, encoder.misses) == (1, 1)
    assert torch.equal(first.embeddings, second.embeddings)
    first.embeddings.zero_()  # a caller's copy: the cache is unaffected
    assert torch.equal(encoder.encode(["cat", "sofa,couch"], "single").embeddings, second.embeddings)
    encoder.encode(["cat", "sofa,couch"], "imagenet")  # other templates: a new entry
    assert encoder.misses == 2 and len(calls) > n


def test_synonym_rows_and_max_reduction(encoder):
    emb = encoder.encode(["cat", "sofa,couch"], "single")
    assert emb.embeddings.shape == (3, 32) and emb.owner.tolist() == [0, 1, 1] and len(emb) == 2
    single = encoder.encode_names(["sofa", "couch"], "single")
    assert torch.allclose(emb.embeddings[1:], single, atol=1e-6)
    scores = torch.tensor([[1.0, 0.2, 0.7], [0.0, 0.9, -1.0]])[:, :, None]  # (B=2, M=3, 1)
    reduced = emb.reduce(scores)
    assert torch.allclose(reduced[:, :, 0], torch.tensor([[1.0, 0.7], [0.0, 0.9]]))


def test_empty_names_are_an_error(encoder):
    with pytest.raises(ValueError, match="non-empty"):
        encoder.encode_names([])
    with pytest.raises(ValueError, match="non-empty"):
        encoder.encode([])
