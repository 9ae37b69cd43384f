"""HLSS (Hierarchical Language-tied Self-Supervision) and HiDisc pretraining on a cohort store,
its evaluation (kNN), feature extraction and attribute maps: everything that uses torch.

Imports ``pipeline`` only (never ``flows`` or ``hlss``; tests/hlss/test_structure.py checks it). One
module per job: ``augment`` (H&E view augmentations), ``text`` (attribute descriptions and the
frozen text encoder), ``towers`` (CLIP / open_clip vision-language towers), ``data`` (patient -> slide -> tile sampling from the store), ``model``
(timm backbone, projection, per-level text heads), ``losses`` (SupCon, HiDisc, HVC, alignment),
``config`` (typed training configuration), ``train`` (the training loop, checkpoints, DDP; the
function is ``hlss_model.train.train``, also ``hlss.train``), ``runs`` (a trained run as an
encoder; its folder's format is :mod:`pipeline.run_folder`), ``encoders`` (timm backbones as
extraction encoders), ``extract`` (feature extraction into the store), ``knn`` and ``evaluate``
(kNN evaluation), ``explain`` (attribute maps), ``checks`` (device and weights-file values). The
curated names below are imported lazily, on first use.
"""

from pipeline.lazy import lazy_exports

_WHERE = {
    "TrainConfig": ".config", "ConfigError": ".config",
    "run_encoder": ".runs", "read_run": ".runs",
    "knn_from_store": ".evaluate", "explain_slide": ".explain", "explain_patient": ".explain",
    "extract_features": ".extract", "timm_encoder": ".encoders",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
