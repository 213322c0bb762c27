"""PEFT adapters: every method is one row and runs the same generic tests on the tiny U-Net.

The rows' expected trainable names are derived here from the base U-Net's module names and
types, independently of the adapter code. Counts on SD1.5's real architecture (meta device,
no weights) are checked against REFERENCE.md section 1.
"""

import copy
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdtune.adapters import ADAPTERS, AdapterConfig, get_adapter
from sdtune.errors import UserError
from sdtune.models import SD15_UNET_CONFIG, SD15_UNET_PARAMS, build_sd15_unet

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_names(unet, dora=False, targets=TARGETS):
    suffixes = ["lora_A.default.weight", "lora_B.default.weight"]
    suffixes += ["lora_magnitude_vector.default.weight"] if dora else []
    modules = [name for name, _ in unet.named_modules() if any(name.endswith("." + t) for t in targets)]
    return {f"{m}.{s}" for m in modules for s in suffixes}


def bias_names(unet):
    return {name for name, _ in unet.named_parameters() if name.endswith(".bias")}


def difffit_names(unet, resnets=False):
    norms = {f"{n}.weight" for n, m in unet.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    gammas = set()
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            gammas |= {f"{name}.attn1.to_out.0.difffit_gamma", f"{name}.attn2.to_out.0.difffit_gamma",
                       f"{name}.ff.net.2.difffit_gamma"}
        if resnets and isinstance(module, ResnetBlock2D):
            gammas.add(f"{name}.conv2.difffit_gamma")
    return bias_names(unet) | norms | gammas


# (adapter name, settings, expected trainable names given the *base* U-Net)
ROWS = {
    "lora": ("lora", {}, lambda unet: lora_names(unet)),
    "dora": ("dora", {}, lambda unet: lora_names(unet, dora=True)),
    "lora-to_q": ("lora", {"lora_target_modules": ["to_q"]}, lambda unet: lora_names(unet, targets=["to_q"])),
    "bitfit": ("bitfit", {}, bias_names),
    "difffit": ("difffit", {}, difffit_names),
    "difffit-resnets": ("difffit", {"difffit_resnets": True}, lambda unet: difffit_names(unet, resnets=True)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny U-Net's ops are too small to gain from threads; with 2 shared cores, two OpenMP
    threads spin-wait and run these tests 10-20x slower (measured). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(ROWS), ids=list(ROWS))
def row(request):
    name, settings, expected = ROWS[request.param]
    return name, AdapterConfig(**settings), expected


def fresh_unet(tiny_model):
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    unet.requires_grad_(False)
    return unet


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700])
    encoder_hidden_states = torch.randn(2, 8, 32, generator=g)
    return latents, timesteps, encoder_hidden_states


@torch.no_grad()
def output(unet):
    return unet(*inputs()).sample


def train(adapter, unet, steps=3):
    """A few AdamW steps on random data, MSE to random noise (weight decay off: every change is a gradient's)."""
    optimizer = torch.optim.AdamW(adapter.param_groups(unet, 1e-2), weight_decay=0.0)
    latents, timesteps, encoder_hidden_states = inputs(seed=1)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        loss = nn.functional.mse_loss(unet(latents, timesteps, encoder_hidden_states).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet


def trained(tiny_model, name, cfg):
    adapter = get_adapter(name, cfg)
    unet = fresh_unet(tiny_model)
    adapter.apply(unet)
    return adapter, train(adapter, unet)


def test_every_adapter_has_a_row():
    assert {name for name, _, _ in ROWS.values()} == set(ADAPTERS)


def test_unknown_adapter_and_bad_settings_fail_early():
    with pytest.raises(ValueError, match="unsupported adapter 'loha'"):
        get_adapter("loha", AdapterConfig())
    with pytest.raises(UserError, match="^--lora_rank 0 must be at least 1; --lora_alpha -1 must be above 0; "
                                        "--lora_dropout 1 must be at least 0 and below 1; "
                                        "--difffit_scale_lr_multiplier 0 must be above 0$"):
        get_adapter("lora", AdapterConfig(lora_rank=0, lora_alpha=-1, lora_dropout=1.0, difffit_scale_lr_multiplier=0))
    with pytest.raises(UserError, match="lora_target_modules is empty"):
        get_adapter("lora", AdapterConfig(lora_target_modules=[]))


def test_apply_marks_exactly_the_methods_parameters(tiny_model, row):
    name, cfg, expected = row
    unet = fresh_unet(tiny_model)
    want = expected(unet)
    adapter = get_adapter(name, cfg)
    adapter.apply(unet)

    assert {n for n, p in unet.named_parameters() if p.requires_grad} == want
    params = adapter.trainable_parameters(unet)
    assert isinstance(params, list)
    assert {id(p) for p in params} == {id(p) for n, p in unet.named_parameters() if n in want}
    grouped = [p for group in adapter.param_groups(unet, 1e-4) for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, params))  # every trainable tensor in exactly one group


