"""SAM 2.1 in the engine (Sam2Engine): against transformers' own Sam2Model / Sam2Processor and the official sam2
SAM2ImagePredictor, on random tiny weights; names, sizes, presets and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fewshot.backbones.weights import WeightsError
from fewshot.sam import Sam2Engine, load_sam
from fewshot.sam.weights import family, model_from_official, official_size, reinitialise, sam_config, size_of
from tests.test_sam_engine import assert_engine_equals_predictor

SIZE = (75, 100)  # an image of another aspect than SAM 2's square input


@pytest.fixture(scope="module")
def engine():
    return load_sam("sam2.1_hiera_t", "none", "sam2_tiny128", points_per_batch=3)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def hf_processor(side: int = 128):
    from transformers import Sam2ImageProcessor, Sam2Processor

    return Sam2Processor(Sam2ImageProcessor(size={"height": side, "width": side}))


def test_names_ids_and_families(caplog):
    with caplog.at_level("WARNING", logger="fewshot.sam.weights"):
        engine = load_sam("facebook/sam2.1-hiera-tiny", "none", "sam2_tiny128")
    assert isinstance(engine, Sam2Engine) and engine.identity == "sam:facebook/sam2.1-hiera-tiny@sam2_tiny128|none"
    assert "SAM sam2_tiny128 has RANDOM weights" in caplog.text
    assert size_of("facebook/sam2.1-hiera-base-plus") == "sam2.1_hiera_b+" and family("sam2.1_hiera_l") == "sam2"
    assert family("facebook/sam-vit-huge") == "sam"
    with pytest.raises(KeyError, match="did you mean 'sam2.1_hiera_l'"):
        size_of("sam2.1_hiera_large")
    with pytest.raises(KeyError, match=r"preset='tiny256' is a sam architecture .* sam2_tiny128"):
        sam_config("sam2.1_hiera_t", "tiny256")
    with pytest.raises(KeyError, match=r"preset='sam2_tiny128' is a sam2 architecture .* tiny256"):
        sam_config("vit_b", "sam2_tiny128")


def test_weights_of_another_name_or_offline_hub_are_clear_errors(tmp_path):
    named = r"sam_vit_h_4b8939.pth \(an official file name\) holds a SAM vit_h but .*sam2.1_hiera_l: set "
    with pytest.raises(WeightsError, match=named + r"model.sam.name=vit_h or give the .* \(sam2.1_hiera_large.pt\)"):
        load_sam("sam2.1_hiera_l", str(tmp_path / "sam_vit_h_4b8939.pth"))  # the SAM 1 default, not even there
    with pytest.raises(FileNotFoundError, match="sam2.1_hiera_large.pt does not exist"):
        load_sam("sam2.1_hiera_l", str(tmp_path / "sam2.1_hiera_large.pt"))
    with pytest.raises(WeightsError, match=r"cannot load SAM 'hf-hub:facebook/sam2.1-hiera-large' .* \(offline\?\)"):
        load_sam("sam2.1_hiera_l", "hf-hub:facebook/sam2.1-hiera-large")


def test_tiny_size_is_transformers_default_config():
    """transformers' Sam2Config() is the sam2.1-hiera-tiny style: our tiny must equal it (trunk, neck, heads)."""
    from transformers import Sam2Config

    ours, default = sam_config("sam2.1_hiera_t").to_dict(), Sam2Config().to_dict()
    for part in ("prompt_encoder_config", "mask_decoder_config"):
        assert ours[part] == default[part]
    vision, expected = ours["vision_config"], default["vision_config"]
    assert vision["backbone_config"] == expected["backbone_config"]
    assert {k: vision[k] for k in expected if k != "backbone_config"} == {
        k: v for k, v in expected.items() if k != "backbone_config"
    }


