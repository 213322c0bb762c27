"""DoRA's training overhead on SD1.5's attention projections, and what cuts it (issue 7).

    python bench/dora_overhead.py --device cpu --output /tmp/dora.json    # batch 1, fp32, 1 thread, ~1 min
    python bench/dora_overhead.py --device cpu --dtype bf16 --output d.json # CPU bf16 autocast
    python bench/dora_overhead.py --device cuda --output dora_cuda.json   # batch 16, fp16 autocast
    python bench/dora_overhead.py --quick --output /tmp/q.json            # tiny sizes: the code runs, no timings

What is timed: one forward + backward (ms: median and minimum over the steps) of the projections of
one SD1.5 attention layer, named as diffusers names them (to_q, to_k, to_v, to_out.0; only to_out.0
has a bias), at each U-Net level: inner dim 320 / 640 / 1280 with 4096 / 1024 / 256 tokens (512 px) in
  self   to_q, to_k, to_v on the hidden states, to_out.0 on the attention output;
  cross  to_q and to_out.0 as above, to_k and to_v on the 77 x 768 text embeddings (no gradient).
Gradients flow to the hidden states and the attention output, as inside a U-Net. As in the reference
LoRA/DoRA recipe (diffusers train_text_to_image_lora.py): frozen base weights in --dtype, fp32 adapters,
autocast in --dtype; the hidden states are fp32 under autocast (LayerNorm's output), the attention
output and text embeddings are in --dtype. lora_B and the magnitude are randomised (mid-training).

Variants (each applied to the same weights):
  linear           the frozen projections alone
  lora             peft LoRA r16
  dora             peft DoRA r16 (peft's own forward)
  dora+BA          peft's forward, but B @ A as one matmul without autograd instead of peft's
                   eye(in_features) pushed through A and B
  dora+fused       the toolkit's forward (sdtune.adapters.lora.use_fast_dora, AdapterConfig.dora_fast):
                   B @ A as above, output scale * (W x + s B A x) [+ b] instead of
                   y + (scale - 1) W x + scale s B A x
  dora+fused+normexp  dora+fused with the norm as ||W||^2 + 2 s <W A^T, B> + s^2 <B A A^T, B> per output
                   feature (fp32): never forms B A or W + s B A
  dora+fused+nocast  (autocast only) dora+fused without peft's copy of the input to fp32 (lora_A's
                   dtype), which autocast casts back to half for the matmul anyway (exact)
  dora+half        (autocast only) dora+fused with the scale in the autocast dtype, so the output
                   products run in half precision (NOT exact: the scale is rounded and the magnitude's
                   gradient is summed in half, which can overflow under fp16 + GradScaler)
  dora(+fused)+compile  with --compile: torch.compile(dynamic=False) of the whole module
"err" is max |variant - peft DoRA| / max |peft DoRA| over the outputs and all gradients (inputs,
lora_A, lora_B, magnitude): ~1e-7 means the same numbers up to fp32 rounding.
On CUDA, "peak MiB" is torch.cuda.max_memory_allocated during one step above what was allocated
before it (the saved activations and temporaries of that step).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD15_LEVELS = [(320, 4096), (640, 1024), (1280, 256)]  # (inner dim, tokens) at 512 px
QUICK_LEVELS = [(32, 64)]
TEXT = (77, 768)  # CLIP ViT-L tokens x width
QUICK_TEXT = (8, 24)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Projections(nn.Module):
    """One diffusers Attention's projections (same names, so peft's target_modules match)."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, hidden, context, attn_out):
        return self.to_q(hidden), self.to_k(context), self.to_v(context), self.to_out[0](attn_out)


# ----------------------------------------------------------------------------- the variants


def with_adapter(base: nn.Module, rank: int, dora: bool, seed: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    module = copy.deepcopy(base)
    torch.manual_seed(seed)  # peft's gaussian init of A draws from the global generator
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, use_dora=dora,
                                       init_lora_weights="gaussian"), module)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_" in name:  # fp32 adapters over a half base, as the reference recipe; the base keeps --dtype
                param.data = param.data.float()
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=g))
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=g))
    return module


def direct_lora_weight(module: nn.Module) -> nn.Module:
    """peft's forward with B @ A computed directly (no eye(in_features), no autograd graph)."""

    def get_lora_weight(lora_A, lora_B, adapter_name=None):
        with torch.no_grad():
            return lora_B.weight @ lora_A.weight

    for layer in module.modules():
        if type(layer).__name__ == "DoraLinearLayer":
            layer.get_lora_weight = get_lora_weight  # instance attribute: shadows the method
    return module


def fused(module: nn.Module) -> nn.Module:
    from sdtune.adapters.lora import use_fast_dora

    assert use_fast_dora(module) == 4
    return module


def replace_variant(module: nn.Module, variant_cls: type) -> None:
    for layer in module.modules():
        if hasattr(layer, "lora_variant"):
            layer.lora_variant["default"] = variant_cls()


