"""The protocol record of results: one owner, per-dataset fields, model-reported fields, the code revision."""

from __future__ import annotations

import json
import re

import pytest
from torch import nn

from fewshot.config import CocoConfig, DataConfig, load_config
from fewshot.provenance import FREE, REQUIRED, episode_fields, git_revision, protocol_record


def test_episode_fields_hold_the_seed_and_only_their_datasets_options():
    coco = episode_fields(DataConfig(dataset="coco", coco=CocoConfig(split="consecutive", crowd="foreground")), 5)
    assert coco["seed"] == 5 and coco["coco_split"] == "consecutive" and coco["coco_crowd"] == "foreground"
    assert coco["query_order"] == "class_uniform"
    pascal = episode_fields(DataConfig(dataset="pascal"), 0)
    assert "coco_split" not in pascal and "folder_binary" not in pascal and pascal["query_order"] == "walk"
    assert episode_fields(DataConfig(dataset="folder"), 0)["folder_binary"] is False
    json.dumps(coco)


def test_every_record_names_its_sampler_and_how_it_draws_supports():
    """The sampler defines the episodes: it is compared in tables (an older record is native: tables.IMPLIED); an
    official one names its query order by itself, and its support draw is its loader's."""
    native = episode_fields(DataConfig(), 0)
    assert (native["sampler"], native["support_draw"]) == ("native", "distinct") and "sampler" not in FREE
    official = episode_fields(DataConfig(dataset="coco", sampler="hsnet", lists="hsnet", list_dir="splits"), 0)
    assert (official["sampler"], official["support_draw"]) == ("hsnet", "independent")  # HSNet's supports repeat
    assert "query_order" not in official
    record = protocol_record(load_config(None, ["data.sampler=pfenet", "data.seeds=[321]"]), nn.Identity())
    assert (record["sampler"], record["seeds"]) == ("pfenet", [321])


class Described(nn.Module):
    identity = "described|model"

    def protocol_fields(self):
        return {"shots": 0, "head": "zeroshot:sclip", "backbone": "open_clip:ViT-B-16"}


def test_protocol_record_from_config_and_model():
    cfg = load_config(None, ["data.seeds=[3, 1]", "model.backbone.pretrained=NONE", "data.shots=5"])
    record = protocol_record(cfg, nn.Identity(), checkpoint="runs/x/best.safetensors")
    assert record["seeds"] == [3, 1] and "seed" not in record
    assert record["pretrained"] == "none"  # normalised: every spelling of random weights reads the same
    assert record["shots"] == 5 and record["checkpoint"] == "runs/x/best.safetensors"
    assert record["git"] == git_revision() and record["amp"] == cfg.eval.amp
    assert set(REQUIRED) <= set(record)
    described = protocol_record(cfg, Described())
    assert (described["shots"], described["head"], described["backbone"]) == (0, "zeroshot:sclip", "open_clip:ViT-B-16")
    assert described["model"] == "described|model"


def test_model_fields_are_free_and_episode_fields_are_compared():
    assert {"backbone", "head", "model", "checkpoint", "git", "fold", "shots"} <= FREE
    assert not {"lists", "episodes", "seeds", "eval_resolution", "image_size"} & FREE


def test_text_head_without_supports_reports_zero_shots():
    from fewshot.model import FewShotSegmenter

    class Head(nn.Module):
        def __init__(self, use_supports):
            super().__init__()
            self.use_supports = use_supports

    class Backbone(nn.Module):
        identity = "tiny"
        frozen = True

    assert FewShotSegmenter(Backbone(), Head(False)).protocol_fields() == {"shots": 0}
    assert FewShotSegmenter(Backbone(), Head(True)).protocol_fields() == {}
    assert FewShotSegmenter(Backbone(), nn.Identity()).protocol_fields() == {}


def test_git_revision_is_a_short_sha_here():
    rev = git_revision()
    assert rev == "unknown" or re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", rev)


def test_run_config_is_headed_by_the_git_revision(tmp_path):
    from fewshot.runs import prepare_run_dir

    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    run_dir = prepare_run_dir(cfg, resume=False)
    first = (run_dir / "config.yaml").read_text().splitlines()[0]
    assert first == f"# git revision: {git_revision()}"
    assert load_config(run_dir / "config.yaml") == cfg  # still the config, loadable as it is


@pytest.mark.parametrize("pretrained, random", [("none", True), ("NONE", True), ("", True), ("openai", False)])
def test_one_random_weights_check(pretrained, random):
    from fewshot.backbones.weights import is_random

    assert is_random(pretrained) is random
