"""HLSS (Hierarchical Language-tied Self-Supervision) and HiDisc pretraining on a cohort store.

One module per job: ``augment`` (H&E view augmentations), ``text`` (attribute descriptions and the
frozen text encoder), ``data`` (patient -> slide -> tile sampling from the store), ``model``
(timm backbone, projection, per-level text heads), ``losses`` (SupCon, HiDisc, HVC, alignment),
``config`` (typed training configuration), ``train`` (the training loop, checkpoints, DDP),
``runs`` (a trained run as an encoder; its folder's format is :mod:`pipeline.run_folder`), ``encoders``
(timm backbones as extraction encoders), ``extract`` (feature extraction into the store), ``knn`` and
``evaluate`` (kNN evaluation).
"""
