"""The online probe / kNN monitor of pretraining: every N optimizer steps, a linear classifier and a cosine kNN
on mean-pooled features of the encoder being pretrained (solo-learn's online linear evaluation, DINO's kNN).

    trainer.callbacks: [OnlineProbe(data=AudioDataModule(...), every_n_steps=100)]   # probe/acc, probe/knn_acc

Legend: M memory (train) rows, Q queries, U items, D width, K classes, W ranks.
"""

from __future__ import annotations

import contextlib
import math
import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from omnissl.ops import mean_pool


def knn_predict(memory: Tensor, memory_labels: Tensor, queries: Tensor, *, k: int, num_classes: int,
                temperature: float | None = 0.07, chunk: int = 1024) -> Tensor:
    """Cosine k-nearest-neighbour classification. memory (M, D), memory_labels (M,), queries (Q, D) -> (Q,).

    Each query takes its k most cosine-similar memory rows; each neighbour votes for its label with weight
    exp(similarity / temperature) (DINO, Caron et al. 2021, and solo-learn's weighted kNN: k 20, T 0.07), or
    weight 1 with temperature=None (majority vote). The class with the largest vote wins; a tie goes to the
    smallest class index.
    """
    if not 1 <= k <= memory.shape[0]:
        raise ValueError(f"k={k} must be in [1, {memory.shape[0]}] (the memory size)")
    mem = F.normalize(memory.float(), dim=1)
    preds = []
    for q in F.normalize(queries.float(), dim=1).split(chunk):
        sims, idx = (q @ mem.T).topk(k, dim=1)  # (c, k)
        weights = torch.ones_like(sims) if temperature is None else (sims / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device).scatter_add_(1, memory_labels[idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def unique_by_id(ids: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """Keep the first row of every id and order rows by id: (ids (U,), rows (U, ...)...) -> same, deduplicated.
    Undoes the repeated items that distributed samplers pad shards with, and any dependence on the sharding."""
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
    return (uniq, *(r[first] for r in rows))


def gather_rows(strategy, rows: Tensor) -> list[Tensor]:
    """All-gather (n_rank, ...) tensors of different lengths from every rank -> list of W tensors."""
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = strategy.all_gather(count).flatten().tolist()
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = strategy.all_gather(padded)  # (W, max, ...)
    return [gathered[w, :c] for w, c in enumerate(counts)]


@contextlib.contextmanager
def isolated_rng(device: torch.device):
    """Run a block without touching the random state of the training run: torch (CPU and this CUDA device),
    Python's and NumPy's global generators are restored afterwards. (DataLoader iterators draw their base
    seed from the global torch generator, so merely iterating the probe's data would shift the run's
    dropout and masks otherwise.)"""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class OnlineProbe(Callback):
    """Watch pretraining through a labeled downstream task: every `every_n_steps` optimizer steps, train a
    linear classifier on detached, mean-pooled features of the pretraining encoder and evaluate it on the
    valid split, and classify the valid split by cosine kNN against the train split.

    Logs (next to train/loss, same step axis) `<name>/acc`, `<name>/loss` (valid accuracy and cross-entropy
    of the linear probe), `<name>/train_acc`, `<name>/train_loss` and `<name>/knn_acc`.

    data: a labeled DataModule (train and valid splits, `targets["label"]` in its batches), e.g.
        AudioDataModule with `embedded:keywords:small` manifests. It is prepared and set up by this callback,
        never by the Trainer, and its loaders are used as they are (give it `num_workers: 0` on small sets).
    layer: which of the encoder's L + 1 layer outputs to pool (-1: the last). modality: the Batch input to
        read (None: the batch's only one). num_classes: None takes the DataModule's `num_classes`.
    epochs / batch_size / lr / weight_decay: classifier training per probe (AdamW over mini-batches of the
        train split's features). The classifier and its optimizer persist from probe to probe (an online
        probe, as in solo-learn's online linear evaluation, which tracks the changing features) and are
        saved in the Lightning checkpoint with the step counters, so a resumed run continues the same probe.
    knn_k / knn_temperature: see `knn_predict` (defaults: DINO's 20 and 0.07).
    seed: the probe's own randomness (classifier init, mini-batch order), drawn from generators seeded by
        (seed, step); the training run's random state is left exactly as it was (`isolated_rng`), so a run
        with the probe trains the same weights as one without.
    name: metric prefix and checkpoint key (several probes can run side by side).

    Features: the encoder (`pl_module.encoder`) runs in eval mode under no_grad (then back to its mode), in the
    trainer's precision context; pooled features are standardized with the train split's mean and std
    before both the classifier and kNN.

    Distributed runs: every rank extracts the features of the batches its loader gives it (its shard, or all
    batches when the DataModule does not shard), the features are all-gathered and deduplicated by sample id,
    and every rank trains the same classifier from the same seed on the same features. So the ranks hold the
    same probe state (the checkpoint stores rank 0's), no rank waits on another inside a forward (FSDP2-sharded
    encoders work: every rank takes part in every forward), and the result does not depend on the world size.
    """

    def __init__(
        self,
        data: L.LightningDataModule,
        *,
        every_n_steps: int = 1000,
        layer: int = -1,
        modality: str | None = None,
        num_classes: int | None = None,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        knn_k: int = 20,
        knn_temperature: float | None = 0.07,
        seed: int = 0,
        name: str = "probe",
    ) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"OnlineProbe every_n_steps must be > 0, got {every_n_steps}")
        for key, value in (("epochs", epochs), ("batch_size", batch_size), ("knn_k", knn_k)):
            if value <= 0:
                raise ValueError(f"OnlineProbe {key} must be > 0, got {value}")
        if lr <= 0:
            raise ValueError(f"OnlineProbe lr must be > 0, got {lr}")
        if knn_temperature is not None and knn_temperature <= 0:
            raise ValueError(f"OnlineProbe knn_temperature must be > 0 or null (majority vote), got {knn_temperature}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"OnlineProbe num_classes must be >= 2, got {num_classes}")
        self.data, self.every_n_steps, self.layer, self.modality = data, every_n_steps, layer, modality
        self.num_classes, self.epochs, self.batch_size = num_classes, epochs, batch_size
        self.lr, self.weight_decay, self.seed, self.name = lr, weight_decay, seed, name
        self.knn_k, self.knn_temperature = knn_k, knn_temperature
        self.last_step = -1  # optimizer step of the last probe
        self.num_probes = 0
        self.metrics: dict[str, float] = {}
        self.classifier: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None  # loaded state waiting for the classifier to be built
        self._dim: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # --- set-up ---------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        encoder = getattr(pl_module, "encoder", None)
        if encoder is None or not (hasattr(encoder, "embed") and hasattr(encoder, "encode")):
            raise ValueError(f"OnlineProbe needs the LightningModule's encoder at `.encoder`; "
                             f"{type(pl_module).__name__} has none")
        depth = encoder.num_layers
        if not -(depth + 1) <= self.layer <= depth:
            raise ValueError(f"OnlineProbe layer={self.layer} out of range for an encoder with {depth} + 1 layer "
                             "outputs")
        self._dim = encoder.dim
        what = type(self.data).__name__
        with isolated_rng(pl_module.device):
            if trainer.local_rank == 0:
                self.data.prepare_data()
            trainer.strategy.barrier("online_probe_prepare")
            self.data.setup("fit")
            train, valid = self.data.train_dataloader(), self.data.val_dataloader()
            if not valid or (hasattr(valid, "__len__") and len(valid) == 0):
                raise ValueError(f"OnlineProbe data ({what}) has no valid split: the probe is evaluated on it")
            batch = next(iter(train))
        if "label" not in batch.targets:
            raise ValueError(f"OnlineProbe data ({what}) has no labels (no targets['label'] in its batches): use "
                             "a labeled manifest (third column) or a labeled DataModule")
        if self.modality is None:
            if len(batch.inputs) != 1:
                raise ValueError(f"OnlineProbe data has inputs {sorted(batch.inputs)}: set modality")
            self.modality = next(iter(batch.inputs))
        elif self.modality not in batch.inputs:
            raise ValueError(f"OnlineProbe modality={self.modality!r} not in the data's inputs {sorted(batch.inputs)}")
        if self.num_classes is None:
            self.num_classes = getattr(self.data, "num_classes", None)
            if self.num_classes is None:
                raise ValueError(f"OnlineProbe: {what} does not say how many classes it has: set num_classes")
        size = len(train.dataset) if hasattr(getattr(train, "dataset", None), "__len__") else None
        if size is not None and self.knn_k > size:
            raise ValueError(f"OnlineProbe knn_k={self.knn_k} exceeds the {size} items of the probe's train split")

    def _ensure_classifier(self, device: torch.device) -> nn.Linear:
        """Build the classifier and its optimizer on `device` (once, or again on another device), applying any
        state loaded from a checkpoint. Initialization draws from the probe's own generator."""
        if self.classifier is not None and self.classifier.weight.device == device:
            return self.classifier
        if self.classifier is not None:  # moved device: carry the state over
            self._pending = self.state_dict()
        assert self._dim is not None and self.num_classes is not None, "OnlineProbe.setup() has not run"
        g = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self._dim)  # nn.Linear's default init, from our generator
        clf = torch.nn.utils.skip_init(nn.Linear, self._dim, self.num_classes)  # no draw from the global RNG
        with torch.no_grad():
            clf.weight.copy_(torch.rand(clf.weight.shape, generator=g) * 2 * bound - bound)
            clf.bias.copy_(torch.rand(clf.bias.shape, generator=g) * 2 * bound - bound)
        self.classifier = clf.to(device)
        self.optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self._pending is not None and "classifier" in self._pending:
            self.classifier.load_state_dict(self._pending["classifier"])
            self.optimizer.load_state_dict(self._pending["optimizer"])
        self._pending = None
        return self.classifier

    # --- checkpointing --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"last_step": self.last_step, "num_probes": self.num_probes, "metrics": dict(self.metrics)}
        if self.classifier is not None:
            state["classifier"] = {k: v.detach().cpu().clone() for k, v in self.classifier.state_dict().items()}
            state["optimizer"] = self.optimizer.state_dict()
        elif self._pending is not None and "classifier" in self._pending:
            state["classifier"], state["optimizer"] = self._pending["classifier"], self._pending["optimizer"]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step, self.num_probes = int(state_dict["last_step"]), int(state_dict["num_probes"])
        self.metrics = dict(state_dict.get("metrics", {}))
        self._pending = state_dict
        if self.classifier is not None:
            device, self.classifier = self.classifier.weight.device, None
            self._ensure_classifier(device)

    # --- the probe ------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        step = trainer.global_step  # optimizer steps; unchanged over the micro-batches of an accumulated step
        if step == 0 or step == self.last_step or step % self.every_n_steps:
            return
        self.last_step = step
        self.metrics = self.run(trainer, pl_module)
        self.num_probes += 1
        # the step axis of train/loss: Lightning logs this batch's train metrics after this hook, at the number of
        # optimizer steps before this batch's (global_step has already counted it)
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=step - 1)

    @torch.no_grad()
    def features(self, trainer: L.Trainer, encoder: nn.Module, loader, device: torch.device) -> tuple[Tensor, Tensor]:
        """Mean-pooled features of one split, in sample-id order: ((U, D) fp32, (U,) labels)."""

        was_training = encoder.training
        encoder.eval()
        ids, feats, labels = [], [], []
        try:
            for batch in loader:
                batch = batch.to(device)
                x = batch.inputs[self.modality]
                with trainer.precision_plugin.forward_context():
                    out = encoder.encode(encoder.embed(x, batch.lengths.get(self.modality)),
                                         return_layers=self.layer != -1)
                h = out.last if self.layer == -1 else out.layers[self.layer]
                feats.append(mean_pool(h, out.padding_mask, getattr(encoder, "num_prefix", 0)))
                labels.append(batch.targets["label"])
                ids.append(batch.ids if batch.ids is not None else torch.full_like(batch.targets["label"], -1))
        finally:
            encoder.train(was_training)
        u_ids, u_feats, u_labels = torch.cat(ids), torch.cat(feats), torch.cat(labels)
        if trainer.world_size > 1:
            if bool((u_ids < 0).any()):
                raise ValueError("OnlineProbe under several processes needs batch.ids to merge the ranks' features")
            strategy = trainer.strategy
            u_ids, u_feats, u_labels = (torch.cat(gather_rows(strategy, t)) for t in (u_ids, u_feats, u_labels))
        if bool((u_ids >= 0).all()):
            u_ids, u_feats, u_labels = unique_by_id(u_ids, u_feats, u_labels)
        return u_feats, u_labels

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """One probe at the current step -> metrics."""
        device = pl_module.device
        step = trainer.global_step
        with isolated_rng(device):
            tr_x, tr_y = self.features(trainer, pl_module.encoder, self.data.train_dataloader(), device)
            va_x, va_y = self.features(trainer, pl_module.encoder, self.data.val_dataloader(), device)
        bad = sorted({int(v) for v in torch.cat([tr_y, va_y]).tolist() if not 0 <= v < self.num_classes})
        if bad:
            raise ValueError(f"OnlineProbe: labels {bad[:10]} outside [0, {self.num_classes}) (num_classes)")
        # NOTE(ref): DINO and solo-learn run kNN on L2-normalized raw features; we standardize with the memory's
        # mean and std first (as for the linear classifier): mean-pooled speech features share a common
        # component (mean cosine of keywords-small valid to train clips 0.69 for the step-1,400 wav2vec 2.0
        # tiny encoder, 0.86 at random init); standardized, kNN accuracy was 0.175 vs 0.150 raw (120 clips).
        mean, std = tr_x.mean(0), tr_x.std(0).clamp(min=1e-6)
        tr_z, va_z = (tr_x - mean) / std, (va_x - mean) / std
        clf = self._ensure_classifier(device)
        g = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + step) % (2**63 - 1))
        with torch.enable_grad():
            clf.train()
            for _ in range(self.epochs):
                for idx in torch.randperm(len(tr_z), generator=g, device=device).split(self.batch_size):
                    loss = F.cross_entropy(clf(tr_z[idx]), tr_y[idx])
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
        clf.eval()
        with torch.no_grad():
            tr_logits, va_logits = clf(tr_z), clf(va_z)
        knn = knn_predict(tr_z, tr_y, va_z, k=self.knn_k, num_classes=self.num_classes,
                          temperature=self.knn_temperature)
        p = self.name
        return {
            f"{p}/acc": float((va_logits.argmax(1) == va_y).float().mean()),
            f"{p}/loss": float(F.cross_entropy(va_logits, va_y)),
            f"{p}/train_acc": float((tr_logits.argmax(1) == tr_y).float().mean()),
            f"{p}/train_loss": float(F.cross_entropy(tr_logits, tr_y)),
            f"{p}/knn_acc": float((knn == va_y).float().mean()),
        }