def test_apply_does_not_change_the_output_at_init(tiny_model, row):
    name, cfg, _ = row
    unet = fresh_unet(tiny_model)
    before = output(unet)
    get_adapter(name, cfg).apply(unet)
    torch.testing.assert_close(output(unet), before)


def test_training_changes_exactly_the_trainable_tensors(tiny_model, row):
    name, cfg, expected = row
    adapter = get_adapter(name, cfg)
    unet = fresh_unet(tiny_model)
    want = expected(unet)
    adapter.apply(unet)
    before = copy.deepcopy(unet.state_dict())
    train(adapter, unet)

    after = unet.state_dict()
    assert after.keys() == before.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == want


def test_save_then_load_onto_a_fresh_unet_gives_the_trained_output(tiny_model, row, tmp_path):
    name, cfg, _ = row
    adapter, unet = trained(tiny_model, name, cfg)
    path = adapter.save(unet, tmp_path)
    assert path == tmp_path / adapter.weights_name and path.is_file()
    with safe_open(str(path), framework="pt") as f:
        assert len(list(f.keys())) == len(adapter.state_dict(unet))  # only the trained tensors

    fresh = fresh_unet(tiny_model)
    get_adapter(name, cfg).load(fresh, tmp_path)
    torch.testing.assert_close(output(fresh), output(unet), rtol=0, atol=0)


def test_loading_a_mismatched_file_is_a_user_error(tiny_model, row, tmp_path):
    name, cfg, _ = row
    adapter, unet = trained(tiny_model, name, cfg)
    path = adapter.save(unet, tmp_path / "good")

    with pytest.raises(UserError, match="not found"):
        adapter.load(fresh_unet(tiny_model), tmp_path / "nowhere")

    # one tensor missing and one foreign tensor: both named in the error
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    dropped = sorted(tensors)[0]
    tensors["unet.foo.bias" if name in ("lora", "dora") else "foo.bias"] = tensors.pop(dropped)
    (tmp_path / "bad").mkdir()
    save_file(tensors, str(tmp_path / "bad" / adapter.weights_name), metadata=metadata)
    with pytest.raises(UserError, match="1 missing keys.*1 unexpected keys"):
        get_adapter(name, cfg).load(fresh_unet(tiny_model), tmp_path / "bad")

    # a file written by another method
    other = "bitfit" if name != "bitfit" else "difffit"
    other_adapter, other_unet = trained(tiny_model, other, AdapterConfig())
    other_path = other_adapter.save(other_unet, tmp_path / "other")
    with pytest.raises(UserError, match="not a U-Net LoRA file|weights, not"):
        get_adapter(name, cfg).load(fresh_unet(tiny_model), other_path)


@pytest.mark.parametrize(
    "name, saved, loaded, message",
    [
        ("lora", {"lora_rank": 4}, {"lora_rank": 8}, "r=4 in the file but 8 now"),
        ("lora", {"lora_alpha": 16}, {"lora_alpha": 8}, "lora_alpha=16"),
        ("dora", {}, {}, None),  # control: same settings load
        ("difffit", {"difffit_resnets": True}, {}, "difffit_resnets=True in the file"),
    ],
)
def test_loading_with_other_settings_says_which(tiny_model, tmp_path, name, saved, loaded, message):
    adapter, unet = trained(tiny_model, name, AdapterConfig(**saved))
    adapter.save(unet, tmp_path)
    target = get_adapter(name, AdapterConfig(**loaded))
    if message is None:
        target.load(fresh_unet(tiny_model), tmp_path)
    else:
        with pytest.raises(UserError, match=message):
            target.load(fresh_unet(tiny_model), tmp_path)
    if name == "lora":  # a LoRA file is not a DoRA file
        with pytest.raises(UserError, match="use_dora=False in the file"):
            get_adapter("dora", AdapterConfig(**saved)).load(fresh_unet(tiny_model), tmp_path)


