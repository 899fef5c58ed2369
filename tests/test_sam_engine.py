"""SamEngine against transformers' own SamModel / SamProcessor and the official SamPredictor, on random tiny weights;
the prompt and dtype rules of both families (SAM 1 and SAM 2, tests/test_sam2_engine.py for the rest of SAM 2)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.backbones.weights import WeightsError
from fewshot.sam import load_sam, pick, resized_size
from fewshot.sam.weights import model_from_official, official_size, reinitialise, sam_config, size_of

SIZE = (75, 100)  # an image of another aspect than SAM's square input


@pytest.fixture(scope="module")
def engine():
    return load_sam("vit_b", "none", "tiny256", points_per_batch=3)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def hf_processor(side: int):
    from transformers import SamImageProcessor, SamProcessor

    return SamProcessor(SamImageProcessor(size={"longest_edge": side}, pad_size={"height": side, "width": side}))


def test_random_tiny_sam_escapes_the_initialisation_traps(engine, image):
    embeddings = engine.embed(image)
    assert embeddings.shape == (2, 32, 16, 16)
    assert embeddings.std() > 1e-2  # transformers' own init (std 1e-10) gives ~1e-21
    fourier = engine.model.prompt_encoder.shared_embedding.positional_embedding
    assert 0.5 < fourier.std() < 2  # the official random init (std 1), not hidden / 2
    assert torch.equal(fourier, engine.model.shared_image_embedding.positional_embedding)


def test_preprocessing_equals_the_sam_processor(engine, image):
    processor = hf_processor(256)
    expected = processor(images=list(image.permute(0, 2, 3, 1).numpy()), return_tensors="pt")
    assert torch.allclose(engine.preprocess(image), expected["pixel_values"], atol=1e-5)
    assert resized_size(SIZE, 256) == tuple(expected["reshaped_input_sizes"][0].tolist()) == (192, 256)


def test_predict_equals_samodel_forward_and_post_process_masks(engine, image):
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(2, 5, 2, 2, generator=generator) * torch.tensor([SIZE[1], SIZE[0]])
    labels = torch.tensor([[1, 0], [1, -10]]).repeat(2, 3, 1)[:, :5]  # foreground + background, and a padded point
    boxes = torch.tensor([10.0, 5.0, 80.0, 60.0]).expand(2, 5, 4)
    processor = hf_processor(256)
    pixels = engine.preprocess(image)
    for kwargs, multimask in [({"points": points, "labels": labels}, True), ({"boxes": boxes}, False),
                              ({"points": points, "labels": labels, "boxes": boxes}, True)]:  # fmt: skip
        logits, iou = engine.predict(engine.embed(image), SIZE, multimask=multimask, **kwargs)
        frame = {"input_points": engine.to_frame(points, SIZE), "input_labels": labels} if "points" in kwargs else {}
        if "boxes" in kwargs:
            frame["input_boxes"] = engine.to_frame(boxes.reshape(2, 5, 2, 2), SIZE).reshape(2, 5, 4)
        with torch.no_grad():
            out = engine.model(pixel_values=pixels, multimask_output=multimask, **frame)
        expected = processor.post_process_masks(out.pred_masks, [SIZE] * 2, [(192, 256)] * 2, binarize=False)
        assert logits.shape == (2, 5, 3 if multimask else 1, *SIZE)
        assert torch.allclose(iou, out.iou_scores, atol=1e-6)
        assert torch.allclose(logits, torch.stack(expected), atol=1e-5)


# Both families: SAM 1 (tiny256: 64 x 64 low-res masks) and SAM 2 (sam2_tiny128: 32 x 32).
FAMILIES = [("vit_b", "tiny256"), ("sam2.1_hiera_t", "sam2_tiny128")]


def maps(embeddings) -> list[torch.Tensor]:
    return [embeddings] if isinstance(embeddings, torch.Tensor) else embeddings


@pytest.mark.parametrize("name, preset", FAMILIES)
def test_mask_prompts_are_one_per_prompt(name, preset, image):
    """Each prompt's own mask prompt, as the official decoders: prompt p equals a lone call with its mask."""
    engine = load_sam(name, "none", preset, points_per_batch=3)
    embeddings = engine.embed(image)
    points = torch.tensor([[30.0, 40.0], [60.0, 20.0], [90.0, 70.0], [5.0, 5.0]]).view(1, 4, 1, 2).expand(2, 4, 1, 2)
    side = engine.mask_size
    masks = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(2))
    low_res, iou = engine.decode(embeddings, SIZE, points=points, mask_logits=masks)
    for p in range(4):
        alone, alone_iou = engine.decode(embeddings, SIZE, points=points[:, p : p + 1], mask_logits=masks[:, p : p + 1])
        assert torch.allclose(low_res[:, p : p + 1], alone, atol=1e-5)
        assert torch.allclose(iou[:, p : p + 1], alone_iou, atol=1e-6)
    with pytest.raises(ValueError, match=rf"mask_logits .* must be \[N=2, P=4, {side}, {side}\]"):
        engine.decode(embeddings, SIZE, points=points, mask_logits=torch.zeros(2, 4, 2 * side, 2 * side))


