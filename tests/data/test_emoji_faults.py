"""Fault injection on the emoji cache: a preparation killed mid-way and re-run, a manifest
edited by hand or truncated. Rendering is replaced by plain images (no cairosvg needed)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from bgf_pyg.data import emoji_cache
from bgf_pyg.data.emoji import MANIFEST, Emoji, read_manifest
from bgf_pyg.data.emoji_cache import build_emoji_cache, cache_state
from tests.data import test_emoji
from tests.data.test_emoji import SETS, write_fake_cache

#: The generated npm tarballs and the ``fetch`` that returns them (fixtures of test_emoji).
tarballs, local_fetch = test_emoji.tarballs, test_emoji.local_fetch

BUILD = {"sets": list(SETS), "min_styles": 3, "size": 8}


class Killed(BaseException):
    """Stands for the process dying after some images were written (not an ``Exception``: a
    renderer that skips the drawings it cannot draw must not take it for one)."""


@pytest.fixture
def plain_render(monkeypatch):
    """Rendering without cairosvg; ``plain_render.fail_after = n`` kills the build at the
    (n+1)-th image."""
    state = {"count": 0, "fail_after": None}

    def render(drawing, size):
        if state["fail_after"] is not None and state["count"] >= state["fail_after"]:
            raise Killed
        state["count"] += 1
        return Image.new("RGB", (size, size), (state["count"] * 20 % 256, 0, 0))

    monkeypatch.setattr(emoji_cache, "import_cairosvg", lambda: None)
    monkeypatch.setattr(emoji_cache, "render", render)
    return state


def test_a_build_killed_mid_way_leaves_nothing_and_a_rerun_completes(tmp_path, local_fetch,
                                                                     plain_render):
    root = tmp_path / "emoji"
    plain_render["fail_after"] = 5
    with pytest.raises(Killed):
        build_emoji_cache(root, fetch=local_fetch, **BUILD)
    assert cache_state(root) == "empty" and not list(root.glob(".emoji-*"))
    plain_render["fail_after"] = None
    records = build_emoji_cache(root, fetch=local_fetch, **BUILD)
    assert read_manifest(root) == records
    assert len(Emoji(root, "train")) + len(Emoji(root, "test")) == len(records)


def test_a_temporary_folder_a_killed_process_left_is_removed(tmp_path, local_fetch, plain_render):
    """SIGKILL runs no clean-up: the half-rendered folder stays until the next build."""
    root = tmp_path / "emoji"
    stale = root / ".emoji-killed" / "images" / "x"
    stale.mkdir(parents=True)
    (stale / "half.png").write_bytes(b"\x89PNG half")
    assert cache_state(root) == "empty"  # not taken for a cache
    build_emoji_cache(root, fetch=local_fetch, **BUILD)
    assert not list(root.glob(".emoji-*"))
    assert cache_state(root) == "complete"


def test_a_kill_between_the_moves_leaves_no_cache_that_looks_complete(tmp_path, local_fetch,
                                                                      plain_render, monkeypatch):
    root = tmp_path / "emoji"
    build_emoji_cache(root, fetch=local_fetch, **BUILD)
    real_rename = type(root).rename

    def rename(self, target):
        if target.name == MANIFEST:
            raise Killed
        return real_rename(self, target)

    monkeypatch.setattr(type(root), "rename", rename)
    with pytest.raises(Killed):
        build_emoji_cache(root, fetch=local_fetch, overwrite=True, **BUILD)
    assert cache_state(root) == "partial"
    with pytest.raises(FileNotFoundError, match="half-written cache"):
        Emoji(root)


def edit_line(root, number: int, **change):
    """Change (``None``: delete) fields of the manifest's line ``number`` (1-based)."""
    lines = (root / MANIFEST).read_text().splitlines()
    record = json.loads(lines[number - 1])
    record.update(change)
    lines[number - 1] = json.dumps({k: v for k, v in record.items() if v is not None})
    (root / MANIFEST).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("change,fragment", [
    ({"class": 3}, "line 2: class must be a string, got int 3"),
    ({"class": ["a", "b"]}, "line 2: class must be a string, got list"),
    ({"path": None}, "line 2: expected a JSON object with the fields path"),
    ({"size": "16"}, "line 2: size must be a positive int, got str '16'"),
    ({"size": 0}, "line 2: size must be a positive int, got int 0"),
    ({"path": "/etc/hostname"}, "line 2: path must be a file under images/"),
    ({"path": "images/../../outside.png"}, "line 2: path must be a file under images/"),
    ({"path": "images/emoji0/set0.png"}, "line 2: path 'images/emoji0/set0.png' is listed on "
                                         "line 1 too"),
    ({"path": "images/./emoji0/set0.png"}, "is listed on line 1 too"),
])
def test_a_manifest_edited_by_hand_names_the_line(tmp_path, change, fragment):
    root = write_fake_cache(tmp_path / "emoji")
    edit_line(root, 2, **change)
    with pytest.raises(ValueError, match="bgf-data emoji --root") as err:
        Emoji(root)
    assert fragment in str(err.value) and f"{MANIFEST}, line 2" in str(err.value)


def test_a_manifest_cut_mid_line_names_the_line(tmp_path):
    root = write_fake_cache(tmp_path / "emoji")
    text = (root / MANIFEST).read_text()
    cut = text.index("\n", len(text) // 2) - 7  # inside a line
    (root / MANIFEST).write_text(text[:cut])
    number = text[:cut].count("\n") + 1
    with pytest.raises(ValueError, match=f"line {number}: expected a JSON object"):
        Emoji(root)


def test_a_manifest_cut_at_a_line_end_is_refused(tmp_path):
    """Whole lines lost: the images they listed are still there, unlisted."""
    root = write_fake_cache(tmp_path / "emoji")
    lines = (root / MANIFEST).read_text().splitlines(keepends=True)
    (root / MANIFEST).write_text("".join(lines[:20]))
    with pytest.raises(ValueError, match=r"12 images under images/ are not in its "
                                         r"manifest.jsonl.*truncated or edited manifest"):
        Emoji(root, "train")
