"""``benchmarks/emoji_tail.py`` end to end on a tiny generated emoji cache: its JSON's structure,
the paired differences against the per-run records, the control's identity with plain, a second
call that skips the finished runs, and the inputs it refuses before any run."""

from __future__ import annotations

import json

import pytest
import torch

from tests.data.test_emoji import write_fake_cache
from tests.models.test_efficientnet import needs_extra
from tests.models.test_tail import needs_timm
from tests.test_threads import load_script

tail = load_script("benchmarks", "emoji_tail")
ROWS = [tail.PLAIN, tail.CONTROL]
#: Small batches and embeddings for 10 training classes of 16-px images (the control takes
#: plain's, with its own laid over them; the regime-keyed form is read too).
SETTINGS = {tail.PLAIN: {"classes_per_batch": 2, "samples_per_class": 2, "embedding_dim": 8,
                         "image_size": 32, "eval_every": 1},
            "efficientnet-tail": {tail.CONTROL: {"k": 3, "graph_dim": 8}}}


def argv(tmp_path, *extra: str) -> list[str]:
    (tmp_path / "settings.json").write_text(json.dumps(SETTINGS))
    return ["--data-root", str(tmp_path / "emoji"), "--regimes", "efficientnet-tail",
            "--models", *ROWS, "--seeds", "0", "--epochs", "1", "--threads", "1",
            "--settings", str(tmp_path / "settings.json"), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out.json"), "--first-verdict", str(tmp_path / "none.json"),
            *extra]