def test_sizes_are_the_official_yaml_configs():
    """Each size's trunk is the one of sam2/configs/sam2.1/*.yaml with hieradet.Hiera's defaults filled in."""
    pytest.importorskip("sam2", reason="the official sam2 package is not installed (pip install .[sam2])")
    import inspect
    from pathlib import Path

    import sam2
    from omegaconf import OmegaConf
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = {k: v.default for k, v in inspect.signature(Hiera.__init__).parameters.items() if k != "self"}
    short = {"t": "sam2.1_hiera_t", "s": "sam2.1_hiera_s", "b+": "sam2.1_hiera_b+", "l": "sam2.1_hiera_l"}
    for tag, name in short.items():
        yaml = OmegaConf.load(Path(sam2.__file__).parent / f"configs/sam2.1/sam2.1_hiera_{tag}.yaml").model
        trunk = {**defaults, **OmegaConf.to_container(yaml.image_encoder.trunk)}
        backbone = sam_config(name).vision_config.backbone_config
        width, heads = trunk["embed_dim"], trunk["num_heads"]
        assert backbone.embed_dim_per_stage == [width * 2**i for i in range(4)]
        assert backbone.num_attention_heads_per_stage == [heads * 2**i for i in range(4)]
        assert backbone.blocks_per_stage == list(trunk["stages"])
        assert backbone.global_attention_blocks == list(trunk["global_att_blocks"])
        assert backbone.window_size_per_stage == list(trunk["window_spec"])
        assert backbone.window_positional_embedding_background_size == list(trunk["window_pos_embed_bkg_spatial_size"])
        neck = list(yaml.image_encoder.neck.backbone_channel_list)
        assert sam_config(name).vision_config.backbone_channel_list == neck
        assert yaml.image_size == 1024 == sam_config(name).prompt_encoder_config.image_size


def test_random_tiny_sam2_carries_signal_through_every_part(engine, image):
    maps = engine.embed(image)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 32, 32), (2, 8, 16, 16), (2, 32, 8, 8)]
    assert engine.channels == [4, 8, 32] and engine.mask_size == 32 and engine.image_size == 128
    assert all(m.std() > 0.1 for m in maps)  # transformers' own init gives ~1e-3
    fourier = engine.model.prompt_encoder.shared_embedding.positional_embedding
    assert 0.5 < fourier.std() < 2 and torch.equal(fourier, engine.model.shared_image_embedding.positional_embedding)
    assert engine.model.no_memory_embedding.std() > 0.1  # zero in transformers' init
    points = torch.tensor([[[[20.0, 30.0]], [[70.0, 50.0]]]]).expand(2, 2, 1, 2)
    logits, iou = engine.predict(maps, SIZE, points=points)
    assert logits.std() > 0.1 and ((iou > 0) & (iou < 1)).all() and iou.std() > 1e-3  # sigmoid'd, not constant


def test_the_1024_preset_has_the_official_frame(image):
    engine = load_sam("facebook/sam2.1-hiera-tiny", "none", "sam2_tiny1024")
    maps = engine.embed(image[:1])
    assert [tuple(m.shape[2:]) for m in maps] == [(256, 256), (128, 128), (64, 64)] and engine.mask_size == 256
    low_res, iou = engine.decode(maps, SIZE, points=torch.tensor([[[[40.0, 30.0]]]]))
    assert low_res.shape == (1, 1, 3, 256, 256) and iou.shape == (1, 1, 3)


