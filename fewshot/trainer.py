"""Training a head on a fold's base classes, validating on its novel classes, with exact resume.

Episode i of training is a pure function of (seed, i), and step s always takes episodes
[(s * world + rank) * B, (s * world + rank + 1) * B): so a resumed run sees exactly the data an uninterrupted one sees.
With a training feature cache (frozen backbone, data.augment.views > 0 or no augmentation) every image view the
remaining steps use is encoded once up front, its masks transformed once (fewshot.cache.Encoder.prepare over the
steps' episodes), and the steps then run from memory without loading anything; validation does the same with its
own cache. Steps and validation go through the one episode path (fewshot.engine.encode_episodes, forward_episodes).

last.pt is written only at step boundaries, where it is exact: every train.checkpoint_every steps, at the end, when
SIGINT or SIGTERM (Ctrl-C, SLURM preemption, docker stop) asks the run to stop, and after an error between steps. A
loss or a weight that is no longer finite stops the run before anything more is validated or saved.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import episodes

from . import distributed
from .cache import build_encoder, loader_workers
from .checkpoint import load_training_state, rng_state, save_training_state, save_weights, set_rng_state
from .config import Config, dump_yaml
from .engine import TrainStep, autocast, place_model, resolve_device, to_device
from .evaluation import Scoring, episode_loader, eval_workers, evaluate, shard_indices
from .io import append_jsonl
from .losses import build_loss
from .metrics import FewShotIoU
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .runs import check_resumable, prepare_run_dir, truncate_metrics

log = logging.getLogger(__name__)


class StepBatches(torch.utils.data.Sampler):
    """Index batches of steps `start .. max_iters - 1` for this process (see the module docstring)."""

    def __init__(self, start: int, max_iters: int, batch_size: int):
        self.start, self.max_iters, self.batch_size = start, max_iters, batch_size

    def __len__(self) -> int:
        return max(0, self.max_iters - self.start)

    def __iter__(self):
        world, rank, B = distributed.world_size(), distributed.rank(), self.batch_size
        for step in range(self.start, self.max_iters):
            first = (step * world + rank) * B
            yield list(range(first, first + B))


def train_loader(dataset: Dataset, start: int, cfg: Config, device: torch.device) -> DataLoader:
    """The batches of steps `start` .. train.max_iters - 1 of this process, in step order."""
    return DataLoader(
        dataset,
        batch_sampler=StepBatches(start, cfg.train.max_iters, cfg.train.batch_size),
        num_workers=loader_workers(dataset, cfg.data.num_workers),
        collate_fn=episodes.collate_episodes,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
    )


class TrainingDiverged(FloatingPointError):
    """The loss or the weights are no longer finite; the run stopped without saving anything of that state."""


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped the run at a step boundary, after it saved an exact last.pt."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class FiniteWatch:
    """Notes the first step whose loss is inf / NaN on the device (no host sync per step) and checks it, with the
    weights, before anything is logged, validated or saved."""

    NONE = torch.iinfo(torch.int64).max

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)  # first non-finite step
        self.loss = torch.zeros((), device=device)  # its loss

    def update(self, loss: Tensor, step: int) -> None:
        loss = loss.detach().float()
        new = ~torch.isfinite(loss) & (self.first == self.NONE)
        self.first = torch.where(new, step, self.first)
        self.loss = torch.where(new, loss, self.loss)

    def check(self, step: int, weights: list[Tensor], saved: int | None, agree: bool = True) -> None:
        """Raises TrainingDiverged when a loss so far or one of `weights` is not finite; `saved` is the step last.pt
        holds. With `agree` (a collective under torchrun) the losses of every process count, else this one's."""
        first = self.first.clone()
        if agree and distributed.is_distributed():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if int(first) != self.NONE:
            loss = self.loss.item() if int(first) == int(self.first) else "not finite (in another process)"
            what = f"the loss is {loss} at step {int(first)}"
        elif weights and not bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()):
            what = f"the weights are no longer finite by step {step} (an update diverged)"
        else:
            return
        kept = f"last.pt holds step {saved}" if saved is not None else "no last.pt was written"
        optim, amp = self.cfg.optim, self.cfg.train.amp
        tries = [f"a lower optim.lr (now {optim.lr:g})"]
        tries.append(f"a lower optim.grad_clip (now {optim.grad_clip:g})" if optim.grad_clip > 0 else
                     "gradient clipping (optim.grad_clip=1.0)")
        tries += [f"train.amp=none (now {amp})"] if amp != "none" else []
        raise TrainingDiverged(
            f"training diverged: {what}; nothing from then on was saved ({kept}). Try {', '.join(tries[:-1])} or "
            f"{tries[-1]}, and start over with run.overwrite=true"
        )


