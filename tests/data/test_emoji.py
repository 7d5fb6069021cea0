"""The emoji set: reading Iconify packages, the class rule, rendering, the cache, the loader and
the two commands, on generated npm-style tarballs (no network, no npm)."""

from __future__ import annotations

import io
import json
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from bgf_pyg.checks import InputError
from bgf_pyg.cli import main as train_main
from bgf_pyg.cli import parse_args
from bgf_pyg.data import build_dataset
from bgf_pyg.data.emoji import MANIFEST, Emoji, emoji_split, read_left_out, read_manifest
from bgf_pyg.data.emoji_cache import build_emoji_cache, cache_state, emoji_classes
from bgf_pyg.data.iconify import (
    Drawing,
    is_skin_tone_variant,
    read_icon_set,
    svg_document,
)
from bgf_pyg.prepare import main as data_main
from tests.test_cli import assert_user_error

TONES = ("light", "medium-light", "medium", "medium-dark", "dark")


def shape(colour: str, points: str = "2,2 14,2 14,6 6,14 2,14") -> str:
    """An asymmetric filled polygon (an L-ish shape) in a 16 × 16 box."""
    return f'<polygon points="{points}" fill="{colour}"/>'


#: Three fake sets: (icons.json, package.json). "alpha" spells tones "-skin-tone" and "-toneN",
#: "beta" as Fluent does (one-word suffixes), "gamma" without hyphens.
SETS = {
    "alpha": ({
        "prefix": "alpha", "width": 16, "height": 16,
        "icons": {
            "grinning-face": {"body": shape("#f00")},
            "star": {"body": shape("#ff0")},
            "thumbs-up": {"body": shape("#0f0")},
            "thumbs-up-light-skin-tone": {"body": shape("#fc9")},
            "thumbs-up-tone2": {"body": shape("#c96")},
            "bear-face": {"body": shape("#630")},
            "wide-flag": {"body": shape("#00f"), "width": 32},
            "old-star": {"body": shape("#ff0"), "hidden": True},
        },
        "aliases": {"bear": {"parent": "bear-face"}},
    }, {"name": "@iconify-json/alpha", "version": "1.0.0", "license": "Apache-2.0"}),
    "beta": ({
        "prefix": "beta", "width": 32, "height": 32,
        "icons": {
            "grinning-face": {"body": shape("#e00")},
            "star": {"body": shape("#ee0")},
            "thumbs-up": {"body": shape("#0e0")},
            **{f"thumbs-up-{t}": {"body": shape("#fc9")} for t in TONES},
            "police-car": {"body": shape("#00e")},
            "police-car-light": {"body": shape("#e0e")},
            "bear": {"body": shape("#530")},
            "pointing-left": {"body": shape("#999"), "height": 24},
        },
        "aliases": {"pointing-right": {"parent": "pointing-left", "hFlip": True}},
    }, {"name": "@iconify-json/beta", "version": "2.1.0", "license": "MIT"}),
    "gamma": ({
        "prefix": "gamma", "width": 72, "height": 72,
        "icons": {
            "grinningface": {"body": shape("#d00")},
            "star": {"body": shape("#dd0")},
            "thumbsup": {"body": shape("#0d0")},
            "bearface": {"body": shape("#420")},
            "policecarlight": {"body": shape("#d0d")},
        },
    }, {"name": "@iconify-json/gamma", "version": "0.3.0", "license": "CC-BY-4.0"}),
}
#: The emoji at least 3 of the sets draw, and at least 2.
CLASSES_3 = {"bear", "grinningface", "star", "thumbsup"}
CLASSES_2 = CLASSES_3 | {"policecarlight"}


def write_tarball(folder, icons: dict, package: dict):
    """An npm-style package tarball: package/icons.json and package/package.json."""
    path = folder / f"iconify-json-{icons['prefix']}-{package['version']}.tgz"
    with tarfile.open(path, "w:gz") as archive:
        for name, content in (("icons.json", icons), ("package.json", package)):
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def tarballs(tmp_path):
    folder = tmp_path / "packages"
    folder.mkdir()
    return {name: write_tarball(folder, *content) for name, content in SETS.items()}


