"""omnissl: self-supervised pretraining of encoders (speech, audio, text, images) on PyTorch Lightning."""

__version__ = "0.1.0"
