"""The steps the flows are made of, as Prefect tasks over :mod:`pipeline` and :mod:`hlss_model`.

Each step is a plain function underneath (``.fn``), so it can be called without Prefect. Caching
is off everywhere (``NO_CACHE``): the store and the run folder are the cache, keyed on slide
content and parameters (tiling), weights fingerprints (features) and the run's own checkpoints
(training), so a deleted or edited store is rebuilt instead of being answered from a stale record.
"""

from __future__ import annotations

import itertools
import time
import uuid
from contextlib import ExitStack
from typing import Any, Callable, Iterable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from hlss_model.extract import ExtractReport, resolve_device
from pipeline.cohort import SlideSpec, discover_cohort
from pipeline.config import TilingParams
from pipeline.files import utc_now
from pipeline.run_folder import RunFolder, is_run_folder, read_metrics, read_run
from pipeline.store import SlideStore, StoreError, StoreWriter
from pipeline.runner import WORKER_RETRIES, CohortPlan, apply_updates, dropped_by, plan_cohort, slide_failed, tile_one
from pipeline.tiler import SlideResult

from .executor import SlideExecutor, WorkerLost
from .limits import device_slot
from .settings import EvaluationSettings, ExtractionSettings, FlowConfigError, TrainingSettings
from .work import EncoderSpec, extract_slides

__all__ = [
    "plan_slides", "tile_slides", "tile_phase", "rederived", "run_state", "training_curve", "train_step",
    "extract_step", "knn_step",
    "register_executor", "release_executor",
]

_EXECUTORS: dict[str, SlideExecutor] = {}


def register_executor(executor: SlideExecutor) -> str:
    """A key tasks use to find ``executor`` (executors are live objects, not task parameters)."""
    key = uuid.uuid4().hex
    _EXECUTORS[key] = executor
    return key


def release_executor(key: str) -> None:
    _EXECUTORS.pop(key, None)


# -- tiling ------------------------------------------------------------------------------------

@task(name="plan-slides", cache_policy=NO_CACHE)
def plan_slides(source: str, store: str, params: TilingParams, force: bool = False) -> CohortPlan:
    """Discover the cohort, decide slide by slide what needs tiling and why, and make the store follow
    it (moves and relabels, see :func:`pipeline.runner.plan_cohort`): the same planning as ``hlss tile``.

    Flows retile slides that have features or attribute scores (dropping them; ``plan.dropped``
    names them) and re-extract the features of their own encoders afterwards.
    """
    logger = get_run_logger()
    cohort = discover_cohort(source)
    writer = StoreWriter(store)
    writer.clean_staging()
    plan = plan_cohort(cohort, writer, params, force=force, drop_derived=True)
    todo, failed = apply_updates(writer, plan)
    plan.results += failed
    kept = set(todo)
    plan.todo = [(spec, why) for spec, why in plan.todo if spec in kept]
    for update in plan.updates:
        logger.info("updated %s", update.line())
    for (p, s), sets in plan.dropped.items():
        logger.warning("%s/%s is retiled: %s become invalid and are dropped", p, s, ", ".join(sets))
    logger.info("%d slides: %d to tile, %d unchanged, %d updated, %d rejected",
                len(cohort.slides) + len(cohort.problems), len(plan.todo),
                sum(r.status == "skipped" for r in plan.results), len(plan.updates), len(cohort.problems))
    return plan


