"""Whatever the project deletes lies inside the folder that owns it, checked as a resolved path
(pipeline.files.remove_owned), never decided by where a file read back from disk points."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.files import OutsideOwnerError, owned_path, remove_owned

VICTIM = b"precious, not the project's"


@pytest.fixture
def layout(tmp_path):
    """``owner`` (with a file, a folder and two symlinks leading out) beside ``outside`` (the victims)."""
    owner, outside = tmp_path / "owner", tmp_path / "outside"
    (owner / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim.png").write_bytes(VICTIM)
    (owner / "mine.png").write_bytes(b"x")
    (owner / "sub" / "a.png").write_bytes(b"y")
    (owner / "escape").symlink_to(outside, target_is_directory=True)
    (owner / "link.png").symlink_to(outside / "victim.png")
    return owner, outside


@pytest.mark.parametrize("path", ["../outside/victim.png", "sub/../../outside/victim.png", "escape/victim.png",
                                  "{outside}/victim.png", "{outside}", ".", "", "sub/.."])
def test_paths_outside_the_owner_are_refused(layout, path):
    owner, outside = layout
    path = path.format(outside=outside)
    with pytest.raises(OutsideOwnerError, match="refusing to remove or replace it"):
        remove_owned(owner, path)
    assert (outside / "victim.png").read_bytes() == VICTIM and (owner / "sub" / "a.png").exists()


def test_inside_files_folders_and_links_are_removed_links_not_followed(layout):
    owner, outside = layout
    assert remove_owned(owner, "mine.png") and not (owner / "mine.png").exists()
    assert remove_owned(owner, owner / "sub") and not (owner / "sub").exists()
    assert remove_owned(owner, "link.png") and not (owner / "link.png").is_symlink()
    assert remove_owned(owner, "escape") and not (owner / "escape").exists()  # the link, not the folder it names
    assert (outside / "victim.png").read_bytes() == VICTIM
    assert remove_owned(owner, "never-there.png") is False
    assert owned_path(owner, "x/../y.png") == owner.resolve() / "y.png"


def test_report_picture_index_cannot_delete_outside_its_folder(train_store, tmp_path, caplog):
    """A planted index.json names ../../victim, an absolute path, a path through a symlinked folder and a
    symlinked picture: none of their targets is deleted; a genuinely stale picture still is."""
    from store_snapshot import assert_unchanged, snapshot

    from pipeline.report import write_report
    from pipeline.store import SlideStore

    before = snapshot(train_store)
    out = tmp_path / "a" / "b" / "r.html"
    out.parent.mkdir(parents=True)
    write_report(SlideStore(train_store), out, max_px=64, pictures="files")
    folder = out.parent / "r_files"
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [tmp_path / "a" / "victim.png", outside / "abs.png", outside / "via-folder.png", outside / "linked.png"]
    for v in victims:
        v.write_bytes(VICTIM)
    (folder / "escape").symlink_to(outside, target_is_directory=True)
    (folder / "linked.png").symlink_to(outside / "linked.png")
    (folder / "slides" / "gone").mkdir()
    (folder / "slides" / "gone" / "x.png").write_bytes(b"stale")
    index = json.loads((folder / "index.json").read_text())
    entry = {"version": "v", "w": 1, "h": 1, "source": "qc"}
    hostile = ["../../victim", str(outside / "abs"), "escape/via-folder", "linked"]
    index.update({k: entry for k in [*hostile, "slides/gone/x"]})
    (folder / "index.json").write_text(json.dumps(index))

    write_report(SlideStore(train_store), out, max_px=64, pictures="files")
    assert all(v.read_bytes() == VICTIM for v in victims)
    assert not (folder / "slides" / "gone" / "x.png").exists()  # the index still prunes inside its folder
    assert not (folder / "linked.png").is_symlink()  # the planted link itself went, as a link
    assert not set(hostile) & set(json.loads((folder / "index.json").read_text()))
    refused = [r.getMessage() for r in caplog.records if "refusing to remove" in r.getMessage()]
    assert len(refused) == 3 and all(str(folder / "index.json") in m for m in refused)
    assert_unchanged(before, snapshot(train_store))


def test_clean_staging_removes_a_planted_link_not_its_target(train_store, tmp_path):
    from store_snapshot import assert_unchanged, snapshot

    from pipeline.store import StoreWriter

    store = tmp_path / "s.zarr"
    shutil.copytree(train_store, store)
    before = snapshot(store)
    victim = tmp_path / "victim-dir"
    victim.mkdir()
    (victim / "data.bin").write_bytes(VICTIM)
    (store / "_staging" / "replaced-evil").symlink_to(victim, target_is_directory=True)
    removed = StoreWriter(store).clean_staging()
    assert "replaced-evil" in removed and not (store / "_staging" / "replaced-evil").is_symlink()
    assert (victim / "data.bin").read_bytes() == VICTIM
    assert_unchanged(before, snapshot(store))


def test_checkpoint_rotation_removes_a_planted_link_not_its_target(train_store, tiny_text_model, tmp_path):
    from tiny_training import tiny_config

    from hlss_model.train import train

    run = tmp_path / "run"
    victim = tmp_path / "victim-dir"
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(VICTIM)

    def plant(step, record):  # after the checkpoint of step 1: an old-looking "checkpoint" leading out
        if step == 1:
            (run / "checkpoints" / "step_00000000").symlink_to(victim, target_is_directory=True)

    cfg = tiny_config(tiny_text_model, steps=2, checkpoint_every=1, keep_checkpoints=1)
    assert train(train_store, run, cfg, progress=False, on_step=plant).steps == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert (victim / "model.safetensors").read_bytes() == VICTIM
