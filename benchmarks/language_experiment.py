"""Does language help HLSS? A tiny CLIP pretrained on captions of what the synthetic renderer draws,
then HiDisc and HLSS from that tower with real, rotated and shuffled attribute text.

1. Captions from the renderer's facts: ``HETissueRenderer`` knows each slide's structure class
   (glands: rings of columnar nuclei around pale lumens; solid: dense sheets of small round nuclei;
   spindle: elongated nuclei along wavy collagen; pleomorphic: sparse large nuclei of varied size) and
   its stain (hematoxylin and eosin strengths of ``Stain.from_seed``, binned into pale / moderate /
   dark). Tiles (96 px at 1 µm/px, as the benchmark store has them) are rendered from renderer seeds
   that no benchmark slide uses (``PRETRAIN_SEED`` onwards), each with one caption.
2. A tiny transformers ``CLIPModel`` (``hlss_model.towers.make_tiny_clip``: ViT and text transformer,
   width 32, 2 layers, 32 px images) is trained with CLIP's contrastive loss (``return_loss=True``)
   on those tiles and saved as a folder that ``model.tower: clip:<folder>`` loads. Check: on held-out
   captioned tiles (other renderer seeds) the tower picks the right caption among all
   class x H x E captions, against chance.
3. From that tower, on the benchmark store of ``hlss_vs_hidisc.py`` (same data, batches and steps,
   same seeds): HiDisc; HLSS with attribute sentences that describe the rendered facts
   (``benchmarks/attributes_synthetic/``); HLSS with the same attribute embeddings turned by one
   random orthogonal D x D matrix before the heads and HA (same spectrum and mutual angles, no
   relation to the image tower: a benchmark-only patch of ``hlss_model.text.attribute_embeddings``);
   HLSS with shuffled text (each level's sentences dealt out again across its attributes, so every
   attribute embeds a mix of facts; ``hlss_permuted``, whole sentence lists permuted across
   attributes, is kept to show that relabelling alone changes nothing: see :func:`permuted`).
   Evaluation as in ``hlss_vs_hidisc.py`` (kNN on features and z, linear probe on slide embeddings).

    python benchmarks/language_experiment.py                 # defaults: ~17 min, loaded 2-core CPU
    python benchmarks/language_experiment.py --seeds 0 1 2 3 4 --steps 240 --pretrain-steps 1000
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

import hlss_model.text as text_module  # noqa: E402
from hlss_model.towers import make_tiny_clip  # noqa: E402
from pipeline.synthetic import CLASS_NAMES, HETissueRenderer  # noqa: E402

import hlss_vs_hidisc as bench  # noqa: E402  (this folder is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent
ATTRIBUTES = HERE / "attributes_synthetic"
# first renderer seed of the pretraining and check slides; make_demo_cohort draws its slides' seeds at
# random in [0, 2**31), so one of its 48 slides sharing one of these ~160 seeds has odds of about 4e-6
PRETRAIN_SEED = 1_000_000
TILE, DOWNSAMPLE, SLIDE = 96, 2, 1280  # stored tile px, level-0 px per tile px, slide side px (as the benchmark)

STRUCTURE = {  # class -> what the renderer draws (pipeline/synthetic.py: _gland_nuclei, _solid, _spindle, _pleomorphic)
    "glandular": "glands with rings of columnar nuclei around pale empty lumens",
    "solid": "solid dense sheets of small round nuclei",
    "spindle": "elongated spindle nuclei along wavy pink collagen fibres",
    "pleomorphic": "sparse large nuclei of varied size and shape",
}
STRENGTH = ("pale", "moderate", "dark")


def strength_bin(norm: float, lo: float, hi: float) -> str:
    """``Stain.from_seed`` draws a strength uniformly in [lo, hi]: its third."""
    return STRENGTH[min(2, int(3 * (norm - lo) / (hi - lo)))]


def caption(cls: str, h: str, e: str, rng: random.Random | None = None) -> str:
    """A caption of the rendered facts; ``rng`` picks one of three word orders (None: the first)."""
    forms = (f"{STRUCTURE[cls]}, {h} hematoxylin, {e} eosin",
             f"{h} hematoxylin and {e} eosin stain; {STRUCTURE[cls]}",
             f"tissue with {STRUCTURE[cls]}; the stain is {h} hematoxylin with {e} eosin")
    return forms[rng.randrange(3)] if rng else forms[0]


def render_tiles(first_seed: int, slides: int, per_slide: int) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """``(N, 96, 96, 3)`` uint8 tissue tiles of ``slides`` synthetic slides (class = index mod 4) and the
    facts (class, H bin, E bin) of each."""
    tiles, facts = [], []
    for i in range(slides):
        cls = i % len(CLASS_NAMES)
        r = HETissueRenderer(SLIDE, SLIDE, tissue_class=cls, stain_seed=first_seed + 2 * i + 1, seed=first_seed + 2 * i)
        fact = (CLASS_NAMES[cls], strength_bin(float(np.linalg.norm(r.stain.hematoxylin)), 0.6, 1.45),
                strength_bin(float(np.linalg.norm(r.stain.eosin)), 0.6, 1.5))
        rng = np.random.default_rng(first_seed + i)
        found, tries = 0, 0
        while found < per_slide and tries < 40 * per_slide:
            tries += 1
            x, y = (int(v) for v in rng.integers(0, SLIDE - TILE * DOWNSAMPLE, 2))
            if r.tissue_mask(x, y, TILE, TILE, DOWNSAMPLE).mean() < 0.7:
                continue
            tiles.append(r.region(x, y, TILE, TILE, DOWNSAMPLE))
            facts.append(fact)
            found += 1
    return np.stack(tiles), facts


def to_pixels(tiles: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, size, size)``."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def pretrain_clip(folder: Path, steps: int, batch: int, slides: int, per_slide: int, lr: float,
                  check_slides: int) -> dict:
    """Train a tiny CLIP on captioned tiles and save it to ``folder``; returns the retrieval check."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    make_tiny_clip(folder, image_size=32, dim=32, seed=0)
    model, tok = CLIPModel.from_pretrained(str(folder)), CLIPTokenizer.from_pretrained(str(folder))
    proc = CLIPImageProcessor.from_pretrained(str(folder))
    t = time.perf_counter()
    tiles, facts = render_tiles(PRETRAIN_SEED, slides, per_slide)
    check_tiles, check_facts = render_tiles(PRETRAIN_SEED + 10 * slides + 7, check_slides, per_slide)
    render_s = time.perf_counter() - t
    pixels = to_pixels(tiles, 32, proc.image_mean, proc.image_std)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    model.train()
    t, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randperm(len(pixels), generator=gen)[:batch]
        x = pixels[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)  # flips, turns
        x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1))
        enc = tok([caption(*facts[i], rng) for i in idx.tolist()], padding=True, return_tensors="pt")
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=x,
                     return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t
    model.eval()
    model.save_pretrained(str(folder))
    check = retrieval(model, tok, to_pixels(check_tiles, 32, proc.image_mean, proc.image_std), check_facts)
    return {**check, "pretrain_steps": steps, "batch": batch, "tiles": len(pixels), "slides": slides,
            "check_tiles": len(check_tiles), "check_slides": check_slides, "render_s": round(render_s, 1),
            "train_s": round(train_s, 1), "loss_first_10": round(float(np.mean(losses[:10])), 3),
            "loss_last_10": round(float(np.mean(losses[-10:])), 3)}