@pytest.fixture
def local_fetch(tarballs):
    """A ``fetch`` that returns the fixture's tarballs and records what it was asked."""
    calls = []

    def fetch(sets, folder):
        calls.append((list(sets), folder))
        return {name: tarballs[name] for name in sets}

    fetch.calls = calls
    return fetch


def needs_cairosvg():
    return pytest.importorskip("cairosvg", reason="rendering needs cairosvg (the emoji extra)")


def test_read_icon_set_resolves_aliases_sizes_and_hidden(tarballs):
    alpha = read_icon_set(tarballs["alpha"])
    assert (alpha.prefix, alpha.package, alpha.version, alpha.license) == (
        "alpha", "@iconify-json/alpha", "1.0.0", "Apache-2.0")
    assert "old-star" not in alpha.drawings  # hidden
    assert alpha.drawings["bear"] == alpha.drawings["bear-face"]  # alias resolved
    assert alpha.aliases == {"bear": "bear-face"}
    assert (alpha.drawings["star"].width, alpha.drawings["star"].height) == (16, 16)  # set-wide
    assert (alpha.drawings["wide-flag"].width, alpha.drawings["wide-flag"].height) == (32, 16)
    beta = read_icon_set(tarballs["beta"])
    right, left = beta.drawings["pointing-right"], beta.drawings["pointing-left"]
    assert right.h_flip and not left.h_flip and right.body == left.body
    assert (right.width, right.height) == (32, 24)  # the parent's own height, set-wide width
    assert beta.aliases == {}  # a flipped alias is another drawing, not another name


def test_malformed_package_names_the_tarball(tmp_path):
    path = write_tarball(tmp_path, {"prefix": "bad", "icons": {"a": {"body": "x"}},
                                    "aliases": {"b": {"parent": "missing"}}},
                         {"name": "@iconify-json/bad", "version": "1", "license": "MIT"})
    with pytest.raises(ValueError, match=rf"{path.name}.*'missing', which is not an icon"):
        read_icon_set(path)
    not_tar = tmp_path / "x.tgz"
    not_tar.write_text("hello")
    with pytest.raises(ValueError, match="x.tgz is not a package tarball"):
        read_icon_set(not_tar)


@pytest.mark.parametrize("name,names,expected", [
    ("thumbs-up-light-skin-tone", set(), True),
    ("man-light-skin-tone-beard", set(), True),
    ("handshake-medium-skin-tone-dark-skin-tone", set(), True),
    ("adult-tone3", set(), True),
    ("thumbs-up-medium-dark", {"thumbs-up", *(f"thumbs-up-{t}" for t in TONES)}, True),
    ("thumbs-up-medium-light", {"thumbs-up", *(f"thumbs-up-{t}" for t in TONES)}, True),
    ("police-car-light", {"police-car", "police-car-light"}, False),  # no tone family
    ("light-bulb", {"light-bulb"}, False),
    ("black-medium-square", {"black-medium-square"}, False),
    ("black-touch-tone-telephone", set(), False),
    ("gem-stone", set(), False),
])
def test_skin_tone_variants(name, names, expected):
    assert is_skin_tone_variant(name, frozenset(names)) == expected


def test_emoji_classes_on_fixture(tarballs):
    sets = [read_icon_set(tarballs[name]) for name in SETS]
    images = emoji_classes(sets, min_styles=3)
    by_class = {}
    for image in images:
        by_class.setdefault(image.class_name, []).append((image.icon_set.prefix, image.icon))
    assert set(by_class) == CLASSES_3
    # alpha's alias joins "bear" and "bear-face": one emoji, alpha's drawing once; its name is
    # the one most sets use (a tie here: the first in sorted order)
    assert by_class["bear"] == [("alpha", "bear-face"), ("beta", "bear"),
                                    ("gamma", "bearface")]
    assert by_class["thumbsup"] == [("alpha", "thumbs-up"), ("beta", "thumbs-up"),
                                    ("gamma", "thumbsup")]
    two = {image.class_name for image in emoji_classes(sets, min_styles=2)}
    assert two == CLASSES_2  # police-car-light is an emoji, not a tone of police-car
    with pytest.raises(ValueError, match="min_styles must be at most the number of sets"):
        emoji_classes(sets, min_styles=4)


