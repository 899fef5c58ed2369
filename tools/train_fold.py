"""Train a few-shot head on one fold's base classes, validating on its novel classes.

    python tools/train_fold.py configs/demo.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node=N tools/train_fold.py CONFIG [key=value ...]

Writes into run.dir: config.yaml, metrics.jsonl, best.safetensors (weights + config), last.pt (resumable state).
Exit status: 0 done; 1 training diverged (inf / NaN); 2 bad input (config, files, run directory); 128 + N stopped by
signal N (SIGINT 130, SIGTERM 143) after saving last.pt, to continue with --resume.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fewshot import distributed
from fewshot.config import ConfigError, load_config
from fewshot.runs import setup_logging
from fewshot.trainer import TrainingDiverged, TrainingInterrupted, train

log = logging.getLogger("train_fold")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (differences from fewshot/config/schema.py defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.fold=1 optim.lr=5e-4")
    parser.add_argument("--resume", action="store_true", help="continue from run.dir/last.pt exactly")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        log.error("%s", err)
        return 2
    except TrainingDiverged as err:
        log.error("%s", err)
        return 1
    except TrainingInterrupted as err:
        log.warning("%s", err)
        return 128 + err.signum
    finally:
        distributed.cleanup()
    if distributed.is_main():
        untrained = result.get("untrained")
        if untrained is not None:
            print(f"fold {cfg.data.fold} val mIoU untrained: {untrained['miou']:.1f}")
        if result["best"]["step"] >= 0:
            best = result["best"]
            print(f"fold {cfg.data.fold} val mIoU best:      {best['miou']:.1f} (step {best['step']})")
        print(f"run directory: {cfg.run.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