def test_reinitialise_is_seeded():
    from transformers import Sam2Model

    config = sam_config("sam2.1_hiera_t", "sam2_tiny128")
    a, b, c = (reinitialise(Sam2Model(config), seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["vision_encoder.backbone.pos_embed"], c["vision_encoder.backbone.pos_embed"])


def test_preprocessing_equals_the_sam2_processor(engine, image):
    """On [0, 1] floats the processor resizes as the official predictor does: equal. On uint8 it resizes before
    converting to float: the uint8 result is off by at most 1 / 255 per pixel (0.0175 after the ImageNet std)."""
    processor = hf_processor()
    floats = list((image.float() / 255).numpy())
    expected = processor(images=floats, do_rescale=False, return_tensors="pt")["pixel_values"]
    assert torch.allclose(engine.preprocess(image), expected, atol=1e-6)
    rounded = processor(images=list(image.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    assert (engine.preprocess(image) - rounded).abs().max() < 1 / 255 / 0.224 + 1e-4


def test_prompt_frame_equals_the_sam2_processor(engine, image):
    points = [[[[30.0, 40.0], [90.0, 10.0]]]] * 2
    out = hf_processor()(images=list(image.permute(0, 2, 3, 1).numpy()), input_points=points, return_tensors="pt")
    assert torch.allclose(engine.to_frame(torch.tensor(points), SIZE), out["input_points"], atol=1e-5)


def test_predict_equals_sam2model_forward_and_post_process_masks(engine, image):
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(2, 5, 2, 2, generator=generator) * torch.tensor([SIZE[1], SIZE[0]])
    labels = torch.tensor([[1, 0], [1, -10]]).repeat(2, 3, 1)[:, :5]  # foreground + background, and a padded point
    boxes = torch.tensor([10.0, 5.0, 80.0, 60.0]).expand(2, 5, 4)
    processor = hf_processor()
    pixels = engine.preprocess(image)
    for kwargs, multimask in [({"points": points, "labels": labels}, True), ({"boxes": boxes}, False),
                              ({"points": points, "labels": labels, "boxes": boxes}, True),
                              ({"points": points, "labels": labels}, False)]:  # fmt: skip
        logits, iou = engine.predict(engine.embed(image), SIZE, multimask=multimask, **kwargs)  # 3 per decoder call
        frame = {"input_points": engine.to_frame(points, SIZE), "input_labels": labels} if "points" in kwargs else {}
        if "boxes" in kwargs:
            frame["input_boxes"] = engine.to_frame(boxes.reshape(2, 5, 2, 2), SIZE).reshape(2, 5, 4)
        with torch.no_grad():
            out = engine.model(pixel_values=pixels, multimask_output=multimask, **frame)
        expected = processor.post_process_masks(out.pred_masks, [SIZE] * 2, binarize=False)
        assert logits.shape == (2, 5, 3 if multimask else 1, *SIZE)
        assert torch.allclose(iou, out.iou_scores, atol=1e-6)
        assert torch.allclose(logits, torch.stack(expected), atol=1e-5)


def test_persam_guidance_is_refused_on_sam2(engine, image):
    with pytest.raises(ValueError, match="defined on SAM 1's mask decoder"):
        engine.decode(engine.embed(image), SIZE, points=torch.zeros(2, 1, 1, 2), attn_sim=torch.zeros(2, 1, 1, 64))


def test_transformers_folders_pick_the_model_from_config_json(tmp_path):
    """A folder's config.json model_type picks Sam2Model; a folder of another size names itself and both sizes."""
    from transformers import Sam2Model

    config = sam_config("sam2.1_hiera_t")
    Sam2Model(config).save_pretrained(tmp_path / "tiny")
    engine = load_sam("sam2.1_hiera_t", str(tmp_path / "tiny"))
    assert isinstance(engine, Sam2Engine) and engine.identity.endswith(f"|{tmp_path / 'tiny'}")
    with pytest.raises(WeightsError, match=r"tiny holds a SAM sam2.1_hiera_t but .* for sam2.1_hiera_l"):
        load_sam("facebook/sam2.1-hiera-large", str(tmp_path / "tiny"))
    with pytest.raises(WeightsError, match=r"holds a SAM sam2.1_hiera_t but model.sam.name asks for vit_h"):
        load_sam("vit_h", str(tmp_path / "tiny"))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(WeightsError, match=r"clip holds a transformers 'clip' model, not sam or sam2"):
        load_sam("vit_h", str(tmp_path / "clip"))


# ---------------------------------------------------------------------------------------------------------------------
# The official package: sam2's own SAM2Base with sam2_tiny128's architecture, through the converter.

TINY128 = [  # hydra overrides of sam2.1_hiera_t.yaml: 128 px, a 12-wide trunk, a 32-wide neck / decoder / memory
    "++model.image_size=128", "++model.image_encoder.trunk.embed_dim=12",
    "++model.image_encoder.neck.backbone_channel_list=[96,48,24,12]", "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32", "++model.memory_attention.d_model=32",
    "++model.memory_attention.layer.d_model=32", "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16", "++model.memory_attention.num_layers=1",
    "++model.memory_encoder.out_dim=16", "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16", "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32", "++model.memory_encoder.fuser.num_layers=1",
]  # fmt: skip


def official_sam2(config: str = "sam2.1_hiera_t", overrides: list[str] = TINY128, seed: int = 0) -> nn.Module:
    """The official SAM2Base (build_sam2 on sam2/configs/sam2.1/<config>.yaml, its image post-processing settings;
    by default with sam2_tiny128's architecture) with every parameter random (fan-in scaled; position embeddings
    included)."""
    from sam2.build_sam import build_sam2

    model = build_sam2(f"configs/sam2.1/{config}.yaml", None, device="cpu", hydra_overrides_extra=overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in [*model.named_parameters(), *model.named_buffers()]:
            noise = torch.randn(param.shape, generator=generator)
            if "gaussian" in name:
                param.copy_(noise)
            elif name.endswith(("pos_embed", "pos_embed_window", "no_mem_embed")):
                param.copy_(0.5 * noise)
            elif param.dim() <= 1 or param.shape[0] == 1:
                param.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * noise)
            elif param.is_floating_point():
                param.copy_(noise / math.sqrt(param[0].numel()))
    return model.eval()


@pytest.fixture(scope="module")
def official():
    pytest.importorskip("sam2", reason="the official sam2 package is not installed (pip install .[sam2])")
    return official_sam2()


def test_official_checkpoint_converts_and_equals_sam2_image_predictor(official, tmp_path):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    path = tmp_path / "tiny.pt"
    torch.save({"model": official.state_dict()}, path)  # what sam2 users hold: {"model": state_dict}
    state = torch.load(path)["model"]
    engine = Sam2Engine(model_from_official(state, sam_config("sam2.1_hiera_t", "sam2_tiny128")), "test")
    predictor = SAM2ImagePredictor(official)
    predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # the official predictor hard-codes 1024 px's
    rgb = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    predictor.set_image(rgb)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    assert torch.allclose(engine.preprocess(image), predictor._transforms(rgb)[None], atol=1e-6)
    maps = engine.embed(image)
    features = [*predictor._features["high_res_feats"], predictor._features["image_embed"]]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps, features, strict=True))
    assert_engine_equals_predictor(engine, predictor, maps)  # the official low-res masks it feeds back are clamped


def test_an_official_checkpoint_of_another_size_names_the_file_and_both_sizes(official, tmp_path):
    path = tmp_path / "sam2.1_hiera_large.pt"
    torch.save({"model": official.state_dict()}, path)
    assert official_size(torch.load(path)["model"]) == "12-wide, 12 blocks"
    with pytest.raises(WeightsError, match=r"hiera_large\.pt holds a SAM 12-wide, 12 blocks but .* sam2.1_hiera_l"):
        load_sam("sam2.1_hiera_l", str(path))
    path.rename(tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match=r"tiny.pt holds a SAM 12-wide, 12 blocks but model.sam.name asks for vit_h"):
        load_sam("vit_h", str(tmp_path / "tiny.pt"))


def test_a_sam2_0_checkpoint_is_refused(official, tmp_path, monkeypatch):
    """SAM 2.0's files (sam2_hiera_*.pt) hold the same image model with other weights: refused for a 2.1 name."""
    from fewshot.sam import sam2_weights

    monkeypatch.setitem(sam2_weights.SIZES, "sam2.1_hiera_t", {**sam2_weights.PRESETS["sam2_tiny128"]["backbone"]})
    state = official.state_dict()
    path = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": {k: v for k, v in state.items() if k != "no_obj_embed_spatial"}}, path)
    with pytest.raises(WeightsError, match=r"sam2_hiera_tiny\.pt is a SAM 2.0 checkpoint"):
        load_sam("sam2.1_hiera_t", str(path))


@pytest.mark.slow
@pytest.mark.parametrize("config, name", [("sam2.1_hiera_t", "sam2.1_hiera_t"), ("sam2.1_hiera_s", "sam2.1_hiera_s"),
                                          ("sam2.1_hiera_b+", "facebook/sam2.1-hiera-base-plus"),
                                          ("sam2.1_hiera_l", "sam2.1_hiera_l")])  # fmt: skip
def test_every_official_size_loads_its_checkpoint_and_equals_the_official_predictor(config, name, tmp_path):
    """Each official architecture at 1024 px (random weights): its .pt loads by name through the size check and the
    converter (every key), and the engine equals SAM2ImagePredictor (15-40 s each on a 2-core CPU)."""
    pytest.importorskip("sam2", reason="the official sam2 package is not installed (pip install .[sam2])")
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    official = official_sam2(config, overrides=[])
    path = tmp_path / f"{config}.pt"
    torch.save({"model": official.state_dict()}, path)
    engine = load_sam(name, str(path))
    predictor = SAM2ImagePredictor(official)
    rgb = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    predictor.set_image(rgb)
    maps = engine.embed(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    features = [*predictor._features["high_res_feats"], predictor._features["image_embed"]]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps, features, strict=True))
    coords, point_labels = np.array([[130.0, 240.0], [370.0, 120.0]]), np.array([1, 0])
    box = np.array([50, 40, 420, 300])
    masks, scores, _ = predictor.predict(coords, point_labels, box, multimask_output=True, return_logits=True)
    points, labels = torch.tensor(coords)[None, None].float(), torch.tensor(point_labels)[None, None]
    logits, iou = engine.predict(maps, (375, 500), points, labels, torch.tensor(box)[None, None].float())
    assert torch.allclose(iou[0, 0], torch.from_numpy(scores), atol=1e-5)
    assert torch.allclose(logits[0, 0], torch.from_numpy(masks), atol=1e-4)
