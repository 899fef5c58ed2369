"""Segment Anything as a component: `load_sam(name, pretrained, preset, device) -> SamEngine`, SAM 1 (ViT-B / L / H)
or SAM 2.1 (Hiera tiny / small / base-plus / large; a `Sam2Engine`).

The engine embeds images once (`embed`: one tensor for SAM 1, a list of 3 maps for SAM 2) and decodes any number of
point / box / mask prompts on the embeddings (`decode`, `predict`), with each model's official pre- and
post-processing. transformers is imported when a SAM is loaded, so importing this package stays cheap.
"""

from __future__ import annotations

import torch

from fewshot.sam.engine import Embeddings, Sam2Engine, SamEngine, num_images, pick, resized_size

__all__ = ["SAM_HEADS", "Embeddings", "Sam2Engine", "SamEngine", "load_sam", "num_images", "pick", "resized_size"]

# Heads that prompt SAM: not feature heads (fewshot.heads.HEADS) but models of their own, built by
# fewshot.sam.model.build_sam_model; name -> what it is.
SAM_HEADS = {
    "gfsam": "GF-SAM (NeurIPS 2024): training-free, DINOv2 priors select SAM point prompts, graph merging",
    "persam": "PerSAM (ICLR 2024): training-free, SAM features only, target-guided decoder and cascade (SAM 1 only)",
    "persam_f": "PerSAM-F (ICLR 2024): PerSAM with 2 multimask weights fitted on the reference (SAM 1 only)",
}


def load_sam(
    name: str,
    pretrained: str,
    preset: str = "",
    device: torch.device | str = "cpu",
    points_per_batch: int = 64,
    dtype: str = "fp32",
) -> SamEngine:
    """A frozen SAM engine on `device`.

    Args:
        name: vit_b | vit_l | vit_h (SAM), sam2.1_hiera_{t,s,b+,l} (SAM 2.1), or a transformers id
            (facebook/sam-vit-huge, facebook/sam2.1-hiera-large, ...).
        pretrained: a transformers folder, an official checkpoint (sam_vit_h_4b8939.pth, sam2.1_hiera_large.pt),
            hf-hub:org/repo, or none.
        preset: with pretrained=none, a small architecture of fewshot.sam.weights.PRESETS of the name's family
            (SAM: tiny256, tiny1024; SAM 2: sam2_tiny128, sam2_tiny1024).
        points_per_batch: most prompts per decoder call.
        dtype: fp32 | bf16.
    """
    from fewshot.sam.weights import load_sam_model

    model, tag = load_sam_model(name, pretrained, preset)
    identity = f"sam:{name}{'@' + preset if preset else ''}|{tag}"
    engine = Sam2Engine if model.config.model_type == "sam2" else SamEngine
    return engine(model, identity, points_per_batch=points_per_batch, dtype=dtype).to(device)