@torch.no_grad()
def retrieval(model, tok, pixels: torch.Tensor, facts: list[tuple[str, str, str]]) -> dict:
    """Top-1 accuracy of picking each tile's caption among all class x H x E captions (and its parts)."""
    options = [(c, h, e) for c in CLASS_NAMES for h in STRENGTH for e in STRENGTH]
    enc = tok([caption(*o) for o in options], padding=True, return_tensors="pt")
    txt = F.normalize(model.text_projection(model.text_model(**enc).pooler_output), dim=-1)
    img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    best = [options[i] for i in (img @ txt.T).argmax(1).tolist()]
    part = lambda j: 100 * float(np.mean([b[j] == f[j] for b, f in zip(best, facts)]))  # noqa: E731
    return {"caption_top1": round(100 * float(np.mean([b == f for b, f in zip(best, facts)])), 1),
            "caption_chance": round(100 / len(options), 1), "class_top1": round(part(0), 1),
            "class_chance": 25.0, "hematoxylin_top1": round(part(1), 1), "eosin_top1": round(part(2), 1),
            "stain_chance": round(100 / 3, 1)}


def synthetic_attributes() -> dict[str, list[dict]]:
    """Per level, attributes describing the rendered facts (the captions' vocabulary, other sentences)."""
    where = {"patch": "this tile shows", "slide": "across the slide the tissue shows",
             "patient": "the patient's tumour shows"}
    levels = {}
    for level, lead in where.items():
        attrs = [{"name": f"{cls}_structure", "sentences": [f"{lead} {STRUCTURE[cls]}", STRUCTURE[cls],
                                                            f"{STRUCTURE[cls]} throughout the tissue"]}
                 for cls in CLASS_NAMES]
        if level != "patient":  # the stain is a slide's (staining batch), not the patient's
            attrs += [{"name": f"{s}_{stain}", "sentences": [f"{lead} {s} {stain}", f"{s} {stain} stain",
                                                             f"the {stain} staining is {s}"]}
                      for stain in ("hematoxylin", "eosin") for s in STRENGTH]
        levels[level] = attrs
    return levels


