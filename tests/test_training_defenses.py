"""Training-time defenses keep clean accuracy: RND-GF (Gaussian augmentation) and output randomization."""

import pytest

from rnd_jax import train


@pytest.mark.parametrize("kw", [dict(augment_noise=0.1), dict(logit_noise=1.0)])
def test_training_time_defense_keeps_accuracy(kw, digits_model, digits_test, cache_dir):
    clean = train.accuracy(*digits_model, *digits_test)
    model, params = train.load_or_train("digits_cnn", "digits", train.TrainConfig(**kw), cache_dir=cache_dir,
                                        progress=False)
    acc = train.accuracy(model, params, *digits_test)
    assert acc >= clean - 0.02, (kw, acc, clean)
    assert train.cache_path("digits_cnn", "digits", train.TrainConfig(**kw), cache_dir).exists()
