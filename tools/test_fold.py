"""Test a model on the novel classes of one or all folds: per-class IoU, mIoU and FB-IoU into results.json.

    python tools/test_fold.py CONFIG [key=value ...] [--checkpoint PATH] --out results.json
    python tools/test_fold.py CONFIG --folds 0 1 2 3 --shots 1 5 \\
        --checkpoint 'runs/x_fold{fold}/best.safetensors' --out DIR
    torchrun --nproc_per_node=N tools/test_fold.py ...      (episodes sharded, metric sums all-reduced)

Without --checkpoint the model is built as configured (training-free heads, or an untrained baseline). With one run
--out is the results file; with several (fold, shots) it is a folder receiving fold{f}_{k}shot.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from episodes import evaluated
from episodes.sources import build_source
from fewshot import distributed
from fewshot.checkpoint import load_weights, read_weights
from fewshot.config import Config, ConfigError, load_config
from fewshot.engine import resolve_device
from fewshot.evaluation import format_results, test_model
from fewshot.io import write_json
from fewshot.model import build_model
from fewshot.overlays import save_overlays
from fewshot.runs import setup_logging

log = logging.getLogger("test_fold")


def run_one(cfg: Config, checkpoint: str, out: Path) -> dict:
    device = distributed.init_distributed(resolve_device(cfg.device))
    source = build_source(evaluated(cfg.data))  # the target's classes in a cross-domain run
    if checkpoint:  # the checkpoint defines the model; how shots are fused stays a test-time choice
        state, trained_cfg, _ = read_weights(checkpoint)
        model_cfg = dataclasses.replace(trained_cfg.model, shot_fusion=cfg.model.shot_fusion)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    if cfg.model.backbone.pretrained == "none":
        log.warning("model.backbone.pretrained=none: a randomly initialised backbone; results say so in 'protocol'")
    torch.manual_seed(cfg.seed)  # a random-init model (pretrained: none, untrained heads) is the same in every process
    model = build_model(cfg.model, class_names=source.class_names)
    if checkpoint:
        load_weights(model, state, checkpoint)
    results = test_model(cfg, model, device, checkpoint=checkpoint)
    if distributed.is_main():
        write_json(out, results)
        print(f"fold {cfg.data.fold}, {cfg.data.shots}-shot ({out}):\n{format_results(results, source.class_names)}")
        if cfg.eval.overlays:
            save_overlays(cfg, model, device, out.with_suffix("").parent / f"{out.stem}_overlays")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (differences from fewshot/config.py defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.fold=1 data.shots=5")
    parser.add_argument("--checkpoint", default="", help="best.safetensors; '{fold}' is replaced by the fold")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to test (default: data.fold)")
    parser.add_argument("--shots", type=int, nargs="+", help="shots to test (default: data.shots)")
    parser.add_argument("--out", required=True, help="results.json, or a folder when several folds/shots run")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        base = load_config(args.config, args.overrides)
        runs = [(f, k) for f in args.folds or [base.data.fold] for k in args.shots or [base.data.shots]]
        for fold, shots in runs:
            data = dataclasses.replace(base.data, fold=fold, shots=shots)
            out = Path(args.out) if len(runs) == 1 else Path(args.out) / f"fold{fold}_{shots}shot.json"
            run_one(dataclasses.replace(base, data=data), args.checkpoint.replace("{fold}", str(fold)), out)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        log.error("%s", err)
        return 2
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