def write_attributes(folder: Path, levels: dict[str, list[dict]]) -> Path:
    """An attribute folder (``patch.yaml``, ``slide.yaml``, ``patient.yaml``) for ``model.attributes``."""
    folder.mkdir(parents=True, exist_ok=True)
    for level, attrs in levels.items():
        (folder / f"{level}.yaml").write_text(yaml.safe_dump({"level": level, "attributes": attrs}, sort_keys=False))
    return folder


def permuted(levels: dict[str, list[dict]], seed: int = 0) -> dict[str, list[dict]]:
    """The same names with each level's sentence lists permuted across its attributes (no list stays put).

    A degenerate control: the level's set of embeddings is unchanged, only relabelled, and HVC (cosine
    similarities of head outputs) and HA (nearest attribute) do not see labels, so whitened heads are
    the same up to a permutation of their outputs; runs differ only by floating-point order.
    """
    rng = random.Random(seed)
    out = {}
    for level, attrs in levels.items():
        order = list(range(len(attrs)))
        while any(i == j for i, j in enumerate(order)):
            rng.shuffle(order)
        out[level] = [{"name": a["name"], "sentences": attrs[j]["sentences"]} for a, j in zip(attrs, order)]
    return out


def shuffled(levels: dict[str, list[dict]], seed: int = 0) -> dict[str, list[dict]]:
    """Each level's sentences pooled and dealt out again at random (same count per attribute), each
    attribute getting sentences of as many different attributes as it can: the embeddings become
    mixtures that describe no one rendered fact."""
    rng = random.Random(seed)
    out = {}
    for level, attrs in levels.items():
        pool = [(i, s) for i, a in enumerate(attrs) for s in a["sentences"]]
        rng.shuffle(pool)
        pool.sort(key=lambda item: item[0])  # grouped by source attribute, random within it
        n = len(attrs)
        dealt: list[list[str]] = [[] for _ in range(n)]
        for k, (_, sentence) in enumerate(pool):  # round robin: attribute k mod n, sources spread out
            dealt[(k + k // n) % n].append(sentence)
        out[level] = [{"name": a["name"], "sentences": dealt[i]} for i, a in enumerate(attrs)]
    return out


@contextlib.contextmanager
def rotated_attributes(seed: int):
    """While active, every attribute embedding is turned by one random orthogonal matrix (seeded by
    ``seed``; the same for all levels) and re-normalised: the rows keep their spectrum, not their text."""
    original = text_module.attribute_embeddings

    def turned(*args, **kwargs):
        emb = original(*args, **kwargs)
        d = next(iter(emb.values())).shape[1]
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(10_000 + seed)))
        return {level: F.normalize(v.float() @ q, dim=1) for level, v in emb.items()}

    text_module.attribute_embeddings = turned
    try:
        yield
    finally:
        text_module.attribute_embeddings = original


