"""codiemb_pl: CoDiEmb (joint IR + STS embedding training with delta-guided fusion) on PyTorch Lightning."""

__version__ = "0.1.0"
