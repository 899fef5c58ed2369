"""PerSAM and PerSAM-F: the guided decoder against the official SAM with PerSAM's changes, and each step by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewshot.config import load_config
from fewshot.model import build_model
from fewshot.sam import SamEngine, load_sam
from fewshot.sam.persam import (
    attention_prior,
    box_of,
    dice_loss,
    extreme_points,
    fit_mask_weights,
    focal_loss,
    guided_forward,
    mask_weights,
    reference_mask,
)
from fewshot.sam.weights import model_from_official, sam_config

SIZE = (75, 100)


@pytest.fixture(scope="module")
def engine():
    return load_sam("vit_b", "none", "tiny256")


def guidance(engine, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(1, 32, 16, 16, generator=g)
    points = torch.tensor([[[[30.0, 40.0], [70.0, 20.0]]]])
    labels = torch.tensor([[[1, 0]]])
    attn_sim = torch.rand(1, 1, 1, 256, generator=g)
    target = torch.randn(1, 1, 32, generator=g)
    return embeddings, points, labels, attn_sim, target


def test_guided_decoder_without_guidance_is_plain_sam(engine):
    embeddings, points, labels, _, _ = guidance(engine)
    frame = engine.to_frame(points, SIZE)
    with torch.no_grad():
        ours = guided_forward(engine.model, embeddings, frame, labels, None, True, None, None)
        plain = engine.model(image_embeddings=embeddings, input_points=frame, input_labels=labels)
    assert torch.allclose(ours.pred_masks, plain.pred_masks, atol=1e-6)
    assert torch.allclose(ours.iou_scores, plain.iou_scores, atol=1e-6)


def persam_reference(sam, features, coords, labels, attn_sim, target, multimask):
    """The official segment-anything decoder with PerSAM's three changes (per_segment_anything/modeling/
    transformer.py, mask_decoder.py), written here on the official modules."""

    def attention(module, q, k, v, sim=None):
        q, k, v = module.q_proj(q), module.k_proj(k), module.v_proj(v)
        q, k, v = (module._separate_heads(x, module.num_heads) for x in (q, k, v))
        attn = torch.softmax(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), dim=-1)
        if sim is not None:
            attn = torch.softmax(attn + sim, dim=-1)
        return module.out_proj(module._recombine_heads(attn @ v))

    def block(layer, queries, keys, query_pe, key_pe):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = layer.norm2(queries + attention(layer.cross_attn_token_to_image, q, k, keys, attn_sim))
        queries = layer.norm3(queries + layer.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = layer.norm4(keys + layer.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys

    decoder, transformer = sam.mask_decoder, sam.mask_decoder.transformer
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])[None].expand(sparse.shape[0], -1, -1)
    point_embedding = torch.cat([tokens, sparse], dim=1)
    src = features.repeat_interleave(point_embedding.shape[0], 0) + dense
    b, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    image_pe = sam.prompt_encoder.get_dense_pe().repeat_interleave(b, 0).flatten(2).permute(0, 2, 1)
    queries = point_embedding
    for layer in transformer.layers:
        queries += target  # in place: the first one also changes point_embedding, the prompts' PE
        queries, keys = block(layer, queries, keys, point_embedding, image_pe)
    q = queries + point_embedding
    q += target
    queries = transformer.norm_final_attn(
        queries + transformer.final_attn_token_to_image(q=q, k=keys + image_pe, v=keys)
    )
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
    hyper = torch.stack([mlp(queries[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
    iou = decoder.iou_prediction_head(queries[:, 0])
    keep = slice(1, None) if multimask else slice(0, 1)
    return masks[:, keep], iou[:, keep]


def test_guided_decoder_equals_persams_official_decoder():
    pytest.importorskip("segment_anything", reason="the official segment-anything==1.0 is not installed")
    from tests.test_sam_engine import official_tiny_sam

    official = official_tiny_sam()
    engine = SamEngine(model_from_official(official.state_dict(), sam_config("vit_b", "tiny256")), "test")
    embeddings, points, labels, attn_sim, target = guidance(engine)
    frame = engine.to_frame(points, SIZE)
    for multimask in (False, True):
        ours, ours_iou = engine.decode(embeddings, SIZE, points, labels, multimask=multimask, attn_sim=attn_sim,
                                       target=target)  # fmt: skip
        with torch.no_grad():
            ref, ref_iou = persam_reference(official, embeddings, frame[0], labels[0], attn_sim, target, multimask)
        assert torch.allclose(ours[0], ref, atol=1e-5) and torch.allclose(ours_iou[0], ref_iou, atol=1e-5)
    with torch.no_grad():  # transformers' own "PerSAM" arguments compute something else
        builtin = engine.model(
            image_embeddings=embeddings,
            input_points=frame,
            input_labels=labels,
            multimask_output=True,
            attention_similarity=attn_sim,
            target_embedding=target[:, None],
        )
    difference = (builtin.pred_masks[0] - ref).abs().max()
    assert difference > 1e3 * (ours[0] - ref).abs().max() and difference > 1e-2 * ref.abs().max()


def test_reference_mask_is_binarised_at_the_red_mean_after_bilinear(engine):
    mask = torch.zeros(256, 256, dtype=torch.bool)
    mask[7, 7] = mask[7, 8] = True  # cell (0, 0) samples pixels 7 and 8 of rows 7, 8: 2 of 4 -> 127.5 > 123.675
    mask[7, 23] = True  # cell (0, 1): 1 of 4 -> 63.75
    grid = reference_mask(engine, mask)
    assert grid.shape == (16, 16) and grid[0, 0] and not grid[0, 1] and grid.sum() == 1
    wide = reference_mask(engine, torch.ones(128, 256, dtype=torch.bool))  # bottom half of SAM's input is padding
    assert wide[:8].all() and not wide[8:].any()


def test_point_box_and_attention_steps():
    sim = torch.zeros(4, 5)
    sim[1, 3], sim[2, 0] = 2.0, -1.0
    assert extreme_points(sim).tolist() == [[3.0, 1.0], [0.0, 2.0]]  # (x, y) of argmax, argmin
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1:3, 2:5] = True
    assert box_of(mask).tolist() == [2.0, 1.0, 4.0, 2.0] and box_of(torch.zeros(3, 3, dtype=torch.bool)) is None
    prior = attention_prior(torch.arange(16.0).view(4, 4), 4)
    z = (torch.arange(16.0) - 7.5) / torch.arange(16.0).std()
    assert prior.shape == (1, 1, 1, 16) and torch.allclose(prior.flatten(), z.sigmoid(), atol=1e-6)


def test_mask_weights_start_at_the_mean_and_the_loss_gradient_is_right():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    target = (torch.rand(50, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    start = mask_weights(torch.full((2, 1), 1 / 3))
    assert torch.allclose((logits * start).sum(0), logits.mean(0), atol=1e-6)
    assert torch.allclose(fit_mask_weights(logits, target, iters=0), torch.full((3,), 1 / 3))

    def loss(params):
        weighted = (logits.double() * mask_weights(params)).sum(0, keepdim=True)
        return dice_loss(weighted, target.double()[None]) + focal_loss(weighted, target.double()[None])

    params = torch.tensor([[0.2], [0.5]], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (params,))
    fitted = fit_mask_weights(logits, target, iters=200, lr=1e-2)
    assert loss(fitted[1:, None].double()) < loss(torch.full((2, 1), 1 / 3, dtype=torch.double))


def persam_overrides(head: str) -> list[str]:
    return [f"model.head={head}", "model.sam.pretrained=none", "model.sam.preset=tiny256", "model.sam.image_size=256",
            "model.persam_f.iters=5"]  # fmt: skip


@pytest.mark.parametrize("head", ["persam", "persam_f"])
def test_persam_models_run_deterministically_and_record_their_protocol(head):
    from fewshot.provenance import protocol_record

    cfg = load_config(None, persam_overrides(head))
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    query = torch.randint(0, 256, (2, 3, 80, 80), dtype=torch.uint8, generator=g)
    supports = torch.randint(0, 256, (2, 2, 3, 80, 80), dtype=torch.uint8, generator=g)
    masks = torch.zeros(2, 2, 80, 80, dtype=torch.uint8)
    masks[..., 10:50, 20:60] = 1
    with torch.inference_mode():  # as the evaluation: PerSAM-F still fits its weights
        logits = model(query, supports, masks)
    assert logits.shape == (2, 2, 80, 80) and torch.isfinite(logits).all()
    assert torch.equal(logits, model(query, supports, masks))
    assert (model(query, supports, torch.zeros_like(masks))[:, 1] < 0).all()  # empty reference: background
    record = protocol_record(cfg, model)
    assert record["backbone"] == "none" and record["pretrained"] == "none" and "not official" in record["kshot"]
    assert len(model.encode(query)) == 1  # SAM embeddings only


def official_persam(sam, ref_rgb: np.ndarray, ref_mask: np.ndarray, test_rgb: np.ndarray) -> np.ndarray:
    """persam.py's test-time steps on the official SamPredictor, the guided first step on `persam_reference`:
    (high-resolution logits of the final mask, whether the box step ran)."""
    import torch.nn.functional as F
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(ref_rgb)
    ref_feat = predictor.features[0].permute(1, 2, 0)  # (e, e, C)
    mask_rgb = np.repeat((ref_mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    mask = torch.as_tensor(predictor.transform.apply_image(mask_rgb)).permute(2, 0, 1)[None].float()
    mask = F.interpolate(sam.preprocess(mask), size=ref_feat.shape[:2], mode="bilinear")[0, 0]
    target_embedding = ref_feat[mask > 0].mean(0)[None]
    target_feat = target_embedding / target_embedding.norm(dim=-1, keepdim=True)
    predictor.set_image(test_rgb)
    test_feat = predictor.features[0]
    C, h, w = test_feat.shape
    sim = (target_feat @ (test_feat / test_feat.norm(dim=0, keepdim=True)).reshape(C, h * w)).reshape(1, 1, h, w)
    sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
    sim = sam.postprocess_masks(sim, predictor.input_size, predictor.original_size).squeeze()
    width = sim.shape[1]
    top, last = int(sim.flatten().argmax()), int(sim.flatten().argmin())
    coords = np.array([[top % width, top // width], [last % width, last // width]], dtype=np.float64)
    labels = np.array([1, 0])
    z = (sim - sim.mean()) / torch.std(sim)
    attn_sim = F.interpolate(z[None, None], size=(h, w), mode="bilinear").sigmoid().flatten(2)[None]
    frame = torch.as_tensor(predictor.transform.apply_coords(coords, predictor.original_size), dtype=torch.float)
    logits, _ = persam_reference(sam, predictor.features, frame[None], torch.as_tensor(labels)[None], attn_sim,
                                 target_embedding[None], multimask=False)  # fmt: skip
    masks, scores, logits = predictor.predict(coords, labels, mask_input=logits[0, :1].numpy(), multimask_output=True,
                                              return_logits=True)  # fmt: skip
    best = int(np.argmax(scores))
    ys, xs = np.nonzero(masks[best] > 0)
    if len(ys) == 0:  # persam.py fails here; fewshot.sam.persam keeps the step-2 mask
        return masks[best], False
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
    masks, scores, _ = predictor.predict(coords, labels, box=box[None], mask_input=logits[best : best + 1],
                                         multimask_output=True, return_logits=True)  # fmt: skip
    return masks[int(np.argmax(scores))], True


def test_persam_cascade_equals_the_official_steps():
    pytest.importorskip("segment_anything", reason="the official segment-anything==1.0 is not installed")
    from fewshot.sam.persam import persam
    from tests.test_sam_engine import official_tiny_sam

    official = official_tiny_sam()
    engine = SamEngine(model_from_official(official.state_dict(), sam_config("vit_b", "tiny256")), "test")
    cascaded = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        ref_rgb, test_rgb = (rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for _ in range(2))
        ref_mask = np.zeros(SIZE, dtype=bool)
        ref_mask[10 + 3 * seed : 50, 20 : 70 - 4 * seed] = True
        with torch.no_grad():
            expected, full = official_persam(official, ref_rgb, ref_mask, test_rgb)
        ref_feat, test_feat = (engine.embed(torch.from_numpy(x).permute(2, 0, 1)[None]) for x in (ref_rgb, test_rgb))
        ours = persam(engine, test_feat[0], ref_feat, torch.from_numpy(ref_mask)[None], SIZE)
        assert torch.allclose(ours, torch.from_numpy(expected), atol=1e-5)  # measured: <= 2e-7
        cascaded += full
    assert cascaded >= 1  # the box step was reached and compared at least once


def test_references_with_no_mask_cell_give_background_never_nan(engine):
    """A reference mask empty, or too small to reach one embedding cell (reference_mask), gives PerSAM and PerSAM-F
    background (-1 everywhere); PerSAM-F also when only its first shot (the one it fits on) is empty."""
    from fewshot.sam.persam import persam, persam_f

    g = torch.Generator().manual_seed(5)
    query, supports = torch.randn(32, 16, 16, generator=g), torch.randn(2, 32, 16, 16, generator=g)
    speck = torch.zeros(2, 256, 256, dtype=torch.bool)
    speck[:, 7, 7] = True  # 1 of the 4 pixels cell (0, 0) samples: below the red mean
    assert not reference_mask(engine, speck[0]).any()
    for masks in (torch.zeros_like(speck), speck):
        assert torch.equal(persam(engine, query, supports, masks, (256, 256)), torch.full((256, 256), -1.0))
        assert torch.equal(persam_f(engine, query, supports, masks, (256, 256), iters=2), torch.full((256, 256), -1.0))
    second_only = torch.zeros_like(speck)
    second_only[1, 40:120, 50:150] = True
    assert torch.isfinite(persam(engine, query, supports, second_only, (256, 256))).all()
    assert (persam_f(engine, query, supports, second_only, (256, 256), iters=2) == -1).all()
