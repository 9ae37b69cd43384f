"""The tiny training config the training, report, explain and run-folder tests share: a resnet10t
on 32 px views, 4 steps on the CPU, the tiny random text model of the ``tiny_text_model`` fixture."""

from __future__ import annotations

from hlss_model.config import TrainConfig

__all__ = ["tiny_config"]


def tiny_config(tiny_text_model, **changes) -> TrainConfig:
    base = {
        "method": "hlss", "steps": 4, "seed": 7, "checkpoint_every": 2, "log_every": 1,
        "device": "cpu", "channels_last": False,
        "sampler": {"batch_size": 4, "slides_per_patient": 2, "tiles_per_slide": 2, "views_per_tile": 2,
                    "num_workers": 0},
        "model": {"backbone": "resnet10t", "text_encoder": str(tiny_text_model)},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "augment": {"out_size": 32},
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return TrainConfig.from_dict(base)
