"""The training loop: nanoGPT's train.py as a library, plus exact resume, preemption and divergence checks.

Single process:  python train.py config/train_shakespeare_char.py
DDP:             torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
"""
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt.checkpoint import (
    OutDirLock,
    all_finite,
    first_line,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_tensors,
)
from nanogpt.config import TrainConfig, explicit_keys, validate_train
from nanogpt.data import BatchLoader, dataset_dir, load_meta, vocabulary_file
from nanogpt.errors import CheckpointError, TrainingDiverged
from nanogpt.loading import model_from_checkpoint, model_from_pretrained
from nanogpt.model import GPT, GPTConfig, model_args
from nanogpt.pretrained import resolve_folder
from nanogpt.runtime import setup_runtime

# what defines a resumed model, from its checkpoint: its shape and the options of today's GPTs (a checkpoint older
# than an option lacks its key and keeps the option's default, off)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias") + GPTConfig.OPTIONS


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup (never 0 at it=0), cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    decay_ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits (clusters preempt with SIGTERM)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second one: the user does not want to wait for the step to finish
            self.uninstall()
            print(f"error: {signal.Signals(signum).name} again: exiting now without saving (the checkpoint on disk "
                  f"is the last one written; resume from it with --init_from=resume)", file=sys.stderr)
            raise SystemExit(130)
        self.signum = signum


