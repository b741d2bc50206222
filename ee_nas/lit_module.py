"""MultiExitModule trains the weight-sharing early-exit supernet; FinetuneModule, a chosen static network.

Each step trains several subnets by the sandwich rule (largest, smallest,
`n_random` random), each with a branch at every tap it keeps, and sums their
per-exit cross-entropy losses: final exit weighted `final_weight`, the mean of
the early exits weighted `early_weight`; optional self-distillation pulls every
exit towards the largest subnet's final prediction.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics.classification import MulticlassAccuracy

from ee_nas.models.bn import recalibrate_bn
from ee_nas.utils import mix_seed


class NonFiniteLossError(RuntimeError):
    """The training loss or the weights became NaN/inf: training stops, the last good checkpoint stays."""


def non_finite_tensors(state_dict) -> list[str]:
    """Names of the floating-point tensors of `state_dict` that hold a NaN or an inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


class MultiExitModule(L.LightningModule):
    label_smoothing = 0.0  # of every exit's cross-entropy (probes override it)

    def __init__(self, supernet, optimizer, scheduler=None, n_random: int = 1, final_weight: float = 1.0,
                 early_weight: float = 1.0, distill_weight: float = 0.0, distill_temperature: float = 2.0,
                 channels_last: bool = False, branch_lr_scale: float = 1.0, exit_grad_scale: float = 1.0,
                 exit_grad_from: str = "all", calibration_samples: int = 512, seed: int = 0):
        super().__init__()
        self.supernet, self.space = supernet, supernet.space
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        self.n_random, self.final_weight, self.early_weight = n_random, final_weight, early_weight
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature
        self.branch_lr_scale = branch_lr_scale
        if not 0.0 <= exit_grad_scale <= 1.0:
            raise ValueError(f"training.exit_grad_scale={exit_grad_scale} must lie in [0, 1]")
        if exit_grad_from not in ("all", "largest"):
            raise ValueError(f"training.exit_grad_from={exit_grad_from!r} must be 'all' or 'largest'")
        self.supernet.exit_grad_scale, self.exit_grad_from = exit_grad_scale, exit_grad_from
        # NHWC weights and activations: mkldnn's depthwise-conv backward, most of a CPU step, runs faster
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.supernet.to(memory_format=self.memory_format)
        self.calibration_samples = calibration_samples
        self.rng = np.random.default_rng(seed)
        self.eval_genome = self.space.largest()
        n_eval = self.eval_genome.n_exits
        num_classes = supernet.backbone.num_classes
        self.val_acc = torch.nn.ModuleList([MulticlassAccuracy(num_classes, average="micro") for _ in range(n_eval)])
        self.save_hyperparameters(ignore=["supernet"])

    def forward(self, x, genome=None):
        return self.supernet(x, genome or self.eval_genome)

    def exit_loss(self, logits: list[torch.Tensor], y: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        losses = [F.cross_entropy(z, y, label_smoothing=self.label_smoothing) for z in logits]
        loss = self.final_weight * losses[-1]
        if len(losses) > 1:
            loss = loss + self.early_weight * torch.stack(losses[:-1]).mean()
        if teacher is not None and self.distill_weight > 0:
            t = self.distill_temperature
            soft = F.softmax(teacher / t, dim=1)
            kd = torch.stack([F.kl_div(F.log_softmax(z / t, dim=1), soft, reduction="batchmean") for z in logits])
            loss = loss + self.distill_weight * t * t * kd.mean()
        return loss

    def on_train_start(self):
        """DDP: every rank must train the same subnets in a step (conf/trainer/ddp.yaml explains why), so
        every rank continues rank 0's subnet sampler (seeded, or restored from the checkpoint)."""
        if self.trainer.world_size > 1:
            self.rng.bit_generator.state = self.trainer.strategy.broadcast(self.rng.bit_generator.state)

    def on_train_batch_start(self, batch, batch_idx):
        """Dropout and other torch randomness of this step depend on (seed, epoch, batch) only, so a run
        resumed from a checkpoint repeats an uninterrupted one exactly (data order: `EpochShuffle`)."""
        torch.manual_seed(mix_seed(self.hparams.seed, self.current_epoch, batch_idx, self.global_rank))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.contiguous(memory_format=self.memory_format)
        genomes = self.space.training_genomes(self.rng, self.n_random)
        total, teacher = 0.0, None
        for i, genome in enumerate(genomes):
            # exit_grad_from=largest: the other subnets' exits learn on the backbone's features, not shape them
            logits = self.supernet(x, genome, None if i == 0 or self.exit_grad_from == "all" else 0.0)
            loss = self.exit_loss(logits, y, teacher)
            if i == 0:  # the largest subnet teaches the others
                teacher = logits[-1].detach()
                self.log("train/acc_final", (logits[-1].argmax(1) == y).float().mean(), prog_bar=True)
            total = total + loss
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"training loss became {total.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower training.optimizer.lr or check the data. The last good checkpoint is kept.")
        self.log("train/loss", total / len(genomes), prog_bar=True)
        return total / len(genomes)

    def on_validation_epoch_start(self):
        """Validate the largest subnet with BatchNorm statistics of its own (shared ones are stale)."""
        calibration = self.trainer.datamodule.split_tensors("train", max_samples=self.calibration_samples)[0]
        net = self.supernet.extract(self.eval_genome).to(self.device)
        # a plain attribute, not a submodule: the validation copy must not enter checkpoints
        object.__setattr__(self, "_val_net", recalibrate_bn(net, calibration.to(self.device)))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for k, z in enumerate(self._val_net(x)):
            self.val_acc[k].update(z, y)

    def on_validation_epoch_end(self):
        for k, metric in enumerate(self.val_acc):
            name = "final" if k == len(self.val_acc) - 1 else f"exit{k}"
            self.log(f"val/acc_{name}", metric.compute(), prog_bar=name == "final")
            metric.reset()
        self.__dict__.pop("_val_net", None)

    def branch_parameters(self) -> list:
        """The exit branches' parameters: they train at `branch_lr_scale` times the lr."""
        return list(self.supernet.branches.parameters())

    def configure_optimizers(self):
        branch = self.branch_parameters()
        in_branch = set(map(id, branch))
        shared = [p for p in self.parameters() if id(p) not in in_branch]
        groups = [{"params": shared, "name": "shared"}] + ([{"params": branch, "name": "branches"}] if branch else [])
        optimizer = instantiate(self.optimizer_cfg)(groups)
        if branch:  # each tap's loss enters the mean over all taps: its branch alone would learn too slowly
            optimizer.param_groups[1]["lr"] *= self.branch_lr_scale
        if not self.scheduler_cfg:
            return optimizer
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = instantiate(self.scheduler_cfg)(optimizer, T_max=max(1, epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint):
        """Keep the sampler state; refuse to overwrite the last good checkpoint with non-finite weights."""
        bad = non_finite_tensors(checkpoint["state_dict"])
        if bad:
            raise NonFiniteLossError(
                f"the supernet weights became non-finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                f"by epoch {self.current_epoch}, step {self.global_step}; not saving them. Lower "
                "training.optimizer.lr or check the data. The last good checkpoint is kept.")
        checkpoint["subnet_sampler_rng"] = self.rng.bit_generator.state

    def on_load_checkpoint(self, checkpoint):
        # checkpoints from before the validation copy was kept out of the state dict
        for key in [k for k in checkpoint["state_dict"] if k.startswith("_val_net.")]:
            del checkpoint["state_dict"][key]
        if "subnet_sampler_rng" in checkpoint:
            self.rng.bit_generator.state = checkpoint["subnet_sampler_rng"]


class FinetuneModule(L.LightningModule):
    """A static multi-exit subnet (ee_nas.finetune) trained with the supernet's loss (the same functions, not a
    copy); its few exits need no lr scaling. Every exit distils from `teacher`'s final exit (a frozen net in
    eval mode, e.g. the supernet's largest backbone) or, without one, from the subnet's own final exit."""

    exit_loss = MultiExitModule.exit_loss
    label_smoothing = MultiExitModule.label_smoothing
    configure_optimizers = MultiExitModule.configure_optimizers

    def __init__(self, net, optimizer, scheduler=None, final_weight: float = 1.0, early_weight: float = 1.0,
                 distill_weight: float = 0.0, distill_temperature: float = 2.0, channels_last: bool = False,
                 teacher: torch.nn.Module | None = None):
        super().__init__()
        self.net, self.optimizer_cfg, self.scheduler_cfg = net, optimizer, scheduler
        # a plain attribute, not a submodule: the teacher is neither optimized nor saved, and stays in eval mode
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False) if teacher is not None else None)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format  # as the supernet
        self.net.to(memory_format=self.memory_format)
        self.final_weight, self.early_weight = final_weight, early_weight
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature

    def branch_parameters(self) -> list:
        return []

    def forward(self, x):
        return self.net(x)

    def on_fit_start(self):
        # extracted nets come in eval mode and Lightning keeps a module's mode; before its check warns of them
        self.net.train()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x.contiguous(memory_format=self.memory_format))
        if self.teacher is None:
            target = logits[-1].detach()
        else:
            with torch.no_grad():
                target = self.teacher(x)[-1]
        loss = self.exit_loss(logits, y, target)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"fine-tuning loss became {loss.item()} at step {self.global_step}; "
                                     "lower lr=...")
        self.log("finetune/loss", loss, prog_bar=True)
        self.log("finetune/acc_final", (logits[-1].argmax(1) == y).float().mean())
        return loss