def main() -> None:
    ap = bench.parser(__doc__)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--pretrain-batch", type=int, default=64)
    ap.add_argument("--pretrain-slides", type=int, default=64, help="captioned synthetic slides (16 per class)")
    ap.add_argument("--pretrain-tiles", type=int, default=12, help="tiles per pretraining slide")
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--reuse-tower", action="store_true", help="keep the tiny CLIP a previous run pretrained")
    ap.set_defaults(methods=["hidisc", "hlss", "hlss_rotated", "hlss_shuffled"], out_name="language_experiment",
                    image_size=32)
    for action in ap._actions:  # the methods of this experiment, not the benchmark's list
        if action.dest == "methods":
            action.choices = None
    args = bench.finish_args(ap.parse_args())
    t0 = time.perf_counter()
    bench.OUT.mkdir(exist_ok=True)
    folder = bench.OUT / "tiny_clip_synthetic"
    if args.reuse_tower and (folder / "pretrain_check.json").is_file():
        check = json.loads((folder / "pretrain_check.json").read_text())
    else:
        check = pretrain_clip(folder, args.pretrain_steps, args.pretrain_batch, args.pretrain_slides,
                              args.pretrain_tiles, args.pretrain_lr, check_slides=16)
        (folder / "pretrain_check.json").write_text(json.dumps(check))
    print("tiny CLIP:", json.dumps(check), flush=True)
    real = write_attributes(ATTRIBUTES / "real", synthetic_attributes())
    mixed = write_attributes(ATTRIBUTES / "shuffled", shuffled(synthetic_attributes()))
    relabelled = write_attributes(ATTRIBUTES / "permuted", permuted(synthetic_attributes()))
    args.tower = f"clip:{folder}"
    store = args.store or bench.build_store(args.patients, args.classes, args.size, args.cohort_seed,
                                            args.slides_per_patient, args.tile_size, args.tile_mpp, args.held_out)
    methods = {"hidisc": {"method": "hidisc"},
               "hlss": {"method": "hlss", "model": {"attributes": str(real)}},
               "hlss_rotated": {"method": "hlss", "model": {"attributes": str(real)}},
               "hlss_shuffled": {"method": "hlss", "model": {"attributes": str(mixed)}},
               "hlss_permuted": {"method": "hlss", "model": {"attributes": str(relabelled)}}}
    methods = {m: methods[m] for m in args.methods}
    device = bench.machine()
    results: dict = {}

    def save() -> None:
        wall = round(time.perf_counter() - t0, 1)
        meta = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "store": str(store), "device": device, "wall_s": wall, "tiny_clip": check}
        (bench.OUT / f"{args.out_name}.json").write_text(json.dumps({**meta, "results": results}, indent=2))
        (bench.OUT / f"{args.out_name}.md").write_text(
            f"tiny CLIP ({folder.name}) at {args.image_size} px, {args.steps} steps of {args.batch_patients} "
            f"patients x {args.slides_per_patient} slides x 2 tiles x 2 views, lr {args.lr}; k = {args.k}; "
            f"{device}; wall {wall} s\n\nTiny CLIP check: {json.dumps(check)}\n\n"
            + bench.markdown(results, args.seeds))

    def prepare(method: str, seed: int):
        return rotated_attributes(seed) if method == "hlss_rotated" else contextlib.nullcontext()

    bench.run_protocol(store, methods, args, bench.OUT / f"{args.out_name}_runs", results, save, prepare)
    print((bench.OUT / f"{args.out_name}.md").read_text())


if __name__ == "__main__":
    main()