@needs_extra
def test_a_tiny_verdict_runs_end_to_end_and_resumes(tmp_path, capsys, tiny_eval):
    write_fake_cache(tmp_path / "emoji", classes=20, styles=4, size=16)
    assert tail.main(argv(tmp_path, "--cuts", "1", "2")) == 0
    payload = json.loads((tmp_path / "out.json").read_text())
    assert (tmp_path / "out.png").is_file()
    runs = payload["runs"]
    assert {(r["cut"], r["model"]) for r in runs} == {(c, m) for c in (1, 2) for m in ROWS}
    for r in runs:
        assert r["regime"] == "efficientnet-tail" and r["seed"] == 0 and r["wall_s"] > 0
        assert 0 <= r["recall@1"] <= 1 and 0 <= r["val_recall@1"] <= 1 and "map@r" in r
        assert r["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert r["machine"]["torch"] == torch.__version__ and r["machine"]["cpu_model"]
    # the control trains plain's network exactly (docs/design.rst §17)
    by_key = {(r["cut"], r["model"]): r for r in runs}
    for cut in (1, 2):
        assert by_key[cut, tail.CONTROL]["recall@1"] == by_key[cut, tail.PLAIN]["recall@1"]
    assert payload["config"]["models"]["efficientnet-tail"][tail.CONTROL]["embedding_dim"] == 8

    rows = {row["model"]: row for row in payload["summary"]["efficientnet-tail"]}
    assert set(rows) == set(ROWS)
    for model, row in rows.items():
        val = {c: by_key[c, model]["val_recall@1"] for c in (1, 2)}
        cut = max(val, key=lambda c: (val[c], -c))  # the best validation R@1, ties: smaller
        assert row["cut"] == cut and row["seeds"] == [0] and row["cut_chosen_on_seeds"] == [0]
        assert row["val_recall@1_by_cut"] == {str(c): v for c, v in val.items()}
        assert row["recall@1"] == [by_key[cut, model]["recall@1"], 0.0]
        assert row["wall_s"] == by_key[cut, model]["wall_s"]
    assert "minus_plain_recall@1" not in rows[tail.PLAIN]
    assert "minus_control_recall@1" not in rows[tail.CONTROL]
    diff = rows[tail.CONTROL]["minus_plain_recall@1"]
    expected = (by_key[rows[tail.CONTROL]["cut"], tail.CONTROL]["recall@1"]
                - by_key[rows[tail.PLAIN]["cut"], tail.PLAIN]["recall@1"])
    assert diff["seeds"] == [0] and diff["per_seed"] == [pytest.approx(expected, abs=1e-12)]
    assert diff["mean"] == pytest.approx(expected, abs=1e-12) and diff["std"] == 0.0
    assert diff["ahead"] == int(expected > 0)

    capsys.readouterr()
    assert tail.main(argv(tmp_path, "--cuts", "1", "2")) == 0  # every run is done: none runs
    assert "[1/4]" not in capsys.readouterr().err
    assert json.loads((tmp_path / "out.json").read_text())["runs"] == runs
    assert all(r["options"] == tail.row_options(tail.read_settings(str(tmp_path / "settings.json")),
                                                r["regime"], r["model"]) for r in runs)

    # a run the file holds is reused only under the options it trained with
    changed = [*argv(tmp_path, "--cuts", "1"), "--settings", str(tmp_path / "changed.json")]
    (tmp_path / "changed.json").write_text(json.dumps({**SETTINGS, tail.PLAIN: {
        **SETTINGS[tail.PLAIN], "lr": 1e-2}}))
    with pytest.raises(SystemExit, match=r"--out: .* holds 2 run\(s\) trained with other options "
                                         r"than --settings gives them \(e.g. efficientnet-tail"):
        tail.main(changed)
    with pytest.raises(SystemExit, match=r"--epochs: the runs in .* trained 1 epochs, not 2"):
        tail.main([*argv(tmp_path, "--cuts", "1"), "--epochs", "2"])
    assert json.loads((tmp_path / "out.json").read_text())["runs"] == runs
    # a later call over part of the plan keeps the configuration of the runs before it
    assert tail.main(argv(tmp_path, "--cuts", "1")) == 0
    payload = json.loads((tmp_path / "out.json").read_text())
    assert payload["runs"] == runs and payload["config"]["cuts"] == {"efficientnet-tail": [1, 2]}
    assert {row["cut"] for row in payload["summary"]["efficientnet-tail"]} <= {1, 2}


def test_paired_differences_against_a_direct_computation():
    values, reference = {0: 0.5, 1: 0.25, 3: 0.75}, {0: 0.25, 1: 0.5, 2: 0.0, 3: 0.5}
    diff = tail.paired(values, reference)
    assert diff["seeds"] == [0, 1, 3] and diff["per_seed"] == [0.25, -0.25, 0.25]
    assert diff["mean"] == pytest.approx(0.25 / 3)
    assert diff["std"] == pytest.approx((sum((d - 0.25 / 3) ** 2 for d in diff["per_seed"])
                                         / 2) ** 0.5)
    assert diff["ahead"] == 2


@pytest.mark.parametrize(("extra", "settings", "message"), [
    (["--regimes", "dinov2-frozen"], None, r"--dinov2-weights: the regimes dinov2-frozen need"),
    (["--regimes", "dinov2-tail", "--dinov2-weights", "missing.pth"], None,
     r"--dinov2-weights: missing.pth does not exist"),
    ([], {"plain": {"lr": 1e-3}}, r"--settings: .*expected a row .* got 'plain'"),
    ([], {tail.PLAIN: {"learning_rate": 1e-3}}, r"unknown option\(s\) 'learning_rate'"),
])
def test_bad_input_is_refused_before_any_run(tmp_path, extra, settings, message):
    arguments = [*argv(tmp_path), *extra]
    if settings is not None:
        (tmp_path / "bad.json").write_text(json.dumps(settings))
        arguments += ["--settings", str(tmp_path / "bad.json")]
    with pytest.raises(SystemExit, match=rf"^emoji_tail.py: error: {message}"):
        tail.main(arguments)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.json").exists()


@needs_timm  # configuring a ViT backbone checks that timm is installed
def test_the_dinov2_regimes_configure_the_converted_weights(tmp_path):
    weights = tmp_path / "vit_s14.pth"
    weights.write_bytes(b"")  # configuring does not read it
    args = tail.parse(["--data-root", str(tmp_path), "--dinov2-weights", str(weights),
                       "--dinov2-cuts", "2", "--runs", str(tmp_path / "runs")])
    settings = tail.read_settings(None)
    assert tail.regime_cuts(args, "dinov2-tail") == [2]
    assert tail.regime_cuts(args, "dinov2-frozen") == [None]
    frozen = tail.run_config(args, settings, "dinov2-frozen", None, tail.PLAIN, 0)
    tuned = tail.run_config(args, settings, "dinov2-tail", 2, tail.CONTROL, 1)
    for config in (frozen, tuned):
        assert (config.backbone, config.pretrained, config.image_size) == (
            "vit_small_dinov2", str(weights), 98)
    assert frozen.freeze_backbone and frozen.train_tail is None and frozen.method == "plain"
    assert tuned.train_tail == 2 and not tuned.freeze_backbone
    assert (tuned.method, tuned.alpha, tuned.lr) == ("bgformer", 1.0, settings["dinov2-tail"][
        tail.PLAIN]["lr"])  # the control: plain's settings, the graph term weighted 0


def test_derived_rows_follow_the_settings_of_their_row(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({tail.KNN: {"k": 7, "lr": 1e-3},
                                                 "dinov2-tail": {tail.PLAIN: {"lr": 5e-4}}}))
    settings = tail.read_settings(str(tmp_path / "s.json"))
    detached = tail.row_options(settings, "efficientnet-tail", f"{tail.KNN}, detached")
    assert detached == {**tail.ROWS[tail.KNN], "graph_dim": 128, "k": 7, "lr": 1e-3,
                        "detach_graph_input": True}
    # BGFormer's graph runs at the regime's width: projected to 128 beside EfficientNet-Lite0's
    # 1,280-d trunk, at ViT-S's own 384 (no projection) in the DINOv2 regimes
    for regime, width in (("efficientnet-tail", 128), ("dinov2-frozen", None),
                          ("dinov2-tail", None)):
        for row in (tail.CONTROL, tail.KNN, f"{tail.AUTHORS}, detached"):
            assert tail.row_options(settings, regime, row)["graph_dim"] == width
        assert "graph_dim" not in tail.row_options(settings, regime, tail.PLAIN)
    assert tail.row_options(settings, "dinov2-tail", tail.CONTROL)["lr"] == 5e-4
    assert tail.row_options(settings, "dinov2-frozen", tail.CONTROL)["lr"] == 3e-4


def record(model: str, cut: int, seed: int, val: float) -> dict:
    return {"regime": "efficientnet-tail", "model": model, "cut": cut, "seed": seed,
            "val_recall@1": val, "recall@1": val / 2, "map@r": val / 4, "wall_s": 1.0}


def test_a_cut_tried_on_fewer_seeds_is_chosen_on_the_seeds_it_shares():
    # cut 2 ran seed 0 only: it is compared with cut 1 on seed 0, not on cut 1's mean
    runs = [record(tail.PLAIN, 1, 0, 0.70), record(tail.PLAIN, 1, 1, 0.50),
            record(tail.PLAIN, 1, 2, 0.50), record(tail.PLAIN, 2, 0, 0.65)]
    assert tail.choose_cut(runs) == (1, {"1": 0.70, "2": 0.65}, [0])
    runs[-1] = record(tail.PLAIN, 2, 0, 0.75)
    cut, means, seeds = tail.choose_cut(runs)
    assert (cut, seeds) == (2, [0]) and means == {"1": 0.70, "2": 0.75}
    # no seed ran every cut: each cut's mean is over its own seeds
    only_own = [record(tail.PLAIN, 1, 1, 0.5), record(tail.PLAIN, 2, 0, 0.6)]
    cut, means, seeds = tail.choose_cut(only_own)
    assert (cut, means, seeds) == (2, {"1": 0.5, "2": 0.6}, [])


def test_a_regime_lists_its_rows_in_the_order_of_rows_whatever_order_they_ran_in():
    ran = [record(m, 1, 0, 0.5) for m in (tail.KNN, "proxygml", tail.PLAIN, tail.CONTROL)]
    rows = [row["model"] for row in tail.summarise_regime(ran)]
    assert rows == [m for m in tail.ROWS if m in {r["model"] for r in ran}]


def test_a_row_that_shares_no_seed_with_plain_or_the_control_has_no_difference():
    # a call that trains one row's seed 1 into a file holding the control's seed 0 only
    ran = [record(tail.CONTROL, 2, 0, 0.6), record("intra-batch", 2, 1, 0.7),
           record(tail.PLAIN, 2, 2, 0.5)]
    rows = {row["model"]: row for row in tail.summarise_regime(ran)}
    assert "minus_plain_recall@1" not in rows["intra-batch"]
    assert "minus_control_recall@1" not in rows["intra-batch"]
    assert rows["intra-batch"]["seeds"] == [1]
    assert tuple(rows["intra-batch"]["recall@1"]) == (0.35, 0.0)


join = load_script("benchmarks", "emoji_tail_join")
XEON = {"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512", "torch": "2.14.1"}
EPYC = {"cpu_model": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.14.1"}


def part(tmp_path, name: str, *runs: dict, epochs: int = 30, **options) -> str:
    """A one-call result file of ``emoji_tail.py`` holding ``runs`` (each trained with its row's
    ``ROWS`` options, ``options`` laid over them)."""
    models = {r["model"]: {**tail.ROWS[r["model"]], **options} for r in runs}
    payload = {"config": {"common": tail.COMMON, "regimes": {"efficientnet-tail": {}},
                          "cuts": {"efficientnet-tail": sorted({r["cut"] for r in runs})},
                          "epochs": epochs, "threads": 1, "models": {"efficientnet-tail": models}},
               "runs": [{**r, "options": models[r["model"]]} for r in runs]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(payload))
    return str(path)


def on(machine: dict, run: dict) -> dict:
    return {**run, "machine": machine}


def test_joined_parts_hold_every_run_once_with_the_summary_a_single_call_writes(tmp_path):
    runs = [on(XEON, record(model, 1, seed, 0.5 + seed / 10 + (model == tail.KNN) / 20))
            for model in (tail.PLAIN, tail.KNN) for seed in (0, 1)]
    parts = [part(tmp_path, f"p{i}", run) for i, run in enumerate(runs)]
    out = tmp_path / "joined.json"
    none = str(tmp_path / "none.json")
    assert join.main([*parts, "--out", str(out), "--first-verdict", none]) == 0
    payload = json.loads(out.read_text())
    assert sorted(map(join.run_key, payload["runs"])) == sorted(map(join.run_key, runs))
    assert payload["config"]["models"]["efficientnet-tail"] == {
        m: tail.ROWS[m] for m in (tail.PLAIN, tail.KNN)}
    assert payload["summary"] == json.loads(json.dumps(tail.summarise(payload["runs"])))
    knn = next(r for r in payload["summary"]["efficientnet-tail"] if r["model"] == tail.KNN)
    assert knn["minus_plain_recall@1"]["per_seed"] == pytest.approx([0.025, 0.025])
    assert (tmp_path / "joined.png").is_file()
    # joining a file again, or into an --out that holds its runs, changes nothing
    before = out.read_text()
    assert join.main([parts[0], parts[0], "--out", str(out), "--first-verdict", none]) == 0
    assert out.read_text() == before


@pytest.mark.parametrize(("case", "message"), [
    ("other results", r"parts: efficientnet-tail-cut1-plain \(multi-similarity\), seed 0 is in "
                      r".*a.json and in .*b.json with different results"),
    ("other options", r"parts: efficientnet-tail 'plain \(multi-similarity\)' trained with "
                      r".*'lr': 0.001.* in .*b.json but .*'lr': 0.0003.* in .*a.json"),
    ("other epochs", r"parts: .*b.json has epochs 10, .*a.json has 30"),
    ("other machines", r"--mixed-machines: the runs come from Intel\(R\) Xeon\(R\) Processor "
                       r"\(AVX512, torch 2.14.1\): 1 run\(s\); AMD EPYC \(AVX2, torch 2.14.1\)"),
    ("not a result", r"parts: .*b.json is not an emoji_tail.py result"),
    ("corrupt", r"parts: cannot read .*b.json as JSON"),
])
def test_joining_refuses_parts_that_do_not_belong_together(tmp_path, case, message):
    plain = on(XEON, record(tail.PLAIN, 1, 0, 0.5))
    first = part(tmp_path, "a", plain)
    second = {"other results": lambda: part(tmp_path, "b", {**plain, "recall@1": 0.3}),
              "other options": lambda: part(tmp_path, "b", {**plain, "seed": 1}, lr=1e-3),
              "other epochs": lambda: part(tmp_path, "b", {**plain, "seed": 1}, epochs=10),
              "other machines": lambda: part(tmp_path, "b", on(EPYC, {**plain, "seed": 1})),
              }.get(case)
    if second is None:
        (tmp_path / "b.json").write_text("[]" if case == "not a result" else '{"runs": [')
        second = str(tmp_path / "b.json")
    else:
        second = second()
    out = tmp_path / "joined.json"
    with pytest.raises(SystemExit, match=rf"^emoji_tail_join.py: error: {message}"):
        join.main([first, second, "--out", str(out)])
    assert not out.exists()


def test_mixed_machines_join_when_asked(tmp_path):
    parts = [part(tmp_path, "a", on(XEON, record(tail.PLAIN, 1, 0, 0.5))),
             part(tmp_path, "b", on(EPYC, record(tail.KNN, 1, 0, 0.6)))]
    out = tmp_path / "joined.json"
    assert join.main([*parts, "--out", str(out), "--mixed-machines",
                      "--first-verdict", str(tmp_path / "none.json")]) == 0
    assert {r["machine"]["cpu_model"] for r in json.loads(out.read_text())["runs"]} == {
        XEON["cpu_model"], EPYC["cpu_model"]}