@pytest.mark.parametrize("name, preset", FAMILIES)
def test_batched_embeddings_equal_single_images(name, preset, image):
    engine = load_sam(name, "none", preset)
    together, apart = maps(engine.embed(image)), [maps(engine.embed(image[i : i + 1])) for i in range(2)]
    for level, joint in enumerate(together):
        assert torch.allclose(joint, torch.cat([a[level] for a in apart]), atol=1e-5)
    second = maps(pick(engine.embed(image), 1))  # one image's embeddings
    assert all(torch.equal(one, joint[1]) for one, joint in zip(second, together, strict=True))
    assert [m.shape for m in maps(pick(pick(engine.embed(image), 1), None))] == [m[1:].shape for m in together]


@pytest.mark.parametrize("name, preset", FAMILIES)
def test_bf16_runs_close_to_fp32(name, preset, image):
    fp32 = load_sam(name, "none", preset)
    bf16 = load_sam(name, "none", preset, dtype="bf16")
    points = torch.tensor([[[[40.0, 30.0]]]]).expand(2, 1, 1, 2)
    a, _ = fp32.predict(fp32.embed(image), SIZE, points=points)
    b, _ = bf16.predict(bf16.embed(image), SIZE, points=points)
    assert b.dtype == torch.float32 and ((a > 0) == (b > 0)).float().mean() > 0.9


@pytest.mark.parametrize("name, preset", FAMILIES)
def test_sam_runs_in_its_own_dtype_under_autocast(name, preset, image):
    """eval.amp's autocast sets the feature backbone's precision; SAM's is model.sam.dtype."""
    engine = load_sam(name, "none", preset)
    points = torch.tensor([[[[40.0, 30.0]]]]).expand(2, 1, 1, 2)
    plain = engine.predict(engine.embed(image), SIZE, points=points)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = engine.predict(engine.embed(image), SIZE, points=points)
    assert all(torch.equal(a, b) for a, b in zip(plain, under, strict=True))


def test_bad_names_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(KeyError, match="did you mean 'vit_h'"):
        size_of("vit_hh")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_sam("vit_b", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match="preset"):
        load_sam("vit_b", str(tmp_path / "x.pth"), preset="tiny256")


