"""model.refine=sam: components, prompts, the oracle (IoU 1), rejection, and the model around a feature head."""

from __future__ import annotations

import pytest
import torch

from fewshot.config import load_config
from fewshot.model import build_model
from fewshot.sam.refine import components, largest_component_box, refine_labels, refine_query
from tests.test_gfsam import bfs_components


def test_components_are_8_connected_regions():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        mask = torch.rand(9, 11, generator=g) > 0.6
        labels = components(mask)
        assert ((labels > 0) == mask).all()
        cells = torch.nonzero(mask).tolist()
        n = len(cells)
        adjacency = torch.zeros(n, n)
        for i, (y0, x0) in enumerate(cells):
            for j, (y1, x1) in enumerate(cells):
                adjacency[i, j] = float(max(abs(y0 - y1), abs(x0 - x1)) == 1)
        expected = bfs_components(adjacency)
        found = [int(labels[y, x]) for y, x in cells]
        assert all((expected[i] == expected[j]) == (found[i] == found[j]) for i in range(n) for j in range(n))


def test_largest_component_box():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[1:3, 1:3] = True  # 4 pixels
    mask[5:9, 4:7] = True  # 12 pixels
    mask[0, 9] = True
    assert largest_component_box(mask).tolist() == [4.0, 5.0, 6.0, 8.0]


class ObjectSam:
    """A SAM stand-in: every prompt's 3 masks are the true object under its first (positive) point, or, with
    `wrong`, the object's complement; predicted IoU (0.9, 0.8, 0.7). Low-res logits are at full size."""

    def __init__(self, objects: torch.Tensor, wrong: bool = False):
        self.objects, self.wrong = objects, wrong

    def decode(self, embeddings, size, points, labels, boxes, mask_logits, multimask=True):
        x, y = points[0, 0, 0].long().tolist()
        hit = [o for o in self.objects if o[y, x]]
        mask = hit[0] if hit else torch.zeros(size, dtype=torch.bool)
        mask = ~mask if self.wrong else mask
        logits = (2 * mask.float() - 1).expand(1, 1, 3, *size)
        return logits, torch.tensor([[[0.9, 0.8, 0.7]]])

    def postprocess(self, low_res, size):
        return low_res


def coarse_episode(size: int = 48):
    objects = torch.zeros(2, size, size, dtype=torch.bool)
    objects[0, 5:30, 8:35] = True
    objects[1, 34:46, 30:46] = True
    coarse = torch.zeros(size, size)
    coarse[10:26, 12:30] = 3.0  # the head finds the object's core only
    coarse[36:38, 40:42] = 1.0  # and a speck of the other one
    return objects, torch.stack([torch.zeros_like(coarse), coarse - 0.5])


@pytest.mark.parametrize("select, cascade", [("iou_pred", True), ("agreement", False)])
def test_oracle_sam_makes_the_refined_mask_exact(select, cascade):
    objects, logits = coarse_episode()
    refined = refine_query(ObjectSam(objects), torch.zeros(1), logits, accept_iou=0.3, select=select, cascade=cascade)
    pred = refined.argmax(0).bool()
    assert (pred & objects[0]).sum() / (pred | objects[0]).sum() == 1.0


def test_disagreeing_sam_and_empty_heads_keep_the_head():
    objects, logits = coarse_episode()
    assert torch.equal(refine_query(ObjectSam(objects, wrong=True), torch.zeros(1), logits), logits)
    background = torch.stack([torch.ones(48, 48), torch.zeros(48, 48)])
    assert torch.equal(refine_query(ObjectSam(objects), torch.zeros(1), background), background)


OVERRIDES = [
    "model.refine=sam", "model.backbone.name=timm:vit_tiny_patch16_224", "model.backbone.pretrained=none",
    "model.backbone.layers=[1, 2]", "model.sam.pretrained=none", "model.sam.preset=tiny256",
    "model.sam.image_size=256",
]  # fmt: skip
SAM2 = ["model.sam.name=sam2.1_hiera_t", "model.sam.preset=sam2_tiny128", "model.sam.image_size=128"]


@pytest.mark.parametrize("sam", [[], SAM2], ids=["sam", "sam2"])
def test_refined_model_trains_as_its_head_and_refines_in_eval(sam):
    """The refined model trains as its head alone; in eval, SAM 1 or SAM 2 refines, and a cached pass (the backbone
    maps and SAM's embeddings split apart again) equals the uncached one."""
    from fewshot.provenance import protocol_record

    cfg = load_config(None, [*OVERRIDES, *sam])
    model = build_model(cfg.model)
    plain = build_model(load_config(None, [o for o in OVERRIDES if "refine" not in o and "sam." not in o]).model)
    plain.head.load_state_dict(model.head.state_dict())
    plain.backbone.load_state_dict(model.backbone.main.state_dict())  # random weights: the same ones
    g = torch.Generator().manual_seed(0)
    query = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    supports = torch.randint(0, 256, (2, 1, 3, 64, 64), dtype=torch.uint8, generator=g)
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    masks[..., 10:40, 20:50] = 1
    model.train(), plain.train()
    assert torch.allclose(model(query, supports, masks), plain(query, supports, masks), atol=1e-6)
    model.eval()
    with torch.inference_mode():
        refined = model(query, supports, masks)
    assert refined.shape == (2, 2, 64, 64) and torch.isfinite(refined).all()
    with torch.inference_mode():
        feats = model.encode(torch.cat([query, supports.flatten(0, 1)]).float() / 255)
        cached = model.forward_features([f[:2] for f in feats], [f[2:, None] for f in feats], masks, None, (64, 64))
    assert torch.equal(cached, refined) and len(feats) == 2 + (3 if sam else 1)  # 2 ViT layers + SAM's maps
    record = protocol_record(cfg, model)
    preset = "sam2_tiny128" if sam else "tiny256"
    assert record["refine"] == "sam" and record["sam"]["preset"] == preset and record["head"] == "prototype"
    assert model.identity.endswith("|prototype+refine:sam")


@pytest.mark.parametrize("head", ["gfsam", "persam", "persam_f"])
def test_refine_on_a_sam_head_is_an_error(head):
    """The SAM heads have no coarse mask to refine: model.refine=sam on one names both keys and the fix."""
    with pytest.raises(ValueError, match=rf"model.refine=sam .* model.head={head} already predicts with SAM: set "
                                         "model.refine=none"):  # fmt: skip
        build_model(load_config(None, [*OVERRIDES, f"model.head={head}"]).model)


def test_a_coarse_mask_without_foreground_is_kept_and_sam_is_not_prompted():
    """model.refine=sam and zeroshot.refine=sam on a head that finds nothing: the head's logits / the all-background
    labels stand as they are, and SAM is never called."""

    class NoSam:
        def decode(self, *args, **kwargs):
            raise AssertionError("SAM was prompted")

    background = torch.stack([torch.full((20, 30), 0.3), torch.full((20, 30), -0.2)])  # p(fg) < 0.5 everywhere
    assert torch.equal(refine_query(NoSam(), torch.zeros(1), background), background)
    scores = torch.stack([torch.ones(20, 30), torch.zeros(20, 30), torch.rand(20, 30)])  # channel 0 wins everywhere
    assert torch.equal(refine_labels(NoSam(), torch.zeros(1), scores), torch.zeros(20, 30, dtype=torch.long))