class Trainer:

    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log
        self._setup_distributed()
        validate_train(cfg, self.world_size)
        self.master = self.rank == 0
        if not self.master:
            self.log = lambda *args: None  # only rank 0 speaks
        self.out_dir = Path(cfg.out_dir)
        # one training run per out_dir, before any work: rank 0 holds the lock for the job (eval_only writes nothing)
        self._out_dir_lock = OutDirLock(self.out_dir).acquire() if self.master and not cfg.eval_only else None
        try:
            if self.master and not cfg.eval_only and cfg.init_from != "resume":
                self._keep_existing_checkpoints()
            self._build()
        except BaseException:
            self._release_out_dir()
            raise

    def _keep_existing_checkpoints(self):
        """A new run (scratch or GPT-2 weights) in an out_dir that holds another run's checkpoint would overwrite
        it at its first save: refuse, unless --overwrite=True, which first moves the old files aside."""
        existing = [p for p in (self.out_dir / "ckpt.pt", self.out_dir / "best.pt") if p.exists()]
        if not existing:
            return
        if not self.cfg.overwrite:
            raise CheckpointError(f"{existing[0]} exists: --init_from={self.cfg.init_from} would overwrite it; "
                                  f"continue it with --init_from=resume, choose another --out_dir, or pass "
                                  f"--overwrite=True (moves the old checkpoint aside first)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in existing:
            aside = path.with_name(f"{path.stem}.{stamp}.{os.getpid()}.old.pt")
            try:
                os.replace(path, aside)
            except OSError as e:
                raise CheckpointError(f"could not move {path} aside: {e.strerror} (fix the permissions of "
                                      f"{self.out_dir}, or choose another --out_dir)") from None
            self.log(f"--overwrite=True: moved the old {path.name} to {aside}")

    def _build(self):
        cfg = self.cfg
        self.grad_accum = cfg.gradient_accumulation_steps // self.world_size

        # different dropout per rank; batches have their own stream
        rt = setup_runtime(self.device if self.ddp else cfg.device, cfg.dtype, seed=cfg.seed + self.rank)
        self.device, self.device_type, self.dtype = rt.device, rt.device_type, rt.dtype
        self.autocast = rt.autocast

        if cfg.init_from not in ("scratch", "resume"):
            resolve_folder(cfg.init_from)  # GPT-2 weights first: without them (offline), fail before preparing data
        self.data_dir = dataset_dir(cfg.dataset)
        self._ensure_dataset()
        meta = load_meta(self.data_dir)
        self.meta_vocab_size = meta["vocab_size"] if meta else None
        self.meta_name = vocabulary_file(self.data_dir).name if meta else None

        self.iter_num = 0
        self.best_val_loss = float("inf")
        ckpt = self._init_model()
        self.tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size  # block_size: final
        self.loader = BatchLoader(self.data_dir, cfg.block_size, cfg.batch_size, self.device, seed=cfg.seed,
                                  rank=self.rank, world_size=self.world_size, vocab_size=self.model.config.vocab_size)
        self.model.to(self.device)
        # GradScaler only does something for float16; with other dtypes it is a no-op
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=(self.dtype == "float16"))
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                         (cfg.beta1, cfg.beta2), self.device_type)
        if ckpt is not None:
            self._restore_training_state(ckpt)
        del ckpt

        self.raw_model = self.model
        if cfg.compile:
            self.log("compiling the model... (takes a ~minute)")
            self.model = torch.compile(self.model)
        if self.ddp:
            self.model = DDP(self.model, device_ids=[self.local_rank] if self.device_type == "cuda" else None)
        self.wandb = None
        self.history = []  # (iter, train loss of the step) for every logged step

    # ------------------------------------------------------------------------------------------
    # setup

    def _setup_distributed(self):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if not self.ddp:
            self.rank, self.local_rank, self.world_size = 0, 0, 1
            return
        import torch.distributed as dist
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available() and self.cfg.device != "cpu"
        self.device = f"cuda:{self.local_rank}" if use_cuda else "cpu"
        dist.init_process_group(backend=self.cfg.backend if use_cuda else "gloo",
                                timeout=timedelta(seconds=self.cfg.ddp_timeout))

    def _ensure_dataset(self):
        if (self.data_dir / "train.bin").exists():
            return
        if self.cfg.dataset not in ("shakespeare_char", "shakespeare"):
            return  # BatchLoader names the command that prepares it
        if self.master:
            from nanogpt.data import prepare_once
            prepare_once(self.cfg.dataset, root=self.data_dir.parent,
                         log=lambda: self.log(f"dataset {self.cfg.dataset} not found in {self.data_dir.parent}: "
                                              f"preparing it now"))
        self._barrier()

    def _barrier(self):
        if self.ddp:
            import torch.distributed as dist
            dist.barrier()

    def _init_model(self):
        cfg = self.cfg
        ckpt = None
        if cfg.init_from == "scratch":
            args = model_args(cfg, vocab_size=self.meta_vocab_size or 50304)
            if self.master:
                vocab_from = self.meta_name if self.meta_vocab_size else "GPT-2's 50257 padded to 50304"
                self.log(f"initializing a new model from scratch (vocab_size {args['vocab_size']} from {vocab_from})")
            self.model = GPT(GPTConfig(**args))
        elif cfg.init_from == "resume":
            path = self.out_dir / "ckpt.pt"
            self.log(f"resuming training from {path}")
            ckpt = load_checkpoint(path)
            self._adopt_checkpoint_shape(ckpt["model_args"], path)
            if self.meta_vocab_size is not None and ckpt["model_args"].get("vocab_size") != self.meta_vocab_size:
                raise CheckpointError(f"{path} was trained with vocab_size {ckpt['model_args'].get('vocab_size')}, "
                                      f"but dataset {cfg.dataset} has {self.meta_vocab_size}: resume it on its own "
                                      f"dataset or start a new out_dir")
            self.model = model_from_checkpoint(ckpt, path, attn=cfg.attn, dropout=cfg.dropout,
                                               fused_loss_head=cfg.fused_loss_head)
        else:  # validate_train has checked the name and that block_size fits its positions
            self.log(f"initializing from OpenAI GPT-2 weights: {cfg.init_from}")
            self.model = model_from_pretrained(cfg.init_from, dropout=cfg.dropout, attn=cfg.attn,
                                               block_size=cfg.block_size, fused_loss_head=cfg.fused_loss_head)
        return ckpt

    def _adopt_checkpoint_shape(self, ckpt_args, path):
        """nanoGPT's resume: the model's shape comes from the checkpoint. A shape key set explicitly (command line,
        config file) to another value is an error naming both; an unset one takes the checkpoint's value, so that
        the config saved with the next checkpoint describes the model it holds."""
        cfg = self.cfg
        explicit = explicit_keys(cfg)
        conflicts = [f"{k}: checkpoint {ckpt_args[k]!r} vs --{k}={getattr(cfg, k)!r}" for k in SHAPE_KEYS
                     if k in ckpt_args and k in explicit and ckpt_args[k] != getattr(cfg, k)]
        if conflicts:
            raise CheckpointError(f"{path} holds a model of another shape than the config asks for "
                                  f"({'; '.join(conflicts)}): a resumed model keeps its shape; drop these keys, or "
                                  f"start a new --out_dir")
        for k in SHAPE_KEYS:
            if k in ckpt_args:
                setattr(cfg, k, ckpt_args[k])

    def _restore_training_state(self, ckpt):
        path = self.out_dir / "ckpt.pt"
        missing = [k for k in ("optimizer", "iter_num", "best_val_loss") if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: it holds weights only, not a training state "
                                  f"to resume (sample from it, or start a new run in another --out_dir)")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            if "rng" in ckpt:
                set_rng_state(ckpt["rng"])  # rank 0's streams: exact resume for a single process
            if "sampler" in ckpt:
                self.loader.set_state(ckpt["sampler"])
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{path}: its optimizer or random state does not fit this model "
                                  f"({first_line(e)}): use another copy, or start a new run in another "
                                  f"--out_dir") from None
        self.iter_num = ckpt["iter_num"]
        self.best_val_loss = ckpt["best_val_loss"]
        if "rng" in ckpt and self.rank:  # other ranks: fresh dropout streams of their own
            torch.manual_seed(self.cfg.seed + self.rank + 7919 * self.iter_num)

    # ------------------------------------------------------------------------------------------
    # evaluation, checkpoints

    @torch.no_grad()
    def estimate_loss(self):
        """Mean loss over eval_iters batches per split, on a fixed stream of batches (the same each time)."""
        out = {}
        self.raw_model.eval()
        for split in ("train", "val"):
            generator = torch.Generator().manual_seed(self.cfg.seed + 1)
            losses = torch.zeros(self.cfg.eval_iters)
            for k in range(self.cfg.eval_iters):
                X, Y = self.loader.eval_batch(split, generator)
                with self.autocast:
                    _, loss = self.raw_model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        self.raw_model.train()
        return out

    def checkpoint_state(self):
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "model_args": asdict(self.raw_model.config),  # every GPTConfig key
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "config": asdict(self.cfg),
            "rng": rng_state(),
            "sampler": self.loader.get_state(),
        }

    def save(self, *names):
        """Write the current state once gathered to each of names (default ckpt.pt); return the first path.
        Only a finite state is written: weights or optimizer moments that became NaN/Inf between two logged
        losses would otherwise replace the last good checkpoint."""
        state = self.checkpoint_state()
        if not all_finite(state_tensors((state["model"], state["optimizer"]))):
            raise TrainingDiverged(
                f"the weights or optimizer state became NaN/Inf by iteration {self.iter_num - 1}: not saved, the "
                f"checkpoints in {self.out_dir} are from before it (lower --learning_rate, raise --warmup_iters, "
                f"or use --dtype=bfloat16/float32)")
        paths = [self.out_dir / name for name in (names or ("ckpt.pt",))]
        for path in paths:
            self.log(f"saving checkpoint to {path}")
            save_checkpoint(state, path)
        return paths[0]

    # ------------------------------------------------------------------------------------------
    # the loop

    def _check_finite(self, value, what, iteration):
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"{what} became {value} at iteration {iteration}: training stopped; the checkpoints in "
                f"{self.out_dir} are from before it (lower --learning_rate, raise --warmup_iters, or use "
                f"--dtype=bfloat16/float32)")

    @staticmethod
    def _mfu_field(running_mfu):
        return {"mfu": running_mfu * 100} if running_mfu >= 0 else {}  # unknown peak: no number at all

    def _init_wandb(self):
        if self.cfg.wandb_log and self.master:
            import wandb  # validate_train has checked that it is installed
            self.wandb = wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name,
                                    config=asdict(self.cfg))

    def train(self):
        cfg = self.cfg
        if self.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log(f"tokens per iteration will be: {self.tokens_per_iter:,} "
                     f"({cfg.gradient_accumulation_steps} accumulation x {cfg.batch_size} batch x "
                     f"{cfg.block_size} block, {self.world_size} process(es))")
        self._init_wandb()
        stop = _StopRequest()
        stop.install()
        try:
            return self._loop(stop)
        finally:
            stop.uninstall()
            if self.wandb is not None:
                self.wandb.finish()

    def _loop(self, stop):
        """nanoGPT's loop, one named step per line: set the learning rate, evaluate and checkpoint, train one
        optimizer step, log, stop on a signal, stop at max_iters."""
        cfg = self.cfg
        self._t0 = time.time()
        self._local_iter_num = 0
        self._running_mfu = -1.0
        saved_at = None
        while True:
            lr = self._set_learning_rate()
            if (self.iter_num % cfg.eval_interval == 0 or cfg.eval_only) and self.master:
                if self._evaluate_and_checkpoint(lr):
                    saved_at = self.iter_num
            if cfg.eval_only:
                break

            loss_sum = self._train_step()
            dt = self._finish_iteration()
            stop_requested = self._log_step(loss_sum, dt, lr, stop.signum is not None)
            if stop_requested:
                return self._stop_and_save(stop)
            if self.iter_num > cfg.max_iters:
                break

        if self.master and not cfg.eval_only and saved_at != self.iter_num and self.iter_num > 0:
            self.save("ckpt.pt")  # the final state, so the last iterations are never lost
        self._barrier()
        return {"stopped": False, "iter_num": self.iter_num, "best_val_loss": self.best_val_loss,
                "history": self.history}

    def _set_learning_rate(self):
        lr = get_lr(self.iter_num, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _evaluate_and_checkpoint(self, lr) -> bool:
        """Rank 0: estimate both losses, log them, write ckpt.pt (and best.pt). True if a checkpoint was written."""
        cfg = self.cfg
        losses = self.estimate_loss()
        self.log(f"step {self.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self._check_finite(losses["val"], "the validation loss", self.iter_num)
        if self.wandb is not None:
            self.wandb.log({"iter": self.iter_num, "train/loss": losses["train"], "val/loss": losses["val"],
                            "lr": lr, **self._mfu_field(self._running_mfu)})
        improved = losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss = losses["val"]
        if self.iter_num > 0 and not cfg.eval_only:
            # ckpt.pt: the latest state to resume from; best.pt: the best model, kept apart when
            # always_save_checkpoint=False
            best_too = improved and not cfg.always_save_checkpoint
            self.save("ckpt.pt", *(["best.pt"] if best_too else []))
            return True
        return False

    def _train_step(self):
        """One optimizer step over grad_accum micro-batches. Returns the mean loss as a device tensor: reading
        it would wait for the GPU, so only logging does."""
        loss_sum = torch.zeros((), device=self.device)
        for micro_step, (X, Y) in enumerate(self.loader.train_step(self.grad_accum)):
            last = micro_step == self.grad_accum - 1
            # DDP: synchronize gradients only after the last micro-step
            sync = self.model.no_sync() if (self.ddp and not last) else nullcontext()
            with sync:
                with self.autocast:
                    _, loss = self.model(X, Y)
                    loss = loss / self.grad_accum  # the mean over the accumulated micro-batches
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if self.cfg.grad_clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def _finish_iteration(self):
        """Count the iteration; return its wall time."""
        t1 = time.time()
        dt, self._t0 = t1 - self._t0, t1
        self.iter_num += 1
        self._local_iter_num += 1
        return dt

    def _log_step(self, loss_sum, dt, lr, stop_flag: bool) -> bool:
        """At log intervals: read the loss (the loop's one CPU-GPU sync), check it, log it. Returns whether to
        stop now. Under DDP a signal may reach one rank only, so the ranks agree on it in the all-reduce that
        averages the loss, at log steps only: no extra collective and no sync in the other steps."""
        cfg = self.cfg
        it = self.iter_num - 1
        if it % cfg.log_interval:
            return stop_flag and not self.ddp
        if self.ddp:
            import torch.distributed as dist
            flag = torch.ones((), device=self.device) if stop_flag else torch.zeros((), device=self.device)
            reduced = torch.stack([loss_sum, flag])
            dist.all_reduce(reduced)  # SUM (gloo has no AVG): the mean loss, and how many ranks were signalled
            lossf, n_signalled = reduced.tolist()
            lossf /= self.world_size
            stop_flag = n_signalled > 0
        else:
            lossf = loss_sum.item()
        self._check_finite(lossf, "the training loss", it)
        self.history.append((it, lossf))
        if self.master:
            if self._local_iter_num >= 5:  # let the training loop settle a bit
                mfu = self.raw_model.estimate_mfu(cfg.batch_size * self.grad_accum, dt,
                                                  peak_flops=cfg.peak_flops or None)
                if mfu is not None:
                    self._running_mfu = mfu if self._running_mfu == -1.0 else 0.9 * self._running_mfu + 0.1 * mfu
            mfu_text = f"{self._running_mfu * 100:.2f}%" if self._running_mfu >= 0 else "n/a"
            self.log(f"iter {it}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, "
                     f"{self.tokens_per_iter / dt:,.0f} tok/s, mfu {mfu_text}")
            if self.wandb is not None:
                self.wandb.log({"iter": it, "train/loss_step": lossf, "lr": lr,
                                "tokens_per_sec": self.tokens_per_iter / dt, **self._mfu_field(self._running_mfu)})
        return stop_flag

    def _stop_and_save(self, stop):
        """SIGTERM/SIGINT: the step is done; rank 0 saves and says how to resume; every rank returns."""
        if self.master:
            path = self.save("ckpt.pt")
            self.log(f"received {signal.Signals(stop.signum).name if stop.signum else 'a stop signal'}: "
                     f"stopped after iteration {self.iter_num - 1}; checkpoint in {path}. Resume with: "
                     f"python train.py ... --out_dir={self.cfg.out_dir} --init_from=resume")
        self._barrier()
        return {"stopped": True, "iter_num": self.iter_num, "history": self.history}

    def _release_out_dir(self):
        if self._out_dir_lock is not None:
            self._out_dir_lock.release()
            self._out_dir_lock = None

    def close(self):
        self._release_out_dir()
        if self.ddp:
            import gc

            import torch.distributed as dist
            # DDP's reducer holds the process group and its last work objects: dropped here, the group's gloo
            # threads are joined by destroy_process_group. Left to the interpreter's exit, they were once torn
            # down unjoined ("terminate called without an active exception", SIGABRT after a complete run:
            # bench/results/NOTES.md, sessions 29 and 32)
            self.model = self.raw_model
            gc.collect()
            dist.destroy_process_group()
