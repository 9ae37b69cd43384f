"""``hlss run``: the ``tile-and-train`` flow in this process, with defaults from the flow settings."""

from __future__ import annotations

from typing import Any, Sequence

from .settings import FlowConfigError, load_defaults

__all__ = ["FlowRunError", "tile_and_train_parameters", "run_tile_and_train"]


class FlowRunError(RuntimeError):
    """The flow run was refused (parameters Prefect rejects) or did not complete; the message says why."""


def tile_and_train_parameters(config: str | None = None, *, source: str | None = None, store: str | None = None,
                              run_dir: str | None = None, workers: int | None = None, threads: int | None = None,
                              scheduler_address: str | None = None, train_config: str | None = None,
                              steps: int | None = None, method: str | None = None, device: str | None = None,
                              resume: bool = False, encoders: Sequence[str] = (),
                              force_tiling: bool = False) -> dict[str, Any]:
    """The ``tile-and-train`` parameters: the flow settings (``config``, else ``$HLSS_FLOW_CONFIG``, and
    ``HLSS_*`` variables) with the values given here (None: keep the setting) on top; ``encoders`` are
    added to the configured ones. FlowConfigError when source or store is set nowhere (the run folder defaults to
    :func:`flows.settings.default_run_dir`)."""
    d = load_defaults(config)
    flat = {"source": source, "store": store, "run_dir": run_dir, "workers": workers, "threads": threads,
            "scheduler_address": scheduler_address}
    d = d.model_copy(update={k: v for k, v in flat.items() if v is not None})
    training = {"config": train_config, "steps": steps, "method": method, "device": device, "resume": resume or None}
    d.training = d.training.model_copy(update={k: v for k, v in training.items() if v is not None})
    if device:
        d.extraction = d.extraction.model_copy(update={"device": device})
    if encoders:
        d.extraction = d.extraction.model_copy(update={"encoders": d.extraction.encoders + list(encoders)})
    params = d.flow_parameters("tile-and-train")
    missing = [k for k in ("source", "store") if not params.get(k)]
    if missing:
        raise FlowConfigError(f"set {', '.join('--' + k.replace('_', '-') for k in missing)} "
                              "(or in the flow config / HLSS_* variables)")
    return {**params, "force_tiling": force_tiling}


def run_tile_and_train(params: dict[str, Any]) -> dict[str, Any]:
    """Run ``tile-and-train`` here with ``params`` (:func:`tile_and_train_parameters`) and return its
    outcome (:func:`flows.summary.summary_markdown` renders it). Uses ``PREFECT_API_URL``'s server,
    else Prefect's temporary local one; raises :class:`~flows.serve.PrefectAPIError` when that API
    does not answer, :class:`FlowRunError` when the run is refused or does not complete."""
    from prefect.exceptions import ParameterTypeError

    from .serve import check_api
    from .tile_and_train import tile_and_train

    check_api(require_server=False)
    try:
        state = tile_and_train(**params, return_state=True)
    except ParameterTypeError as e:
        raise FlowRunError(str(e)) from e
    outcome = state.result(raise_on_failure=False)
    if not state.is_completed():
        raise FlowRunError(f"tile-and-train {state.name.lower()}: {outcome}")
    return outcome