def test_merge_equals_unmerged_and_leaves_a_plain_unet(tiny_model, row, tmp_path):
    name, cfg, _ = row
    adapter, unet = trained(tiny_model, name, cfg)
    unmerged = output(unet)
    merged = adapter.merge(unet)

    base_keys = set(fresh_unet(tiny_model).state_dict())
    assert set(merged.state_dict()) == base_keys
    assert not any(m._forward_hooks for m in merged.modules())
    assert type(merged) is UNet2DConditionModel
    torch.testing.assert_close(output(merged), unmerged, rtol=1e-5, atol=1e-5)

    merged.save_pretrained(tmp_path / "unet")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(output(reloaded), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_diffusers_pipeline_loads_the_lora_file(tiny_model, tmp_path, name):
    adapter, unet = trained(tiny_model, name, AdapterConfig())
    adapter.save(unet, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(output(pipe.unet), output(unet))


def test_difffit_scales_get_their_own_learning_rate(tiny_model):
    adapter = get_adapter("difffit", AdapterConfig(difffit_scale_lr_multiplier=10.0))
    unet = fresh_unet(tiny_model)
    adapter.apply(unet)
    # in this order: a checkpoint's optimizer state holds its groups by position, so old runs resume
    gammas, rest = adapter.param_groups(unet, 1e-4)
    assert gammas["lr"] == pytest.approx(1e-3) and rest["lr"] == 1e-4
    assert gammas["weight_decay"] == 0.0 and "weight_decay" not in rest  # rest uses the optimizer's
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(gammas["params"]) == 3 * len(blocks)
    assert all(torch.equal(g, torch.ones_like(g)) for g in gammas["params"])


def test_difffit_gamma_scales_the_residual_branch(tiny_model):
    """gamma = 0 on every branch equals removing the branches; gamma is really in the forward."""
    adapter = get_adapter("difffit", AdapterConfig())
    unet = fresh_unet(tiny_model)
    base = output(unet)
    adapter.apply(unet)
    with torch.no_grad():
        for gamma in adapter.gammas(unet):
            gamma.zero_()
    assert not torch.allclose(output(unet), base, atol=1e-3)


# --- DoRA's fast forward (AdapterConfig.dora_fast, issue 7) against peft's own ---


def dora_pair(tiny_model, **settings):
    """Two DoRA U-Nets with the same mid-training weights: the toolkit's forward and peft's."""
    fast, peft = fresh_unet(tiny_model), fresh_unet(tiny_model)
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same A whatever ran before
    get_adapter("dora", AdapterConfig(dora_fast=True, **settings)).apply(fast)
    get_adapter("dora", AdapterConfig(dora_fast=False, **settings)).apply(peft)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in fast.named_parameters():
            if "lora_B" in name:  # B = 0 at init would hide lora_A's gradient and B A's part of the norm
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=g))
    peft.load_state_dict(fast.state_dict())
    return fast, peft


def assert_near(ours, ref, tol=2e-5, name=""):
    """Equal up to fp32 rounding carried through the network: the largest difference is at most `tol`
    of the tensor's largest entry (an entry-wise rtol fails on near-zero entries)."""
    error = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert error <= tol, f"{name}: max difference {error:.1e} of the largest entry"


def dora_variants(unet):
    return {type(m.lora_variant["default"]).__name__ for m in unet.modules() if getattr(m, "lora_variant", None)}


