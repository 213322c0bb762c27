"""The strategy table is the study's (REFERENCE.md section 1); custom runs compose from flags."""

import pytest

from sdtune.strategies import STRATEGIES, resolve_strategy
from sdtune.train import TrainConfig, resolve_learning_rates

# name: (VAE, text encoder, U-Net) as in the study's table
STUDY = {
    "unet": (False, False, "full"), "text": (False, True, None), "vae": (True, False, None),
    "unet+text": (False, True, "full"), "unet+vae": (True, False, "full"), "vae+text": (True, True, None),
    "unet+vae+text": (True, True, "full"), "lora": (False, False, "lora"), "dora": (False, False, "dora"),
    "bitfit": (False, False, "bitfit"), "difffit": (False, False, "difffit"),
}


def test_table_is_the_studys():
    assert list(STRATEGIES) == list(STUDY)
    for name, (vae, text, unet) in STUDY.items():
        s = STRATEGIES[name]
        assert (s.vae, s.text_encoder, s.unet) == (vae, text, unet), name


def test_study_learning_rates():
    assert STRATEGIES["unet"].unet_lr == 1e-5
    assert STRATEGIES["text"].text_encoder_lr == 5e-6
    assert STRATEGIES["unet+text"].text_encoder_lr == 1e-6  # lower when trained with the U-Net
    assert STRATEGIES["vae"].vae_lr == 1e-6
    assert {STRATEGIES[n].unet_lr for n in ("lora", "dora", "bitfit", "difffit")} == {1e-4}


@pytest.mark.parametrize("flags, name", [
    (dict(train_unet=True), "unet"),
    (dict(train_unet=True, train_text_encoder=True, train_vae=True), "unet+vae+text"),
    (dict(train_vae=True, train_text_encoder=True), "vae+text"),
    (dict(peft="bitfit"), "bitfit"),
])
def test_flags_that_match_a_row_give_that_row(flags, name):
    assert resolve_strategy(**flags) is STRATEGIES[name]


def test_custom_combination():
    s = resolve_strategy(peft="lora", train_text_encoder=True)
    assert (s.name, s.unet, s.text_encoder, s.vae) == ("lora+text", "lora", True, False)
    assert s.unet_lr == 1e-4 and s.text_encoder_lr == 1e-6
    assert s.trains == {"unet": True, "text_encoder": True, "vae": False}
    assert s.full == {"unet": False, "text_encoder": True, "vae": False}


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="lora", train_unet=True), "not both"),
    (dict(), "nothing to train"),
    (dict(name="loha"), "unsupported strategy"),
    (dict(train_unet=True, peft="lora"), "choose one"),
])
def test_bad_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_strategy(**kwargs)


def test_learning_rate_precedence():
    s = STRATEGIES["unet+vae+text"]
    assert resolve_learning_rates(TrainConfig(), s) == {"unet": 1e-5, "text_encoder": 1e-6, "vae": 1e-6}
    assert resolve_learning_rates(TrainConfig(learning_rate=3e-6), s) == {"unet": 3e-6, "text_encoder": 3e-6, "vae": 3e-6}
    assert resolve_learning_rates(TrainConfig(learning_rate=3e-6, vae_lr=7e-7), s)["vae"] == 7e-7
