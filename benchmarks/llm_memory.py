"""Memory and step time of training a ~0.5B decoder embedder: full fine-tuning vs LoRA vs LoRA + checkpointing.

    python benchmarks/llm_memory.py [--modes full lora lora_attn lora_gc] [--steps 2] [--threads 2] [--out FILE.json]
                                    [--include EARLIER.json ...] [--computed-only] [--saved-per-block]

Part 1 (measured, CPU). A randomly initialised decoder of Qwen2-0.5B's shape (hidden 896, 24 layers,
14 heads / 2 KV heads, MLP 4864, vocabulary 151936: 494M parameters; no download), float32, batch
4 x 128 tokens. One training step = forward, last-token pooling (`pooling.last_token_pool`), the IR
InfoNCE of the first two texts against the last two (`losses.ir.multi_positive_info_nce`, tau 0.02),
backward, AdamW step over the trainable parameters (as `CoDiEmbModule.configure_optimizers`). Modes:
`full` (every weight trains), `lora` (`lora.add_lora_adapters`, r=32, alpha 64, all linear layers),
`lora_attn` (the same on the attention projections q, k, v, o only) and `lora_gc` (all linear layers plus
non-reentrant gradient checkpointing, as `model.gradient_checkpointing`); LoRA dropout 0 in all.
Each mode runs in its own process; a thread samples its `RssAnon` (anonymous resident memory: weights,
gradients, optimizer states, activations) every 5 ms. Reported: the peak, the step time (median of
`--steps` steps after one warm-up step), the trainable share and the checkpoint size (computed:
trainable tensors plus AdamW's two moments, float32; a full checkpoint holds every weight). Ratios are
against `full` in the same run. A mode is skipped, with a line saying so, when the machine has less
memory available than it needs (full fine-tuning: about 18 bytes per parameter).

Part 1b (`--saved-per-block`, exact, load-independent). Bytes of activations one transformer block keeps
for backward at that shape (float32, 512 tokens), counted by `saved_for_backward.saved_for_backward`
(`torch.autograd.graph.saved_tensors_hooks`: distinct storages, parameters excluded; the difference
between a 3- and a 2-block model): full fine-tuning, LoRA on all linear layers / on q, k, v, o, each
without dropout, with peft's `nn.Dropout` (p 0.05, as the recipes) and with this project's recomputed
dropout (`lora.DropoutThenLinear`).

Part 2 (computed). Memory per GPU of the two recipes (configs/recipes/minicpm_codiemb.yaml and
qwen3_lora.yaml) from the models' shapes, see `recipe_gpu_memory`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BATCH, TOKENS, RANK = 4, 128, 32
MODES = ("full", "lora", "lora_attn", "lora_gc")
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def qwen2_half_billion_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
                       tie_word_embeddings=True, attention_dropout=0.0)


def rss_anon_mb() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("RssAnon:")).split()[1]) / 1024


def mem_available_mb() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]) / 1024


class PeakSampler:
    """Samples this process's RssAnon every 5 ms in a thread; `peak` is the largest value seen."""

    def __init__(self):
        self.peak = rss_anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())