def _worker_died(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a slide only when its worker process died, as ``hlss tile`` does."""
    return isinstance(state.data, WorkerLost)


@task(name="tile-slide", task_run_name="tile {spec.patient_id}/{spec.slide_id}", retries=WORKER_RETRIES,
      retry_delay_seconds=2, retry_condition_fn=_worker_died, cache_policy=NO_CACHE)
def tile_slide_task(spec: SlideSpec, store: str, params: TilingParams, threads: int, executor_key: str) -> SlideResult:
    """One slide in a worker process (:func:`pipeline.runner.tile_one`, the work of ``hlss tile``); a dead
    worker raises :class:`~flows.executor.WorkerLost`, so Prefect retries the slide."""
    result = _EXECUTORS[executor_key].run(tile_one, spec, store, params, threads)
    logger = get_run_logger()
    if result.status == "failed":
        logger.warning("%s/%s failed: %s", spec.patient_id, spec.slide_id, result.error)
    else:
        logger.info("%s/%s: %d tiles in %.1f s", spec.patient_id, spec.slide_id, result.n_tiles, result.seconds)
    return result


def tile_slides(todo: list[SlideSpec], store: str, params: TilingParams, threads: int, executor_key: str,
                slots: int) -> list[SlideResult]:
    """Tile ``todo`` as one ``tile-slide`` task per slide, ``slots`` at a time.

    A slide whose task fails after its retries is recorded as failed in the store (unless a
    complete version is there, :func:`pipeline.runner.slide_failed`) and reported; the other slides go on.
    """
    def submit(spec: SlideSpec) -> PrefectFuture:
        return tile_slide_task.submit(spec, store, params, threads, executor_key)

    def finish(spec: SlideSpec, future: PrefectFuture) -> SlideResult:
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, SlideResult):
            return outcome
        error = outcome if isinstance(outcome, BaseException) else f"{spec.path}: task ended {future.state.name}"
        return slide_failed(store, spec, params, error)

    return _windowed(todo, submit, finish, slots)


def tile_phase(source: str, store: str, params: TilingParams, threads: int, executor: SlideExecutor,
               executor_key: str, force: bool = False
               ) -> tuple[list[SlideResult], dict[tuple[str, str], str], dict[tuple[str, str], list[str]]]:
    """Plan, then tile what changed: every slide's result; why each tiled, moved or relabelled slide
    was; and the derived sets (``features/<name>``, ``attributes/<run>``) each retiled slide dropped."""
    plan = plan_slides(source, store, params, force)
    reasons = {(spec.patient_id, spec.slide_id): why for spec, why in plan.todo}
    for update in plan.updates:
        key = (update.patient_id, update.slide_id)
        reasons[key] = f"{reasons[key]}; {update.what()}" if key in reasons else update.what()
    tiled = tile_slides([spec for spec, _ in plan.todo], store, params, threads, executor_key, executor.slots)
    return plan.results + tiled, reasons, dropped_by(plan, tiled)


def rederived(store: str, dropped: dict[tuple[str, str], list[str]]) -> list[dict[str, Any]]:
    """Each derived set a retile dropped, and whether this run made it again (``features/<name>``
    complete again for the new tiles), as ``{slide, set, remade}`` rows."""
    reader = SlideStore(store)
    rows = []
    for (p, s), sets in sorted(dropped.items()):
        have = {f"features/{n}" for n in reader.feature_names(p, s)} | \
            {f"attributes/{n}" for n in reader.attribute_runs(p, s)}
        rows += [{"slide": f"{p}/{s}", "set": name, "remade": name in have} for name in sets]
    return rows


def _windowed(items: Iterable, submit: Callable, finish: Callable, slots: int) -> list:
    """Submit ``items`` keeping at most ``slots`` in flight (so the UI shows queued work as pending)."""
    pending = iter(items)
    inflight = {submit(item): item for item in itertools.islice(pending, slots)}
    results = []
    while inflight:
        future = next(as_completed(list(inflight)))
        results.append(finish(inflight.pop(future), future))
        nxt = next(pending, None)
        if nxt is not None:
            inflight[submit(nxt)] = nxt
    return results


# -- training ----------------------------------------------------------------------------------

def run_state(run_dir: str) -> dict[str, Any]:
    """``{exists, step, steps, finished}`` of a training run folder; ``exists``: it holds a checkpoint
    (a start that never reached one is restarted, see :func:`hlss_model.train.train`)."""
    from hlss_model.config import TrainConfig

    run = RunFolder(run_dir)
    if not run.config.is_file() or not run.has_checkpoint():
        return {"exists": False, "step": 0, "steps": None, "finished": False}
    steps = TrainConfig.from_yaml(run.config).steps
    step = run.latest_step()
    finished = step >= steps and run.model.is_file()
    return {"exists": True, "step": step, "steps": steps, "finished": finished}


@task(name="train", task_run_name="train {run_dir}", cache_policy=NO_CACHE)
def train_step(store: str, run_dir: str, training: TrainingSettings) -> dict[str, Any]:
    """Train HLSS into ``run_dir``; a finished run is reused, an unfinished one resumed only when asked.

    Holds this host's slot for the training device (see :mod:`flows.limits`) while it trains.
    Returns ``{status: trained | restarted | resumed | reused, steps, final_loss, images_per_s, run_dir}``.
    """
    from hlss_model.config import TrainConfig
    from hlss_model.train import train

    logger = get_run_logger()
    state = run_state(run_dir)
    if state["finished"] and not training.resume:
        logger.info("run %s is finished (%d steps): reusing it; set training.resume to continue it", run_dir,
                    state["step"])
        return {"status": "reused", "steps": state["step"], **_final_metrics(run_dir), "run_dir": run_dir}
    if state["exists"] and not training.resume:
        raise RuntimeError(f"run_dir {run_dir} holds an unfinished run (step {state['step']} of {state['steps']}); "
                           "set training.resume=true to continue it, or choose another run_dir")
    if training.resume and state["exists"]:
        cfg, status = None, "resumed"
        if training.steps and training.steps != state["steps"]:
            raise RuntimeError(f"run_dir {run_dir}: a resumed run keeps its saved config ({state['steps']} steps); "
                               "drop training.steps or choose another run_dir")
    else:
        saved_yaml = RunFolder(run_dir).config  # resuming a start without a checkpoint: its config
        cfg = training.train_config(saved_yaml if training.resume and saved_yaml.is_file() else None)
        status = "trained"
    saved = TrainConfig.from_yaml(RunFolder(run_dir).config) if cfg is None else cfg
    device = training.device or saved.device
    with device_slot(str(resolve_device(device))) as slot:
        logger.info("training in %s (device slot %s)", run_dir, slot)
        t0 = time.perf_counter()
        result = train(store, run_dir, cfg, resume=status == "resumed", progress=False,
                       on_step=_log_every(logger, 25))
    logger.info("trained %d steps in %.0f s, final loss %.4f", result.steps, time.perf_counter() - t0,
                result.final_loss)
    if result.restarted:
        logger.warning("%s", result.restarted)
        status = "restarted"
    return {"status": status, "steps": result.steps, "final_loss": result.final_loss,
            "images_per_s": result.images_per_s, "run_dir": run_dir}


def _log_every(logger, every: int) -> Callable[[int, dict], None]:
    def on_step(step: int, record: dict) -> None:
        if step % every == 0:
            logger.info("step %d: loss %.4f", step, record.get("loss", float("nan")))
    return on_step


def _metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of the run's metrics.jsonl that have a step and a loss (empty when there is none)."""
    return [r for r in read_metrics(run_dir) if "loss" in r and "step" in r]


def _final_metrics(run_dir: str) -> dict[str, Any]:
    rows = _metrics(run_dir)
    return {"final_loss": rows[-1]["loss"] if rows else None, "images_per_s": None}


def training_curve(run_dir: str, points: int = 20) -> list[tuple[int, float]]:
    """``(step, loss)`` at up to ``points`` evenly spaced steps of the run's metrics.jsonl."""
    rows = _metrics(run_dir)
    if not rows:
        return []
    stride = max(1, len(rows) // points)
    picked = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    return [(int(r["step"]), float(r["loss"])) for r in picked]


# -- extraction --------------------------------------------------------------------------------

@task(name="extract-slide-features", task_run_name="extract {extraction.name} ({shard})", cache_policy=NO_CACHE)
def extract_task(store: str, encoders: list[EncoderSpec], slides: list[tuple[str, str]] | None,
                 extraction: ExtractionSettings, executor_key: str | None, shard: str = "all",
                 clean_staging: bool = True) -> ExtractReport:
    """Features of ``slides`` for each encoder: on the cluster when there is one, else here.

    Locally the step holds this host's device slot, so it never shares a GPU with training or
    another extraction; with ``extraction.devices``, one slot per device and one worker process
    each. On a Dask cluster, GPU work asks for a ``GPU`` resource when the workers declare one
    (``dask worker --resources GPU=1``), which keeps one job per device there.
    ``clean_staging``: False for shards running side by side (their step cleans once before).
    """
    logger = get_run_logger()
    args = (store, encoders, slides, extraction.batch_size, extraction.device, extraction.dtype,
            extraction.tile_filter, clean_staging)
    executor = _EXECUTORS.get(executor_key) if executor_key else None
    if executor is not None and executor.scheduler_address:
        gpu = extraction.device != "cpu" and "GPU" in executor.worker_resources()
        report = executor.run(extract_slides, *args, resources={"GPU": 1} if gpu else None)
    elif extraction.devices:
        report = _extract_on_devices(store, encoders, slides, extraction, logger)
    else:
        with device_slot(str(resolve_device(extraction.device))) as slot:
            logger.info("extracting on %s (device slot %s)", extraction.device, slot)
            report = extract_slides(*args)
    logger.info("%d slides extracted, %d already done, %d failed; %.1f tiles/s", len(report.extracted),
                len(report.skipped), len(report.failed), report.tiles_per_s)
    for p, s, err in report.failed:
        logger.warning("features of %s/%s failed: %s", p, s, err)
    return report


def _extract_on_devices(store: str, encoders: list[EncoderSpec], slides: list[tuple[str, str]] | None,
                        extraction: ExtractionSettings, logger) -> ExtractReport:
    """:func:`hlss_model.multi_device.extract_on_devices` over ``extraction.devices``, holding this
    host's slot of each device (taken in one order, so two runs never wait on each other)."""
    from hlss_model.multi_device import expand_devices, extract_on_devices
    from pipeline.qc import TileFilter

    devices = expand_devices(extraction.devices)
    with ExitStack() as stack:
        slots = [stack.enter_context(device_slot(d)) for d in sorted(set(devices))]
        logger.info("extracting on %s (device slots %s)", ", ".join(devices), ", ".join(slots))
        report = extract_on_devices(store, encoders, devices, batch_size=extraction.batch_size,
                                    dtype=extraction.dtype, slides=slides,
                                    tile_filter=TileFilter.from_dict(extraction.tile_filter))
    for run in report.devices:
        logger.info("%s: %d slides, %d tiles, %.1f tiles/s%s", run.device, len(run.share), run.report.tiles,
                    run.tiles_per_s, f"; stopped: {run.error}" if run.error else "")
    return report


def extract_step(store: str, encoders: list[EncoderSpec], extraction: ExtractionSettings,
                 executor: SlideExecutor, executor_key: str, slides: list[tuple[str, str]] | None = None
                 ) -> ExtractReport:
    """One extraction task locally; on a Dask cluster, one task per worker slot over a share of the slides."""
    if extraction.devices and executor.scheduler_address:
        raise FlowConfigError("extraction.devices starts workers on this machine; on a Dask cluster start one "
                              "dask worker per GPU (--resources GPU=1) and set extraction.device instead")
    if not executor.scheduler_address or executor.slots == 1:
        return extract_task.submit(store, encoders, slides, extraction, executor_key).result()
    if slides is None:
        reader = SlideStore(store)  # damaged slides come too: extraction reports each as failed, naming it
        slides = [(r.patient_id, r.slide_id) for r in reader.records(status="complete")]
    shards = [slides[i::executor.slots] for i in range(executor.slots)]
    StoreWriter(store).clean_staging()  # once: a shard cleaning could undo another's commit in progress
    futures = [extract_task.submit(store, encoders, shard, extraction, executor_key, f"{i + 1}/{len(shards)}", False)
               for i, shard in enumerate(shards) if shard]
    return ExtractReport.merged(future.result() for future in futures)


# -- evaluation --------------------------------------------------------------------------------

@task(name="knn", task_run_name="knn {feature}", cache_policy=NO_CACHE)
def knn_step(store: str, feature: str, run_dir: str | None, evaluation: EvaluationSettings) -> dict[str, Any]:
    """kNN accuracy of stored features on the run's held-out patients; recorded in the store and the run.

    Returns the report as a dict, or ``{"skipped": reason}`` when the cohort has no labels to test.
    """
    from hlss_model.evaluate import knn_from_store

    logger = get_run_logger()
    split = read_run(run_dir)["split"] if run_dir and is_run_folder(run_dir) else None
    try:
        report = knn_from_store(store, features=feature, split=split, k=evaluation.k,
                                temperature=evaluation.temperature,
                                max_tiles_per_slide=evaluation.max_tiles_per_slide, seed=evaluation.seed)
    except (KeyError, ValueError, StoreError) as e:  # StoreDamageError names patient, slide, array, file
        logger.warning("kNN evaluation skipped: %s", e)
        return {"skipped": str(e)}
    for damage in report.damaged:
        logger.warning("kNN left out a damaged slide: %s", damage)
    logger.info("kNN on %s:\n%s", feature, report.table())
    doc = {**report.to_dict(), "feature": feature, "run_dir": run_dir,
           "evaluated": utc_now()}
    StoreWriter(store).write_evaluation(f"knn-{feature}", doc)
    if run_dir:
        RunFolder(run_dir).write_knn(feature, doc)
    return doc