def test_contested_alias_and_shared_drawing_are_left_out(tmp_path):
    """An alias whose two names another set draws as two icons is not a second name; a drawing
    one set uses for two emoji is left out of both."""
    def pack(prefix, icons, aliases=None):
        content = {"prefix": prefix, "width": 16, "height": 16, "icons": icons,
                   "aliases": aliases or {}}
        return read_icon_set(write_tarball(tmp_path, content, {"name": prefix, "version": "1",
                                                               "license": "MIT"}))

    old = pack("old", {"cricket-game": {"body": shape("#111")},
                       "man-running": {"body": shape("#222")},
                       "person-running": {"body": shape("#222")}},  # the same drawing
               {"cricket": {"parent": "cricket-game"}})
    new = pack("new", {"cricket-game": {"body": shape("#333")}, "cricket": {"body": shape("#444")},
                       "man-running": {"body": shape("#555")},
                       "person-running": {"body": shape("#666")}})
    images = {(i.class_name, i.icon_set.prefix): i.icon for i in emoji_classes([old, new], 1)}
    assert images == {("cricketgame", "old"): "cricket-game",
                      ("cricketgame", "new"): "cricket-game", ("cricket", "new"): "cricket",
                      ("manrunning", "new"): "man-running",
                      ("personrunning", "new"): "person-running"}


def test_svg_document_box_and_flip():
    drawing = Drawing(shape("#000"), width=16, height=8, left=1, top=2)
    svg = svg_document(drawing, 40)
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert 'viewBox="1 2 16 8" width="40" height="40"' in svg and shape("#000") in svg
    turned = svg_document(Drawing("", width=16, height=8, rotate=1), 40)
    assert 'viewBox="4 -4 8 16"' in turned  # the box turns about its centre (8, 4)


def test_render_flips_on_white():
    needs_cairosvg()
    from bgf_pyg.data.emoji_cache import render

    plain = Drawing(shape("#000"), width=16, height=16)
    flipped = Drawing(shape("#000"), width=16, height=16, h_flip=True)
    image, mirror = np.asarray(render(plain, 32)), np.asarray(render(flipped, 32))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert (image[0, 0] == 255).all() and (image[31, 31] == 255).all()  # white, not transparent
    assert (image[6, 6] == 0).all()  # inside the polygon
    mirror, image = mirror.astype(int), image.astype(int)
    assert np.abs(mirror - image).max() == 255  # the shape is not symmetric
    np.testing.assert_allclose(mirror, image[:, ::-1], atol=16)  # antialiased edges differ


def test_build_cache_writes_manifest_and_loader_reads_it(tmp_path, local_fetch):
    needs_cairosvg()
    root = tmp_path / "emoji"
    records = build_emoji_cache(root, size=24, min_styles=3, sets=list(SETS), fetch=local_fetch)
    assert local_fetch.calls == [(list(SETS), root / "downloads")]
    assert not list(root.glob(".emoji-*"))  # the temporary folder is gone
    manifest = [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]
    assert manifest == records and len(records) == 12
    assert {r["class"] for r in records} == CLASSES_3
    beta = next(r for r in records if r["style"] == "beta")
    assert beta["package"] == "@iconify-json/beta" and beta["version"] == "2.1.0"
    assert beta["license"] == "MIT" and beta["size"] == 24
    for record in records:
        with Image.open(root / record["path"]) as image:
            assert image.mode == "RGB" and image.size == (24, 24)
    train, test = Emoji(root, "train"), Emoji(root, "test")
    assert len(train) + len(test) == 12
    assert set(train.class_ids).isdisjoint(test.class_ids)
    assert (train.num_classes, test.num_classes) == (2, 2)
    assert set(train.styles) == set(SETS)
    image, label = build_dataset("emoji", root, "train")[0]
    assert image.size == (24, 24) and label in (0, 1)


def test_emoji_split_is_a_fixed_half_of_the_names():
    names = [f"e{i}" for i in range(11)]
    train, test = emoji_split(names)
    assert (len(train), len(test)) == (6, 5)
    assert sorted(train + test) == sorted(names)
    assert emoji_split(list(reversed(names))) == (train, test)  # order of the input is ignored
    assert emoji_split(names) == (train, test)
    assert train == sorted(train)