def forward_backward(unet):
    latents, timesteps, encoder_hidden_states = inputs(seed=1)
    latents.requires_grad_(True)  # gradients flow through the base layers too, as in a deeper graph
    out = unet(latents, timesteps, encoder_hidden_states).sample
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    named = dict(unet.named_parameters())
    grads = {name: named[name].grad for name in lora_names(unet, dora=True)}
    return out.detach(), latents.grad, grads


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_dora_gives_peft_doras_outputs_and_gradients(tiny_model, mode):
    fast, peft = dora_pair(tiny_model)
    assert dora_variants(fast) == {"FastDoraLinearVariant"} and dora_variants(peft) == {"DoraLinearVariant"}
    fast.train(mode == "train"), peft.train(mode == "train")
    out, latents_grad, grads = forward_backward(fast)
    ref_out, ref_latents_grad, ref_grads = forward_backward(peft)
    assert_near(out, ref_out, name="output")
    assert_near(latents_grad, ref_latents_grad, name="input gradient")
    assert grads.keys() == ref_grads.keys() and len(grads) == len(lora_names(fresh_unet(tiny_model), dora=True))
    for name in grads:  # lora_A, lora_B and the magnitude of every layer
        assert ref_grads[name].abs().max() > 0, name
        assert_near(grads[name], ref_grads[name], name=name)


def test_fast_dora_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_model):
    """Half-precision training (frozen bf16 U-Net, fp32 adapters, autocast): the fast forward rounds
    scale (W x + s B A x) once in bf16, so it may differ from peft's by a rounding; its distance from
    the fp32 result must stay at peft's own level."""
    fast, peft = dora_pair(tiny_model)
    fp32 = copy.deepcopy(peft)
    for unet in (fast, peft, fp32):
        unet.to(torch.bfloat16)
        for name, param in unet.named_parameters():
            if ".lora_" in name:
                param.data = param.data.float()
    fp32.float()  # the same (bf16-rounded) base weights, computed in fp32

    def run(unet, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, latents_grad, grads = forward_backward(unet)
        return [out.float(), latents_grad.float(), *grads.values()]

    truth = run(fp32, autocast=False)

    def distance(results):
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results, truth))

    ours, theirs = distance(run(fast, autocast=True)), distance(run(peft, autocast=True))
    # bf16 carried through the tiny U-Net: peft's worst entry is 5-7% off fp32 (depending on A's draw)
    assert 0 < theirs < 0.1
    assert ours <= 2 * theirs


def test_fast_dora_trains_the_same_tensors_to_the_same_values(tiny_model):
    fast, peft = dora_pair(tiny_model)
    before = copy.deepcopy(fast.state_dict())
    train(get_adapter("dora", AdapterConfig(dora_fast=True)), fast)  # AdamW, as the generic rows
    train(get_adapter("dora", AdapterConfig(dora_fast=False)), peft)
    after, ref = fast.state_dict(), peft.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {key for key in before if not torch.equal(before[key], ref[key])}
    assert changed == lora_names(fast, dora=True)
    assert_near(output(fast), output(peft), tol=1e-4, name="output after AdamW")

    # the values: plain SGD, whose steps are the gradients (Adam's 1/sqrt(v) magnifies the rounding
    # of near-zero gradients, so its updates match only to ~1e-3)
    fast, peft = dora_pair(tiny_model)
    for unet in (fast, peft):
        params = [p for n, p in unet.named_parameters() if ".lora_" in n]
        optimizer = torch.optim.SGD(params, lr=0.05)
        for _ in range(3):
            optimizer.zero_grad()
            forward_backward(unet)
            optimizer.step()
    after, ref = fast.state_dict(), peft.state_dict()
    for key in changed:
        assert_near(after[key] - before[key], ref[key] - before[key], tol=1e-4, name=key)  # the updates


def test_fast_dora_off_and_with_dropout_runs_peft(tiny_model):
    """dora_fast=False leaves peft's forward; with dropout in training the fast one hands over to it."""
    fast, peft = dora_pair(tiny_model, lora_dropout=0.2)
    fast.train(), peft.train()
    torch.manual_seed(5)
    out, _, grads = forward_backward(fast)
    torch.manual_seed(5)
    ref_out, _, ref_grads = forward_backward(peft)
    assert torch.equal(out, ref_out)  # the same code path, the same dropout masks
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)