def official_tiny_sam(seed: int = 0) -> nn.Module:
    """The official segment-anything Sam with tiny256's architecture, every parameter random (pos_embed and rel_pos
    included)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=256, embed_dim=64, depth=2, num_heads=2, out_chans=32, qkv_bias=True, use_rel_pos=True,
            window_size=4, global_attn_indexes=(1,), norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=32, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fan-in scaled, so that every layer passes signal on (outputs of order 1)
        for name, param in sam.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "gaussian" in name:
                param.copy_(noise)
            elif param.dim() == 1:
                param.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))
        gaussian = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix  # a buffer: drawn here too
        gaussian.copy_(torch.randn(gaussian.shape, generator=generator))
    return sam.eval()


def assert_engine_equals_predictor(engine, predictor, embeddings) -> None:
    """engine.predict equals an official predictor set on the same SIZE image (segment-anything's SamPredictor or
    sam2's SAM2ImagePredictor: the same predict API) for points, a box and both, multimask on and off, each official
    low-res mask fed back as a mask prompt, and a mask prompt alone."""
    coords, point_labels, box = np.array([[30.0, 40.0], [70.0, 20.0]]), np.array([1, 0]), np.array([10, 5, 80, 60])
    ours_points = {"points": torch.tensor(coords)[None, None].float(), "labels": torch.tensor(point_labels)[None, None]}
    ours_box = {"boxes": torch.tensor(box)[None, None].float()}
    theirs_points = {"point_coords": coords, "point_labels": point_labels}
    cases = [
        (theirs_points, ours_points),
        ({"box": box}, ours_box),
        ({**theirs_points, "box": box}, {**ours_points, **ours_box}),
    ]
    for kwargs, ours in cases:
        for multimask in (True, False):
            masks, scores, low_res = predictor.predict(**kwargs, multimask_output=multimask, return_logits=True)
            logits, iou = engine.predict(embeddings, SIZE, multimask=multimask, **ours)
            assert torch.allclose(iou[0, 0], torch.from_numpy(scores), atol=1e-5)
            assert torch.allclose(logits[0, 0], torch.from_numpy(masks), atol=1e-4)
            # the mask prompt path: the official low-res logits fed back
            again, again_iou, _ = predictor.predict(**kwargs, mask_input=low_res[:1], multimask_output=multimask,
                                                    return_logits=True)  # fmt: skip
            logits, iou = engine.predict(embeddings, SIZE, multimask=multimask,
                                         mask_logits=torch.from_numpy(low_res[:1])[None], **ours)  # fmt: skip
            assert torch.allclose(iou[0, 0], torch.from_numpy(again_iou), atol=1e-5)
            assert torch.allclose(logits[0, 0], torch.from_numpy(again), atol=1e-4)
    alone, alone_iou, _ = predictor.predict(mask_input=low_res[:1], return_logits=True)  # a mask prompt alone
    logits, iou = engine.predict(embeddings, SIZE, mask_logits=torch.from_numpy(low_res[:1])[None])
    assert torch.allclose(iou[0, 0], torch.from_numpy(alone_iou), atol=1e-5)
    assert torch.allclose(logits[0, 0], torch.from_numpy(alone), atol=1e-4)


def test_official_checkpoint_converts_and_equals_the_official_predictor(tmp_path):
    pytest.importorskip("segment_anything", reason="the official segment-anything==1.0 is not installed")
    from segment_anything import SamPredictor

    from fewshot.sam import SamEngine

    official = official_tiny_sam()
    path = tmp_path / "tiny.pth"
    torch.save(official.state_dict(), path)
    engine = SamEngine(model_from_official(torch.load(path), sam_config("vit_b", "tiny256")), "test").eval()
    rgb = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    predictor = SamPredictor(official)
    predictor.set_image(rgb)
    embeddings = engine.embed(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    assert torch.allclose(embeddings, predictor.get_image_embedding(), atol=1e-5)
    assert_engine_equals_predictor(engine, predictor, embeddings)


def test_a_checkpoint_of_another_size_names_the_file_and_both_sizes(tmp_path):
    pytest.importorskip("segment_anything", reason="the official segment-anything==1.0 is not installed")
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(official_tiny_sam().state_dict(), path)
    assert official_size(torch.load(path)) == "64-wide, 2 blocks"
    with pytest.raises(WeightsError, match=r"sam_vit_b_01ec64\.pth holds a SAM 64-wide, 2 blocks but .* vit_b"):
        load_sam("vit_b", str(path))


def test_reinitialise_is_seeded():
    from transformers import SamModel

    a = reinitialise(SamModel(sam_config("vit_b", "tiny256")), seed=3).state_dict()
    b = reinitialise(SamModel(sam_config("vit_b", "tiny256")), seed=3).state_dict()
    c = reinitialise(SamModel(sam_config("vit_b", "tiny256")), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["vision_encoder.pos_embed"], c["vision_encoder.pos_embed"])
    assert a["vision_encoder.pos_embed"].std() > 1e-2  # zero in transformers' own init


@pytest.mark.parametrize("size", [(256, 256), (192, 256)])
def test_postprocess_at_the_resized_size_skips_only_an_identity(engine, size):
    """Images already at SAM's resized size (GF-SAM's 1024 x 1024 queries) skip the final same-size resize: the
    logits equal the two-step form that makes it, bit for bit, and transformers' post_process_masks."""
    low_res = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    x = F.interpolate(low_res.reshape(6, 1, 64, 64), (256, 256), mode="bilinear", align_corners=False)
    two_step = F.interpolate(x[..., : size[0], : size[1]], size, mode="bilinear", align_corners=False)
    logits = engine.postprocess(low_res, size)
    assert resized_size(size, 256) == size and torch.equal(logits, two_step.reshape(2, 3, *size))
    expected = hf_processor(256).post_process_masks(low_res[None], [size], [size], binarize=False)[0]
    assert torch.allclose(logits, expected, atol=1e-6)


def test_images_too_thin_for_sams_frame_and_prompts_outside_the_image_are_clear_errors(engine):
    """A side that rounds to 0 px in SAM's frame, and prompt points or box corners off the image, name the value
    and the image size; padding points (label -10) and label -1 are not prompts and are not checked."""
    assert resized_size((1, 500), 256) == (1, 256)  # 0.51 px rounds to 1
    with pytest.raises(ValueError, match=r"1 x 600 px is too thin for SAM at 256 px: its 1 px side becomes 0.43 px .* "
                                         r"at least 2 px"):  # fmt: skip
        engine.preprocess(torch.zeros(1, 3, 1, 600, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0 x 5 px is empty"):
        resized_size((0, 5), 256)
    embeddings = engine.embed(torch.zeros(1, 3, *SIZE, dtype=torch.uint8))
    inside = torch.tensor([[[[0.0, 0.0], [100.0, 75.0]]]])  # the corners of a 75 x 100 image are inside
    assert engine.decode(embeddings, SIZE, inside)[0].shape == (1, 1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"a point prompt \(x=100.5, y=3\) lies outside the 75 x 100 image"):
        engine.decode(embeddings, SIZE, torch.tensor([[[[5.0, 5.0], [100.5, 3.0]]]]))
    with pytest.raises(ValueError, match=r"a point prompt \(x=nan, y=3\)"):
        engine.predict(embeddings, SIZE, torch.tensor([[[[float("nan"), 3.0]]]]))
    padded = torch.tensor([[[[5.0, 5.0], [-400.0, 9999.0]]]])
    assert engine.decode(embeddings, SIZE, padded, torch.tensor([[[1, -10]]]))[0].isfinite().all()
    with pytest.raises(ValueError, match=r"a box corner \(x=10, y=-1\) lies outside the 75 x 100 image"):
        engine.decode(embeddings, SIZE, boxes=torch.tensor([[[10.0, -1.0, 50.0, 40.0]]]))
