"""Test a model on the novel classes of one or all folds: per-class IoU, mIoU and FB-IoU into results.json.

    python tools/test_fold.py CONFIG [key=value ...] [--checkpoint PATH] --out results.json
    python tools/test_fold.py CONFIG --folds 0 1 2 3 --shots 1 5 \\
        --checkpoint 'runs/x_fold{fold}/best.safetensors' --out DIR
    torchrun --nproc_per_node=N tools/test_fold.py ...      (episodes sharded, metric sums all-reduced)

Without --checkpoint the model is built as configured (training-free heads, or an untrained baseline). With one run
--out is the results file; with several (fold, shots) it is a folder receiving fold{f}_{k}shot.json.

Before any work, every output location is checked, and a checkpoint is refused on a fold whose novel classes it was
trained on (the base classes of the fold in its stored config) unless --allow-trained-classes; the results' protocol
records the checkpoint's training dataset and fold, and the trained classes tested (fewshot.preflight).
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
from fewshot.backbones.weights import is_random
from fewshot.checkpoint import load_weights, read_checkpoint_config, read_weights
from fewshot.config import Config, ConfigError, load_config
from fewshot.engine import resolve_device
from fewshot.evaluation import evaluate_fold, format_results
from fewshot.io import write_json
from fewshot.model import build_model
from fewshot.overlays import save_overlays
from fewshot.preflight import check_output_file, check_output_folder, check_trained_classes
from fewshot.provenance import checkpoint_fields
from fewshot.runs import setup_logging

log = logging.getLogger("test_fold")


@dataclasses.dataclass
class Run:
    """One (fold, shots) test: its config, checkpoint ("" for none), results file and checkpoint protocol record."""

    cfg: Config
    checkpoint: str
    out: Path
    trained: dict


def overlay_dir(out: Path) -> Path:
    return out.with_suffix("").parent / f"{out.stem}_overlays"


def plan(args: argparse.Namespace, base: Config) -> list[Run]:
    """Every run of the command, checked before any of them starts: outputs writable, overlay indices in range, and
    each checkpoint's training classes against the tested fold."""
    pairs = [(f, k) for f in args.folds or [base.data.fold] for k in args.shots or [base.data.shots]]
    if len(pairs) > 1:
        check_output_folder(args.out, "--out")
    runs = []
    for fold, shots in pairs:
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, fold=fold, shots=shots))
        out = Path(args.out) if len(pairs) == 1 else Path(args.out) / f"fold{fold}_{shots}shot.json"
        check_output_file(out, "--out" if len(pairs) == 1 else "results file")
        records = cfg.data.episodes * cfg.data.ways
        if cfg.eval.overlays:
            bad = [i for i in cfg.eval.overlays if not 0 <= i < records]
            if bad:
                raise ValueError(f"eval.overlays: episodes {bad} do not exist; there are {records} episodes")
            check_output_folder(overlay_dir(out), "the overlays folder")
        checkpoint, trained = args.checkpoint.replace("{fold}", str(fold)), checkpoint_fields()
        if checkpoint:
            trained_cfg, _ = read_checkpoint_config(checkpoint)
            seen = check_trained_classes(
                build_source(evaluated(cfg.data)), fold, trained_cfg.data, checkpoint, allow=args.allow_trained_classes
            )
            trained = checkpoint_fields(trained_cfg.data, seen)
            if seen:
                log.warning("fold %d: testing classes %s that %s was trained on (--allow-trained-classes)", fold,
                            seen, checkpoint)  # fmt: skip
        runs.append(Run(cfg, checkpoint, out, trained))
    return runs


def run_one(run: Run) -> dict:
    cfg, checkpoint, out = run.cfg, run.checkpoint, run.out
    device = distributed.init_distributed(resolve_device(cfg.device))
    source = build_source(evaluated(cfg.data))  # the target's classes in a cross-domain run
    state = None
    if checkpoint:  # the checkpoint defines the model; how shots are fused stays a test-time choice
        state, trained_cfg, _ = read_weights(checkpoint)
        model_cfg = dataclasses.replace(trained_cfg.model, shot_fusion=cfg.model.shot_fusion)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    if is_random(cfg.model.backbone.pretrained):
        log.warning("model.backbone.pretrained=none: a randomly initialised backbone; results say so in 'protocol'")
    torch.manual_seed(cfg.seed)  # a random-init model (pretrained: none, untrained heads) is the same in every process
    model = build_model(cfg.model, class_names=source.class_names, device=device, state=state)  # no prompt re-encoded
    if checkpoint:
        load_weights(model, state, checkpoint)
    results = evaluate_fold(cfg, model, device, checkpoint=checkpoint, trained=run.trained)
    if distributed.is_main():
        write_json(out, results)
        print(f"fold {cfg.data.fold}, {cfg.data.shots}-shot ({out}):\n{format_results(results, source.class_names)}")
        if cfg.eval.overlays:
            save_overlays(cfg, model, device, overlay_dir(out))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (differences from fewshot/config/schema.py defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.fold=1 data.shots=5")
    parser.add_argument("--checkpoint", default="", help="best.safetensors; '{fold}' is replaced by the fold")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to test (default: data.fold)")
    parser.add_argument("--shots", type=int, nargs="+", help="shots to test (default: data.shots)")
    parser.add_argument("--out", required=True, help="results.json, or a folder when several folds/shots run")
    parser.add_argument(
        "--allow-trained-classes",
        action="store_true",
        help="test a checkpoint on a fold whose novel classes it was trained on (marked in the results)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        for run in plan(args, load_config(args.config, args.overrides)):
            run_one(run)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        log.error("%s", err)
        return 2
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