def run_mode(mode: str, steps: int, threads: int) -> dict:
    """One mode in this process: build, train `1 + steps` steps, return the measurements."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    from codiemb_pl.losses.ir import multi_positive_info_nce
    from codiemb_pl.model.lora import LoraSettings, add_lora_adapters, lora_summary
    from codiemb_pl.model.pooling import last_token_pool

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = qwen2_half_billion_config()
    model = AutoModel.from_config(config)
    total = sum(parameter.numel() for parameter in model.parameters())
    if mode == "lora_gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode != "full":
        targets = ATTENTION_PROJECTIONS if mode == "lora_attn" else "all-linear"
        model = add_lora_adapters(model, LoraSettings(r=RANK, alpha=2.0 * RANK, dropout=0.0, target_modules=targets))
    model.train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (BATCH, TOKENS), generator=generator)
    attention_mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    after_build = rss_anon_mb()

    def step() -> float:
        start = time.perf_counter()
        states = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeddings = F.normalize(last_token_pool(states, attention_mask), dim=-1)
        loss = multi_positive_info_nce(embeddings[:2], embeddings[2:].unsqueeze(1), None, temperature=0.02)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    with PeakSampler() as sampler:
        step()  # warm-up: allocates gradients and AdamW's moments
        times = [step() for _ in range(steps)]
    summary = lora_summary(model)
    trainable_count = summary["trainable"]
    return {"mode": mode, "parameters": total, "trainable": trainable_count,
            "trainable_fraction": trainable_count / total,
            "checkpoint_mb": 3 * trainable_count * 4 / 2**20 if mode != "full" else 3 * total * 4 / 2**20,
            "model_mb_after_build": after_build, "peak_rss_anon_mb": sampler.peak,
            "step_s": statistics.median(times), "step_times_s": times, "threads": threads}


def saved_bytes_per_block(lora: str | None, targets, dropout: float) -> float:
    """MB of non-parameter tensors one block saves for backward (see Part 1b); `lora`: None, "peft" or "ours"."""
    import peft
    import torch
    from transformers import AutoModel

    from codiemb_pl.model.lora import LoraSettings, add_lora_adapters
    from saved_for_backward import saved_for_backward

    def saved_mb(layers: int) -> float:
        config = qwen2_half_billion_config()
        config.num_hidden_layers, config.vocab_size = layers, 1000
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
        if lora == "peft":
            model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2.0 * RANK, lora_dropout=dropout,
                                                               target_modules=targets))
        elif lora == "ours":
            model = add_lora_adapters(model, LoraSettings(r=RANK, alpha=2.0 * RANK, dropout=dropout,
                                                          target_modules=targets))
        model.train()
        ids = torch.randint(0, 1000, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
        with saved_for_backward(model.parameters()) as storages:
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum()
        return sum(storages.values()) / 2**20

    return saved_mb(3) - saved_mb(2)


def saved_per_block_table() -> str:
    rows = ["| training | LoRA dropout | kept for backward per block MB |", "|---|---|---|",
            f"| full fine-tuning | - | {saved_bytes_per_block(None, None, 0.0):.1f} |"]
    for label, targets in (("LoRA r=32, all linear layers", "all-linear"),
                           ("LoRA r=32, q, k, v, o", ATTENTION_PROJECTIONS)):
        for dropout_label, lora, dropout in (("0", "ours", 0.0), ("0.05, peft nn.Dropout", "peft", 0.05),
                                             ("0.05, recomputed (DropoutThenLinear)", "ours", 0.05)):
            rows.append(f"| {label} | {dropout_label} | {saved_bytes_per_block(lora, targets, dropout):.1f} |")
    return "\n".join(rows)


def needed_mb(mode: str, parameters: int) -> float:
    """Rough memory a mode needs: weights (4 B), plus gradients and AdamW moments (12 B) when full, plus 2 GB."""
    per_parameter = 18 if mode == "full" else 5
    return parameters * per_parameter / 2**20 + 2048


def measure_all(modes: list[str], steps: int, threads: int) -> list[dict]:
    results = []
    parameters = 494_032_768
    for mode in modes:
        available = mem_available_mb()
        if needed_mb(mode, parameters) > available:
            print(f"[llm_memory] {mode}: skipped, needs about {needed_mb(mode, parameters) / 1024:.1f} GB, "
                  f"{available / 1024:.1f} GB available", flush=True)
            continue
        command = [sys.executable, __file__, "--child", mode, "--steps", str(steps), "--threads", str(threads)]
        started = time.perf_counter()
        output = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if output.returncode != 0:
            print(f"[llm_memory] {mode}: failed ({output.returncode})\n{output.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(output.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - started
        results.append(result)
        print(f"[llm_memory] {mode}: peak RssAnon {result['peak_rss_anon_mb']:.0f} MB, "
              f"step {result['step_s']:.1f} s", flush=True)
    return results


def measured_table(results: list[dict]) -> str:
    reference = next((r for r in results if r["mode"].startswith("full")), None)
    lines = ["| mode | trainable | checkpoint MB (computed) | peak RssAnon MB | x full | step s | x full |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        memory_ratio = f"{r['peak_rss_anon_mb'] / reference['peak_rss_anon_mb']:.2f}" if reference else "-"
        time_ratio = f"{r['step_s'] / reference['step_s']:.2f}" if reference else "-"
        lines.append(f"| {r['mode']} | {r['trainable'] / 1e6:.1f}M ({100 * r['trainable_fraction']:.2f} %) | "
                     f"{r['checkpoint_mb']:.0f} | {r['peak_rss_anon_mb']:.0f} | {memory_ratio} | "
                     f"{r['step_s']:.1f} | {time_ratio} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Part 2: computed memory per GPU of the recipes


def minicpm_embedding_config():
    """MiniCPM-Embedding's backbone (MiniCPM-2B) as a Llama-shaped config: the same matrices."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=122753, hidden_size=2304, num_hidden_layers=40, num_attention_heads=36,
                       num_key_value_heads=36, intermediate_size=5760, tie_word_embeddings=True)


def qwen3_embedding_4b_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151665, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=9728, tie_word_embeddings=True)


