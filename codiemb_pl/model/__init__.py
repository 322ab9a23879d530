"""The encoder and everything that defines its on-disk contract: TextEncoder, pooling, decoder backbones, LoRA, length buckets, device choice, prompts and the model card. No Lightning."""