class StopSignals:
    """From its creation to `restore()`, SIGINT and SIGTERM ask the train loop to stop at the next step boundary
    instead of killing it mid-step; a second signal acts as it did before (KeyboardInterrupt, termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device):
        self.device, self.signum, self.previous = device, 0, {}
        if threading.current_thread() is threading.main_thread():  # handlers can be set in the main thread only
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def requested(self) -> int:
        """The signal that asks to stop, 0 for none; under torchrun agreed by all processes (they stop together)."""
        if not distributed.is_distributed():
            return self.signum
        flag = torch.tensor(self.signum, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


class TensorBoard:
    """TensorBoard scalars when the tensorboard package is installed (`pip install -e .[tensorboard]`)."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: logging to metrics.jsonl only")
            self.writer = None
        else:
            self.writer = SummaryWriter(str(run_dir / "tb"))

    def add(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["step"])


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Trains per `cfg`, writing config.yaml, metrics.jsonl, best.safetensors and last.pt into `run.dir`."""
    device = distributed.init_distributed(resolve_device(cfg.device))
    episodes.validate_fold(cfg.data)  # before the run directory is written: a wrong fold leaves nothing behind
    run_dir = prepare_run_dir(cfg, resume)
    main = distributed.is_main()
    torch.manual_seed(cfg.seed)
    train_set = episodes.build_train_dataset(cfg.data, seed=cfg.seed)
    val_set = episodes.build_val_dataset(cfg.data, episodes=cfg.train.val_episodes, seed=cfg.train.val_seed)
    _, novel = val_set.source.fold_classes(cfg.data.fold)
    model = build_model(cfg.model, class_names=train_set.source.class_names, device=device)
    model = place_model(model, device, cfg.train.amp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim) if params else None
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_iters) if params else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    step, best = 0, {"miou": -1.0, "step": -1}
    if resume:
        state = load_training_state(run_dir / "last.pt")
        check_resumable(state["config"], cfg, run_dir / "last.pt")
        model.load_state_dict(state["model"], strict=False)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, best = state["step"], state["best"]
        set_rng_state(state["rng"])
        if main and (dropped := truncate_metrics(run_dir / "metrics.jsonl", step)):
            log.info("metrics.jsonl: dropped %d records after step %d, which this run writes again", dropped, step)
        log.info("resumed from %s at step %d", run_dir / "last.pt", step)
    saved = step if resume else None  # the step last.pt holds
    watch = FiniteWatch(cfg, device)
    weights = params + [b for b in model.buffers() if b.is_floating_point()]

    train_encoder = build_encoder(cfg, model, train_set)  # cached: frozen backbone, deterministic views (exact)
    val_encoder = build_encoder(cfg, model, val_set)
    eval_batch = cfg.eval.batch_size * (1 + cfg.data.shots)
    [val_episodes] = val_encoder.prepare(
        [val_set], [shard_indices(len(val_set))], eval_batch, eval_workers(cfg, device), device, cfg.eval.amp
    )
    step_module = TrainStep(model, build_loss(cfg.loss), train_encoder)
    if distributed.world_size() > 1 and params:
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    board = TensorBoard(run_dir) if main else None

    def log_record(record: dict[str, Any]) -> None:
        if main:
            append_jsonl(run_dir / "metrics.jsonl", record)
            board.add(record)

    scoring = Scoring.from_config(cfg.data)

    def validate(split: str = "val") -> dict[str, Any]:
        metric = FewShotIoU(novel, device=device)
        loader = episode_loader(val_episodes, cfg, device)
        scores = evaluate(model, val_encoder, loader, metric, scoring, device, cfg.eval.amp, desc=split)
        log_record({"step": step, "split": split, "miou": scores["miou"], "fbiou": scores["fbiou"]})
        log.info("step %d: %s mIoU %.1f  FB-IoU %.1f", step, split, scores["miou"], scores["fbiou"])
        return scores

    def checkpoint(agree: bool = True) -> None:
        nonlocal saved
        if saved == step:
            return
        watch.check(step, weights, saved, agree)
        if main:
            save_training_state(
                run_dir / "last.pt",
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer else None,
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "best": best,
                    "rng": rng_state(),
                    "config": dump_yaml(cfg),
                },
            )
        saved = step

    untrained = None
    if step == 0 and not resume:
        untrained = validate("val_untrained")
        if not params:  # training-free head: nothing to optimise, the untrained model is the model
            best = {"miou": untrained["miou"], "step": 0}
            if main:
                save_weights(run_dir / "best.safetensors", model, cfg, {"step": 0, "val_miou": untrained["miou"]})
            checkpoint()
            val_encoder.flush()
            return {"best": best, "untrained": untrained, "step": 0}

    steps = StepBatches(step, cfg.train.max_iters, cfg.train.batch_size)  # this process's remaining steps
    [train_episodes] = train_encoder.prepare(
        [train_set], [[i for batch in steps for i in batch]], cfg.train.batch_size * (1 + cfg.data.shots),
        cfg.data.num_workers, device, cfg.train.amp,
    )  # fmt: skip
    loader = train_loader(train_episodes, step, cfg, device)
    step_module.train()
    progress = tqdm(total=cfg.train.max_iters, initial=step, desc="train", disable=not main)
    tick, seen, at_boundary, stopped = time.perf_counter(), 0, True, 0
    stop = StopSignals(device)
    try:
        for batch in loader:
            at_boundary = False
            batch = to_device(batch, device)
            with autocast(cfg.train.amp, device):
                loss = step_module(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            watch.update(loss, step)
            seen += batch["query_mask"].shape[0] * distributed.world_size()
            progress.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_iters:
                watch.check(step, weights, saved)
                rate = seen / (time.perf_counter() - tick)
                progress.set_postfix(loss=f"{loss.item():.3f}", eps=f"{rate:.1f}")
                log_record({"step": step, "split": "train", "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                            "episodes_per_s": rate})
                tick, seen = time.perf_counter(), 0
            if step % cfg.train.val_every == 0 or step == cfg.train.max_iters:
                watch.check(step, weights, saved)
                scores = validate()
                if scores["miou"] > best["miou"]:
                    best = {"miou": scores["miou"], "step": step}
                    if main:
                        save_weights(run_dir / "best.safetensors", model, cfg, {"step": step, "val_miou": best["miou"]})
                step_module.train()
            if step % cfg.train.checkpoint_every == 0:
                checkpoint()
            at_boundary = True
            if stopped := stop.requested():
                break
    except BaseException:
        if at_boundary:  # an error between steps (loading a batch, a second Ctrl-C): last.pt is exact there
            checkpoint(agree=False)  # no collective: the other processes may not be here
        raise
    finally:
        stop.restore()
        progress.close()
    checkpoint()  # at the end, or where a signal stopped the loop
    if stopped and step < cfg.train.max_iters:
        raise TrainingInterrupted(
            stopped,
            f"stopped by {signal.Signals(stopped).name} at step {step}: {run_dir / 'last.pt'} holds an exact "
            "resumable state; continue the run with the same command plus --resume",
        )
    for encoder in (train_encoder, val_encoder):
        encoder.flush()  # disk entries written, checksums checked
    distributed.barrier()
    return {"best": best, "untrained": untrained, "step": step}