def test_dora_overhead_bench_runs_on_cpu(tmp_path):
    """bench/dora_overhead.py --quick (tiny sizes): every variant runs, the toolkit's equals peft's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "dora_overhead.py"
    spec = importlib.util.spec_from_file_location("dora_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for dtype, variants in (("fp32", 6), ("bf16", 8)):
        output = tmp_path / f"{dtype}.json"
        record = bench.main(["--quick", "--device", "cpu", "--dtype", dtype, "--output", str(output)])
        assert json.loads(output.read_text()) == record
        rows = record["rows"]
        assert {row["kind"] for row in rows} == {"self", "cross"} and len(rows) == 2 * variants
        assert all(row["ms"] > 0 and row["ms_min"] > 0 for row in rows)
        fused = [row for row in rows if row["variant"] == "dora+fused"]
        assert len(fused) == 2 and all(row["max_rel_err"] < (1e-5 if dtype == "fp32" else 3e-2) for row in fused)


# --- SD1.5's real architecture on the meta device: exact counts (REFERENCE.md section 1) ---


def sd15_difffit_count(config, biases=343_684, resnets=False):
    """Biases (REFERENCE.md) + norm weights + gamma widths, from the U-Net config alone."""
    channels, layers = config["block_out_channels"], config["layers_per_block"]
    cross_down = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    cross_up = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]
    # transformer widths: `layers` per cross-attention down block, one in the middle, layers+1 per up block
    widths = [c for c, x in zip(channels, cross_down) if x for _ in range(layers)] + [channels[-1]]
    widths += [c for c, x in zip(reversed(channels), cross_up) if x for _ in range(layers + 1)]
    # ResNet (in, out) channels; the up path concatenates the skips the down path pushed
    resnet_io, skips, prev = [], [channels[0]], channels[0]  # conv_in's output is the first skip
    for i, c in enumerate(channels):
        for _ in range(layers):
            resnet_io.append((prev, c))
            skips.append(c)
            prev = c
        if i < len(channels) - 1:
            skips.append(c)  # the downsampler's output
    resnet_io += [(prev, prev)] * 2  # mid block
    for c in reversed(channels):
        for _ in range(layers + 1):
            resnet_io.append((prev + skips.pop(), c))
            prev = c
    norm_weights = sum(i + o for i, o in resnet_io)  # GroupNorm before each conv of a ResNet
    norm_weights += 4 * sum(widths)  # a transformer's GroupNorm + its block's 3 LayerNorms
    norm_weights += channels[0]  # conv_norm_out
    gammas = 3 * sum(widths) + (sum(o for _, o in resnet_io) if resnets else 0)
    return biases + norm_weights + gammas


@pytest.mark.parametrize(
    "name, settings, expected",
    [
        ("lora", {"lora_rank": 4}, 797_184),
        ("lora", {"lora_rank": 8}, 1_594_368),
        ("lora", {"lora_rank": 16}, 3_188_736),
        ("dora", {"lora_rank": 8}, 1_694_208),
        ("dora", {"lora_rank": 16}, 3_288_576),
        ("bitfit", {}, 343_684),
        ("difffit", {}, sd15_difffit_count(SD15_UNET_CONFIG)),
        ("difffit", {"difffit_resnets": True}, sd15_difffit_count(SD15_UNET_CONFIG, resnets=True)),
    ],
)
def test_trainable_counts_on_sd15(name, settings, expected):
    unet = build_sd15_unet("meta")
    assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMS == 859_520_964
    unet.requires_grad_(False)
    adapter = get_adapter(name, AdapterConfig(**settings))
    adapter.apply(unet)
    count = sum(p.numel() for p in adapter.trainable_parameters(unet))
    share = 100 * count / SD15_UNET_PARAMS
    print(f"{name} {json.dumps(settings)}: {count:,} trainable = {share:.4f}% of SD1.5's U-Net")
    assert count == expected
    assert count == sum(p.numel() for p in unet.parameters() if p.requires_grad)


def test_sd15_difffit_count_by_hand():
    """The formula above, spelled out: 343,684 biases + 100,160 norm weights + 37,440 gammas."""
    assert sd15_difffit_count(SD15_UNET_CONFIG) == 343_684 + 100_160 + 3 * 12_480 == 481_284
    assert sd15_difffit_count(SD15_UNET_CONFIG, resnets=True) == 481_284 + 20_160