def fused_nocast(module: nn.Module) -> nn.Module:
    from sdtune.adapters.lora import fast_dora_variant

    fast = fast_dora_variant()

    class NoCast(fast):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            weight_dtype = module.lora_A[active_adapter].weight.dtype
            if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
                x = x.to(weight_dtype)  # what peft's cast did, needed only without autocast
            return fast.forward(module, active_adapter, x, result, **kwargs)

    replace_variant(module, NoCast)
    for layer in module.modules():
        if hasattr(layer, "lora_variant"):
            layer.cast_input_dtype_enabled = False  # peft's switch for its x.to(lora_A dtype)
    return module


def half(module: nn.Module) -> nn.Module:
    from peft.tuners.lora.variants import DoraLinearVariant

    class Half(DoraLinearVariant):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
            scaling, dora = module.scaling[active_adapter], module.lora_magnitude_vector[active_adapter]
            base = module.get_base_layer()
            with torch.no_grad():
                lora_weight = (lora_B.weight @ lora_A.weight).to(x.dtype)
                weight_norm = dora.get_weight_norm(base.weight.to(x.dtype), lora_weight, scaling)
            scale = (dora.weight / weight_norm).view(1, -1).to(result.dtype)  # <- the rounding
            base_result = result if base.bias is None else result - base.bias
            out = scale * torch.add(base_result, lora_B(lora_A(x)), alpha=scaling)
            return out if base.bias is None else out + base.bias

    replace_variant(module, Half)
    return module


def norm_expanded(module: nn.Module) -> nn.Module:
    """dora+fused with ||W + s B A||^2 = ||W||^2 + 2 s <W A^T, B> + s^2 <B (A A^T), B> per row: reads W
    twice, never forms the out x in matrices W + s B A or B A (weight-sized work only; fp32)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    class NormExpanded(DoraLinearVariant):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
            scaling, dora = module.scaling[active_adapter], module.lora_magnitude_vector[active_adapter]
            base = module.get_base_layer()
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                a, b, w = lora_A.weight, lora_B.weight, base.weight.to(lora_A.weight.dtype)
                cross, lora = ((w @ a.T) * b).sum(1), ((b @ (a @ a.T)) * b).sum(1)
                weight_norm = (w.pow(2).sum(1) + 2 * scaling * cross + scaling**2 * lora).sqrt()
            scale = (dora.weight / weight_norm).view(1, -1)
            base_result = result if base.bias is None else result - base.bias
            out = scale * torch.add(base_result, lora_B(lora_A(x)), alpha=scaling)
            return out if base.bias is None else out + base.bias

    replace_variant(module, NormExpanded)
    return module


def build_variants(base: nn.Module, rank: int, compile_: bool, autocast: bool) -> dict[str, nn.Module]:
    seed = 0
    variants = {
        "linear": copy.deepcopy(base),
        "lora": with_adapter(base, rank, dora=False, seed=seed),
        "dora": with_adapter(base, rank, dora=True, seed=seed),
        "dora+BA": direct_lora_weight(with_adapter(base, rank, dora=True, seed=seed)),
        "dora+fused": fused(with_adapter(base, rank, dora=True, seed=seed)),
        "dora+fused+normexp": norm_expanded(with_adapter(base, rank, dora=True, seed=seed)),
    }
    if autocast:  # in fp32 these two compute exactly what dora+fused computes
        variants["dora+fused+nocast"] = fused_nocast(with_adapter(base, rank, dora=True, seed=seed))
        variants["dora+half"] = half(with_adapter(base, rank, dora=True, seed=seed))
    if compile_:
        variants["dora+compile"] = torch.compile(with_adapter(base, rank, dora=True, seed=seed), dynamic=False)
        variants["dora+fused+compile"] = torch.compile(fused(with_adapter(base, rank, dora=True, seed=seed)),
                                                       dynamic=False)
    return variants


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(module, inputs, grads, dtype, device):
    """One forward + backward; returns the outputs (detached) and the gradients it made."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        outputs = module(*inputs)
    pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]  # frozen text: no grad
    torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    return outputs


def clear_grads(module, inputs):
    for t in list(module.parameters()) + list(inputs):
        t.grad = None


def gradients(module, inputs) -> list[torch.Tensor]:
    named = dict(module.named_parameters())
    trained = [named[k] for k in sorted(named) if ".lora_" in k]
    return [t.grad for t in inputs if t.requires_grad] + [p.grad for p in trained]