def write_fake_cache(root, classes: int = 8, styles: int = 4, size: int = 16):
    """A cache as bgf-data writes it, with random images (no rendering)."""
    rng = np.random.default_rng(0)
    lines = []
    for c in range(classes):
        for s in range(styles):
            path = f"images/emoji{c}/set{s}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[:, :, c % 3] = 255  # a class colour
            Image.fromarray(pixels).save(root / path)
            lines.append(json.dumps({"path": path, "class": f"emoji{c}", "style": f"set{s}",
                                     "icon": f"emoji-{c}", "package": f"@iconify-json/set{s}",
                                     "version": "1.0.0", "license": "MIT", "size": size}))
    (root / MANIFEST).write_text("\n".join(lines) + "\n")
    return root


def test_loader_refuses_a_missing_or_half_written_cache(tmp_path):
    root = tmp_path / "emoji"
    with pytest.raises(FileNotFoundError, match=rf"{root} does not exist.*bgf-data emoji --root"):
        Emoji(root)
    write_fake_cache(root)
    (root / MANIFEST).rename(root / "kept.jsonl")
    with pytest.raises(FileNotFoundError, match=rf"{root} has no manifest.jsonl \(it is a "
                                                r"half-written cache\).*bgf-data emoji --root"):
        Emoji(root)
    (root / "kept.jsonl").rename(root / MANIFEST)
    (root / "images" / "emoji3" / "set1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 32 images its manifest.jsonl lists do "
                                                r"not exist, e\.g\. .*emoji3/set1.png"):
        Emoji(root, "test")
    (root / MANIFEST).write_text('{"path": "images/x.png"}\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl, line 1: expected a JSON object"):
        Emoji(root)


def test_build_refuses_an_existing_cache_unless_overwrite(tmp_path, local_fetch, monkeypatch,
                                                          capsys):
    from bgf_pyg.checks import InputError
    from bgf_pyg.data import emoji_cache

    monkeypatch.setattr(emoji_cache, "import_cairosvg", lambda: None)
    monkeypatch.setattr(emoji_cache, "render", lambda drawing, size: Image.new("RGB", (size,) * 2))
    root = write_fake_cache(tmp_path / "emoji")
    before = (root / MANIFEST).read_text()
    with pytest.raises(InputError, match="already holds an emoji cache"):
        build_emoji_cache(root, sets=list(SETS), min_styles=3, fetch=local_fetch)
    code = data_main(["emoji", "--root", str(root), "--min-styles", "3", "--sets", *SETS],
                     fetch=local_fetch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "pass --overwrite" in err
    assert (root / MANIFEST).read_text() == before and not local_fetch.calls
    (root / MANIFEST).unlink()  # an unfinished cache: images and no manifest
    with pytest.raises(InputError, match="already holds an unfinished emoji cache"):
        build_emoji_cache(root, sets=list(SETS), min_styles=3, fetch=local_fetch)
    code = data_main(["emoji", "--root", str(root), "--min-styles", "3", "--sets", *SETS,
                      "--overwrite"], fetch=local_fetch)
    assert code == 0, capsys.readouterr().err
    assert "4 emoji, 12 images" in capsys.readouterr().out
    assert not (root / "images" / "emoji0").exists()  # the old images were replaced
    assert {*Emoji(root, "train").class_ids, *Emoji(root, "test").class_ids} == CLASSES_3


def test_bgf_data_without_npm_is_one_line(tmp_path, monkeypatch, capsys):
    from bgf_pyg.data import emoji_cache

    monkeypatch.setattr(emoji_cache, "import_cairosvg", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm there
    code = data_main(["emoji", "--root", str(tmp_path / "emoji")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("bgf-data: error: npm is not on PATH") and "install" in err
    assert not (tmp_path / "emoji" / MANIFEST).exists()


def test_bgf_data_when_the_registry_does_not_answer(tmp_path, monkeypatch, capsys):
    from bgf_pyg.data import emoji_cache

    monkeypatch.setattr(emoji_cache, "import_cairosvg", lambda: None)
    npm = tmp_path / "bin" / "npm"  # an npm that fails as an offline one does
    npm.parent.mkdir()
    npm.write_text("#!/bin/sh\necho 'npm error code EAI_AGAIN' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", str(npm.parent))
    code = data_main(["emoji", "--root", str(tmp_path / "emoji"), "--sets", "noto",
                      "--min-styles", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "`npm pack @iconify-json/noto` failed (npm error code EAI_AGAIN)" in err
    assert "registry must be reachable" in err


def test_bgf_data_without_cairosvg_names_the_extra(tmp_path, monkeypatch, capsys, local_fetch):
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # import fails
    code = data_main(["emoji", "--root", str(tmp_path / "emoji"), "--sets", *SETS,
                      "--min-styles", "3"], fetch=local_fetch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "bgf_pyg[emoji]" in err
    assert not local_fetch.calls  # found before any download


@pytest.mark.parametrize("argv,fragment", [
    (["--min-styles", "8"], "--min-styles 8 exceeds the 7 sets"),
    (["--sets", "noto", "noto"], "--sets lists a set twice"),
    (["--size", "0"], "--size"),
])
def test_bgf_data_bad_options(tmp_path, capsys, argv, fragment):
    code = data_main(["emoji", "--root", str(tmp_path / "emoji"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and fragment in err


def test_bgf_train_emoji_without_a_prepared_root(tmp_path, capsys):
    root = tmp_path / "emoji"
    code = train_main(["--dataset", "emoji", "--data-root", str(root), "--no-progress",
                       "--out", str(tmp_path / "run")])
    assert_user_error(capsys, code, str(root), "bgf-data emoji --root")
    root.mkdir()
    code = train_main(["--dataset", "emoji", "--data-root", str(root), "--no-progress",
                       "--out", str(tmp_path / "run")])
    assert_user_error(capsys, code, "has no manifest.jsonl", "bgf-data emoji --root")


def test_emoji_image_size_defaults_to_the_render_size(tmp_path):
    args = parse_args(["--dataset", "emoji", "--data-root", str(tmp_path)])
    assert (args.image_size, args.test_resize) == (96, 96)
    args = parse_args(["--dataset", "emoji", "--data-root", str(tmp_path), "--image-size", "64"])
    assert (args.image_size, args.test_resize) == (64, 64)
    args = parse_args(["--dataset", "cub", "--data-root", str(tmp_path)])
    assert (args.image_size, args.test_resize) == (224, None)


def test_bgf_train_runs_on_an_emoji_cache(tmp_path, capsys, tiny_eval):
    root = write_fake_cache(tmp_path / "emoji", classes=8, styles=4)
    out = tmp_path / "run"
    code = train_main(["--dataset", "emoji", "--data-root", str(root), "--method", "bgformer",
                       "--backbone", "smallcnn", "--embedding-dim", "16", "--image-size", "16",
                       "--classes-per-batch", "2", "--samples-per-class", "2", "--k", "3",
                       "--graph-dim", "32", "--epochs", "1", "--val-classes", "2",
                       "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and 0 <= final["recall@1"] <= 1


#: What makes cairo fail on Fluent Emoji's ``umbrella`` and ``umbrella-with-rain-drops``
#: (@iconify-json/fluent-emoji 1.2.7, MIT): a radial gradient transformed by ``skewY(-90)``, a
#: singular matrix, for which cairo reports CAIRO_STATUS_NO_MEMORY (a ``MemoryError``).
UNRENDERABLE = ('<path fill="url(#g)" d="M2 2h12v12H2z"/><defs><radialGradient id="g" cx="0" '
                'cy="0" r="1" gradientTransform="translate(8 8)skewY(-90)" '
                'gradientUnits="userSpaceOnUse"><stop stop-color="#504573"/></radialGradient>'
                '</defs>')


@pytest.fixture
def fetch_with_unrenderable_star(tmp_path):
    """The fixture sets with gamma's ``star`` drawn as the umbrella's failing gradient."""
    folder = tmp_path / "packages-umbrella"
    folder.mkdir()
    gamma_icons, gamma_package = SETS["gamma"]
    gamma_icons = {**gamma_icons, "icons": {**gamma_icons["icons"],
                                            "star": {"body": UNRENDERABLE}}}
    tarballs = {name: write_tarball(folder, *content) for name, content in SETS.items()}
    tarballs["gamma"] = write_tarball(folder, gamma_icons, gamma_package)
    return lambda sets, _folder: {name: tarballs[name] for name in sets}


def test_the_umbrella_gradient_makes_cairo_fail():
    needs_cairosvg()
    from bgf_pyg.data.emoji_cache import render

    drawing = Drawing(body=UNRENDERABLE, width=16.0, height=16.0, left=0.0, top=0.0,
                      h_flip=False, v_flip=False, rotate=0)
    with pytest.raises(MemoryError, match="CAIRO_STATUS_NO_MEMORY"):
        render(drawing, 24)


@pytest.mark.parametrize(("min_styles", "classes"), [(3, CLASSES_3 - {"star"}), (2, CLASSES_2)])
def test_an_unrenderable_drawing_is_left_out_and_the_build_finishes(
        tmp_path, fetch_with_unrenderable_star, caplog, capsys, min_styles, classes):
    needs_cairosvg()
    root = tmp_path / "emoji"
    code = data_main(["emoji", "--root", str(root), "--size", "24", "--min-styles",
                      str(min_styles), "--sets", *SETS], fetch=fetch_with_unrenderable_star)
    assert code == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("emoji set gamma, icon star: did not render (MemoryError")
    images = read_manifest(root)
    assert {r["class"] for r in images} == classes
    assert ("gamma", "star") not in {(r["style"], r["class"]) for r in images}
    left_out = read_left_out(root)
    assert left_out[0]["left_out"].startswith("did not render (MemoryError")
    assert (left_out[0]["style"], left_out[0]["icon"]) == ("gamma", "star")
    # with 3 sets required, star's two rendered drawings fall below the rule and go too
    dropped = {(r["style"], r["class"]) for r in left_out[1:]}
    assert dropped == ({("alpha", "star"), ("beta", "star")} if min_styles == 3 else set())
    assert all("fewer than min_styles=3" in r["left_out"] for r in left_out[1:])
    assert not (root / "images" / "star").exists() or min_styles == 2
    files = {p.relative_to(root).as_posix() for p in (root / "images").rglob("*.png")}
    assert files == {r["path"] for r in images}
    out = capsys.readouterr().out
    assert f"{len(left_out)} drawings left out (gamma star" in out and MANIFEST in out
    assert {*Emoji(root, "train").class_ids, *Emoji(root, "test").class_ids} == classes


def test_a_broken_renderer_is_one_error(tmp_path, local_fetch, monkeypatch, caplog, capsys):
    from bgf_pyg.data import emoji_cache

    monkeypatch.setattr(emoji_cache, "import_cairosvg", lambda: None)

    def broken(drawing, size):
        raise MemoryError("cairo returned CAIRO_STATUS_NO_MEMORY")

    monkeypatch.setattr(emoji_cache, "render", broken)
    code = data_main(["emoji", "--root", str(tmp_path / "emoji"), "--min-styles", "3",
                      "--sets", *SETS], fetch=local_fetch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("bgf-data: error: the SVG renderer (cairosvg) drew "
                                            "none of the first 12 drawings (alpha ")
    assert "is the cairo library installed and working?" in err[-1]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert cache_state(tmp_path / "emoji") == "empty"  # nothing half-written is left


def test_a_renderer_that_fails_on_every_drawing_stops_after_the_probe(tmp_path, monkeypatch):
    from bgf_pyg.data import emoji_cache

    calls = []

    def broken(drawing, size):
        calls.append(drawing)
        raise ValueError("no cairo")

    monkeypatch.setattr(emoji_cache, "render", broken)
    many = [emoji_cache.EmojiImage(f"e{i}", read_icon_set_stub(), "x") for i in range(50)]
    with pytest.raises(InputError, match="drew none of the first 20 drawings"):
        emoji_cache._render_all(many, 8, tmp_path)
    assert len(calls) == emoji_cache.RENDER_PROBE == 20


def read_icon_set_stub():
    """An icon set of one drawing, ``x`` (rendering is stubbed where it is used)."""
    from bgf_pyg.data.iconify import IconSet

    drawing = Drawing(body="", width=1.0, height=1.0, left=0.0, top=0.0, h_flip=False,
                      v_flip=False, rotate=0)
    return IconSet(prefix="s", package="@iconify-json/s", version="1", license="MIT",
                   drawings={"x": drawing}, aliases={})
