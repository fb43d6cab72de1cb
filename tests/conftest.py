import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_mlm_run(tmp_path_factory) -> dict:
    """40 updates of a tiny MaskedLM (whole-word masking, AdamW 2e-3) on the embedded text with its own 512-entry
    BPE, one checkpoint. Shared by tests/objectives/test_mlm.py (that it learns) and tests/eval/test_mlm_text_path.py
    (what its checkpoint carries): {"ckpt": last.ckpt, "dm", "model" (eval mode), "root", "metrics": the
    callback_metrics after every training batch}."""
    import lightning as L

    from omnissl.backbones.builders import tiny
    from omnissl.datamodules.text import TextDataModule
    from omnissl.ssl.mlm import MaskedLM

    class Record(L.Callback):
        def __init__(self) -> None:
            self.metrics: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    root = tmp_path_factory.mktemp("mlm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and far faster on a loaded machine
    try:
        torch.manual_seed(0)
        dm = TextDataModule(embedded_size="tiny", vocab_size=512, block_size=64, batch_size=16, num_workers=0,
                            progress=False)
        model = MaskedLM(tiny("text", vocab_size=512, dim=64, depth=2), whole_word=True,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, betas=(0.9, 0.98), eps=1e-6))
        rec = Record()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=40, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root),
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True), rec])
        trainer.fit(model, dm)
    finally:
        torch.set_num_threads(threads)
    return {"ckpt": root / "last.ckpt", "dm": dm, "model": model.eval(), "root": root, "metrics": rec.metrics}