def relative_error(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ours, ref, strict=True):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def measure_shape(base, inputs, grads, args, device, dtype) -> list[dict]:
    variants = build_variants(base, args.rank, args.compile, autocast=dtype != torch.float32)
    for module in variants.values():
        module.to(device).train()
    # the same numbers? outputs and gradients of each DoRA variant against peft's
    results = {}
    for name, module in variants.items():
        clear_grads(module, inputs)
        outputs = step(module, inputs, grads, dtype, device)
        results[name] = list(outputs) + gradients(module, inputs)
        clear_grads(module, inputs)
    errors = {name: relative_error(res, results["dora"]) for name, res in results.items() if name.startswith("dora")}

    times = {name: [] for name in variants}
    for _ in range(args.warmup):
        for name, module in variants.items():
            step(module, inputs, grads, dtype, device)
            clear_grads(module, inputs)
    for _ in range(args.rounds):  # rounds interleave the variants, so drift hits them alike
        for name, module in variants.items():
            for _ in range(args.iters):
                synchronize(device)
                start = time.perf_counter()
                step(module, inputs, grads, dtype, device)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
                clear_grads(module, inputs)

    peaks = {}
    if device.type == "cuda":
        for name, module in variants.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step(module, inputs, grads, dtype, device)
            synchronize(device)
            peaks[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            clear_grads(module, inputs)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    best = {name: 1e3 * min(t) for name, t in times.items()}  # on a shared machine, the least disturbed step
    return [{"variant": name, "ms": ms[name], "ratio_to_lora": ms[name] / ms["lora"], "ms_min": best[name],
             "ratio_to_lora_min": best[name] / best["lora"], "peak_mib": peaks.get(name),
             "max_rel_err": errors.get(name)} for name in variants]


def shapes(args):
    levels, (text_tokens, text_dim) = (QUICK_LEVELS, QUICK_TEXT) if args.quick else (SD15_LEVELS, TEXT)
    for dim, tokens in levels:
        if args.dims and dim not in args.dims:
            continue
        for kind in ("self", "cross"):
            yield dim, tokens, kind, text_tokens, text_dim


def make_inputs(dim, tokens, kind, text_tokens, text_dim, batch, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = dtype  # attention output and text embeddings come in the autocast dtype
    hidden = torch.randn(batch, tokens, dim, generator=g).to(device).requires_grad_()  # LayerNorm output: fp32
    attn_out = torch.randn(batch, tokens, dim, generator=g).to(device, half).requires_grad_()
    if kind == "self":
        context = hidden
    else:
        context = torch.randn(batch, text_tokens, text_dim, generator=g).to(device, half)  # frozen text encoder
    inputs = (hidden, context, attn_out)
    out_tokens = tokens if kind == "self" else text_tokens
    grads = [torch.randn(batch, n, dim, generator=g).to(device, dtype) for n in (tokens, out_tokens, out_tokens, tokens)]
    return inputs, grads


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="base weights and autocast dtype (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA (the reference), 1 on CPU")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all variants (default: 8 CPU, 3 CUDA)")
    parser.add_argument("--iters", type=int, default=None, help="steps per variant per round (default: 2 CPU, 20 CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default on CPU: 1; OpenMP threads that spin-wait on a shared "
                             "2-core machine made the timings swing 2-5x)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="only these inner dims (320 640 1280)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd DoRA (slow to compile)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks the code runs")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    args.batch = args.batch or (16 if device.type == "cuda" else 1)
    args.iters = args.iters or (20 if device.type == "cuda" else 2)
    args.rounds = args.rounds or (3 if device.type == "cuda" else 8)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.quick:
        args.batch, args.warmup, args.rounds, args.iters = 2, 1, 1, 2

    import diffusers
    import peft

    record = {
        "benchmark": "dora_overhead", "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
        "rank": args.rank, "quick": args.quick,
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "diffusers": diffusers.__version__},
        "rows": [],
    }
    print(f"{record['device_name']}, {record['threads']} threads, {record['dtype']}, batch {args.batch}, r{args.rank}")
    header = (f"{'shape':<28} {'variant':<20} {'ms':>9} {'/lora':>6} {'min ms':>9} {'/lora':>6} {'peak MiB':>9} "
              f"{'err':>8}")
    print(header + "\n" + "-" * len(header))
    for dim, tokens, kind, text_tokens, text_dim in shapes(args):
        torch.manual_seed(dim)
        base = Projections(dim, dim if kind == "self" else text_dim).requires_grad_(False).to(dtype)
        inputs, grads = make_inputs(dim, tokens, kind, text_tokens, text_dim, args.batch, dtype, device)
        shape = f"{kind} d{dim} n{tokens}" + (f" ctx{text_tokens}x{text_dim}" if kind == "cross" else "")
        for row in measure_shape(base, inputs, grads, args, device, dtype):
            row = {"shape": shape, "dim": dim, "tokens": tokens, "kind": kind, **row}
            record["rows"].append(row)
            peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "-"
            err = f"{row['max_rel_err']:.1e}" if row["max_rel_err"] is not None else "-"
            print(f"{shape:<28} {row['variant']:<20} {row['ms']:9.2f} {row['ratio_to_lora']:6.2f} {row['ms_min']:9.2f} "
                  f"{row['ratio_to_lora_min']:6.2f} {peak:>9} {err:>8}")
        print()
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.output}")
    return record


if __name__ == "__main__":
    main()