def shape_counts(config, lora_rank: int | None) -> tuple[int, int, int]:
    """(parameters, LoRA parameters on every linear layer of rank `lora_rank` (0 without), largest linear width)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    adapters = sum(lora_rank * (m.in_features + m.out_features) for m in linears) if lora_rank else 0
    widest = max(m.out_features for m in linears)
    return parameters, adapters, widest


def recipe_gpu_memory(config, tokens: int, *, lora_rank: int | None, weight_bytes: int, activation_bytes: int,
                      optimizer_on_gpu: bool) -> dict:
    """Memory per GPU (GB) of one micro-step holding `tokens` tokens, with gradient checkpointing.

    weights `P·w`; gradients and AdamW (fp32 master copy + two moments) for the trained parameters:
    `G·w` gradients on the GPU and `12·G` bytes of optimizer state on the GPU unless offloaded
    (ZeRO-1 + CPU offload); activations `T·h·L·a` (each block's input, kept for the recomputation)
    plus one block recomputed at a time `T·(4h + 3m)·a` (attention projections and the gated MLP;
    SDPA attention is linear in T); `w`, `a`: bytes per weight / activation element.
    """
    parameters, adapters, _ = shape_counts(config, lora_rank)
    trained = adapters if lora_rank else parameters
    h, layers, m = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    weights = parameters * weight_bytes
    gradients = trained * (4 if lora_rank else weight_bytes)
    optimizer = 12 * trained if optimizer_on_gpu else 0
    stored = tokens * h * layers * activation_bytes
    block = tokens * (4 * h + 3 * m) * activation_bytes
    total = weights + gradients + optimizer + stored + block
    return {"parameters_b": parameters / 1e9, "trained_m": trained / 1e6, "weights_gb": weights / 1e9,
            "gradients_gb": gradients / 1e9, "optimizer_gb": optimizer / 1e9,
            "activations_gb": (stored + block) / 1e9, "total_gb": total / 1e9,
            "cpu_optimizer_gb_total": 0 if optimizer_on_gpu else 12 * trained / 1e9}


def recipe_table() -> str:
    """IR micro-batch of the recipes: 28 queries (64 tokens) + 28 x (2 + 4) passages of 256, 512 or 1024 tokens."""
    rows = ["| recipe | passage tokens | tokens / micro-step | weights GB | grads GB | optimizer GB (GPU) | "
            "activations GB | total GB per GPU | CPU optimizer GB (all ranks) |", "|---|---|---|---|---|---|---|---|---|"]
    recipes = [
        ("minicpm_codiemb (full, ZeRO-1 + CPU offload, bf16)", minicpm_embedding_config(),
         dict(lora_rank=None, weight_bytes=2, activation_bytes=2, optimizer_on_gpu=False)),
        ("qwen3_lora (LoRA r=32, DDP, fp32 weights + bf16 autocast)", qwen3_embedding_4b_config(),
         dict(lora_rank=32, weight_bytes=4, activation_bytes=4, optimizer_on_gpu=True)),
    ]
    for name, config, options in recipes:
        for passage in (256, 512, 1024):
            tokens = 28 * 64 + 28 * 6 * passage
            r = recipe_gpu_memory(config, tokens, **options)
            rows.append(f"| {name} | {passage} | {tokens} | {r['weights_gb']:.1f} | {r['gradients_gb']:.1f} | "
                        f"{r['optimizer_gb']:.1f} | {r['activations_gb']:.1f} | {r['total_gb']:.1f} | "
                        f"{r['cpu_optimizer_gb_total']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--computed-only", action="store_true", help="print only the recipes' computed memory")
    parser.add_argument("--saved-per-block", action="store_true",
                        help="print only the activations one block keeps for backward (Part 1b)")
    parser.add_argument("--include", type=Path, nargs="*", default=[],
                        help="--out files of earlier invocations whose modes join the table (e.g. a mode that had "
                             "to be re-run when more memory was free)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.steps, args.threads)))
        return
    if args.saved_per_block:
        print(f"Activations kept for backward per block, Qwen2-0.5B shape, batch {BATCH} x {TOKENS} tokens, float32\n"
              + saved_per_block_table())
        return
    results = [] if args.computed_only else measure_all(args.modes, args.steps, args.threads)
    for earlier in args.include:
        results += [dict(r, mode=f"{r['mode']} (earlier run)") if any(r["mode"] == m["mode"] for m in results) else r
                    for r in json.loads(earlier.read_text())["measured"]]
    results.sort(key=lambda r: MODES.index(r["mode"].split(" ")[0]))
    load = os.getloadavg()
    if results:
        print(f"\nQwen2-0.5B-shaped decoder, CPU float32, batch {BATCH} x {TOKENS} tokens, {args.threads} threads, "
              f"load average {load[0]:.1f} at the end\n" + measured_table(results))
    print("\nMemory per GPU of the recipes (computed, IR micro-step, gradient checkpointing)\n" + recipe_table())
    if args.out:
        args.out.write_text(json.dumps({"measured": results, "load_average": load}, indent=2))


if __name__ == "__main__":
    main()
