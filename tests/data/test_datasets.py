
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from bgf_pyg.data import (
    CUB200,
    Cars196,
    DigitsDemo,
    InShop,
    StanfordOnlineProducts,
    build_dataset,
    build_transform,
    eval_transform,
    train_transform,
)

# Unequal class sizes: the split must follow the class id, not the counts.
CUB_IMAGES = {1: 3, 2: 1, 101: 2, 102: 2}
CARS_IMAGES = {97: 1, 98: 2, 99: 3, 100: 1}


def write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_cub(tmp_path):
    root = tmp_path / "CUB_200_2011"
    images, labels, image_id = [], [], 0
    for class_id, count in CUB_IMAGES.items():
        for i in range(count):
            image_id += 1
            rel = f"{class_id:03d}.Bird/img_{i}.jpg"
            write_image(root / "images" / rel, image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root


def make_cars(tmp_path):
    root = tmp_path / "cars"
    records = [(f"car_ims/{c}_{i}.jpg", c) for c, n in CARS_IMAGES.items() for i in range(n)]
    annotations = np.zeros((1, len(records)), dtype=[("relative_im_path", "O"), ("class", "O")])
    for j, (rel, class_id) in enumerate(records):
        write_image(root / rel, j)
        annotations[0, j] = (rel, np.array([[class_id]], dtype=np.uint8))
    savemat(root / "cars_annos.mat", {"annotations": annotations})
    return root


def make_sop(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    splits = {"train": [(1, 3), (2, 1)], "test": [(11319, 2), (11320, 2)]}
    image_id = 0
    for split, classes in splits.items():
        lines = ["image_id class_id super_class_id path"]
        for class_id, count in classes:
            for i in range(count):
                image_id += 1
                rel = f"bicycle_final/{class_id}_{i}.JPG"
                write_image(root / rel, image_id)
                lines.append(f"{image_id} {class_id} 1 {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_inshop(tmp_path):
    root = tmp_path / "In_shop"
    rows = [
        ("id_00000001", "train"), ("id_00000001", "train"), ("id_00000003", "train"),
        ("id_00000002", "query"), ("id_00000002", "gallery"), ("id_00000005", "query"),
        ("id_00000005", "gallery"), ("id_00000004", "gallery"),
    ]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for i, (item, status) in enumerate(rows):
        rel = f"img/MEN/Denim/{item}/{i:02d}_front.jpg"
        write_image(root / "Img" / rel, i)
        lines.append(f"{rel} {item} {status}")
    (root / "Eval").mkdir()
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def test_cub_splits(tmp_path):
    root = make_cub(tmp_path)
    train, test = CUB200(root, "train"), CUB200(root, "test")
    assert (len(train), len(test)) == (4, 4)
    assert set(train.class_ids) == {1, 2} and set(test.class_ids) == {101, 102}
    assert train.labels.tolist() == [0, 0, 0, 1] and test.labels.tolist() == [0, 0, 1, 1]
    assert train.num_classes == test.num_classes == 2


def test_cars_splits(tmp_path):
    root = make_cars(tmp_path)
    train, test = Cars196(root, "train"), Cars196(root, "test")
    assert (len(train), len(test)) == (3, 4)
    assert set(train.class_ids) == {97, 98} and set(test.class_ids) == {99, 100}
    assert test.labels.tolist() == [0, 0, 0, 1]


def test_sop_splits(tmp_path):
    root = make_sop(tmp_path)
    train, test = StanfordOnlineProducts(root, "train"), StanfordOnlineProducts(root, "test")
    assert (len(train), len(test)) == (4, 4)
    assert set(test.class_ids) == {11319, 11320} and test.labels.tolist() == [0, 0, 1, 1]


def test_inshop_splits_share_query_gallery_labels(tmp_path):
    root = make_inshop(tmp_path)
    train, query, gallery = (InShop(root, s) for s in ("train", "query", "gallery"))
    assert (len(train), len(query), len(gallery)) == (3, 2, 3)
    assert train.labels.tolist() == [0, 0, 1]
    assert query.class_ids == ["id_00000002", "id_00000005"]
    label_of = dict(zip(gallery.class_ids, gallery.labels.tolist(), strict=True))
    assert query.labels.tolist() == [label_of["id_00000002"], label_of["id_00000005"]]
    assert sorted(label_of.values()) == [0, 1, 2]
    with pytest.raises(ValueError, match="split"):
        InShop(root, "test")


@pytest.mark.parametrize("make", [make_cub, make_cars, make_sop, make_inshop])
def test_images_load_with_transforms(tmp_path, make):
    name = {make_cub: "cub", make_cars: "cars", make_sop: "sop", make_inshop: "inshop"}[make]
    root = make(tmp_path)
    split = "gallery" if name == "inshop" else "test"
    image, label = build_dataset(name, root, "train", train_transform(16))[0]
    assert image.shape == (3, 16, 16) and label == 0
    image, _ = build_dataset(name, root, split, eval_transform(16))[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32


def test_missing_root_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CUB200(tmp_path / "nowhere")
    root = make_sop(tmp_path)
    (root / "Ebay_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Ebay_test.txt"):
        StanfordOnlineProducts(root, "test")
    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        Cars196(tmp_path)


def test_truncated_annotations(tmp_path):
    root = make_cub(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()
    (root / "images.txt").write_text("\n".join(lines[:2] + ["3"]))
    with pytest.raises(ValueError, match=r"images.txt, line 3"):
        CUB200(root)
    root = make_sop(tmp_path)
    (root / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 x 1 a.jpg\n")
    with pytest.raises(ValueError, match=r"Ebay_train.txt, line 2"):
        StanfordOnlineProducts(root)
    root = make_cars(tmp_path)
    data = (root / "cars_annos.mat").read_bytes()
    (root / "cars_annos.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cars_annos.mat"):
        Cars196(root)


def test_corrupt_image_names_path(tmp_path):
    root = make_cub(tmp_path)
    dataset = CUB200(root, "test")
    dataset.paths[1].write_bytes(b"not a jpeg")
    dataset[0]
    with pytest.raises(RuntimeError, match=f"cannot read image {dataset.paths[1]}"):
        dataset[1]


def test_build_dataset_and_transforms():
    demo = build_dataset("demo", None, "test")
    assert isinstance(demo, DigitsDemo) and demo.transform is None
    assert build_transform("demo", train=False) is None
    image = build_transform("demo", train=True)(demo[0][0])
    assert image.shape == (1, 28, 56)
    with pytest.raises(ValueError, match="name"):
        build_dataset("mnist", None, "train")
    with pytest.raises(ValueError, match="root"):
        build_dataset("cub", None, "train")


def rewrite_cub_labels(root, class_of):
    lines = (root / "image_class_labels.txt").read_text().split()
    pairs = zip(lines[0::2], lines[1::2], strict=True)
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i} {class_of(int(c))}\n" for i, c in pairs))


def test_empty_split_says_which_and_why(tmp_path):
    root = make_cub(tmp_path)
    rewrite_cub_labels(root, lambda c: c if c <= 100 else c - 100)  # every class id in 1–100
    assert len(CUB200(root, "train")) == 8
    with pytest.raises(ValueError, match=r"CUB-200-2011 test split of .* is empty \(the standard "
                                         r"split: classes 1–100 train, 101–200 test"):
        CUB200(root, "test")
    root = make_cars(tmp_path)
    annotations = np.zeros((1, 1), dtype=[("relative_im_path", "O"), ("class", "O")])
    annotations[0, 0] = ("car_ims/99_0.jpg", np.array([[99]], dtype=np.uint8))
    savemat(root / "cars_annos.mat", {"annotations": annotations})
    with pytest.raises(ValueError, match="Cars196 train split .* is empty .*classes 1–98 train"):
        Cars196(root, "train")
    root = make_sop(tmp_path)
    (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    with pytest.raises(ValueError, match="SOP test split .*Ebay_test.txt.* is empty"):
        StanfordOnlineProducts(root, "test")
    root = make_inshop(tmp_path)
    partition = root / "Eval" / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace(" query", " gallery"))
    with pytest.raises(ValueError, match="In-Shop query split .* is empty"):
        InShop(root, "query")


def test_empty_split_stops_the_cli_before_training(tmp_path, capsys):
    from bgf_pyg.cli import main

    root = make_cub(tmp_path)
    rewrite_cub_labels(root, lambda c: c if c <= 100 else c - 100)
    code = main(["--dataset", "cub", "--data-root", str(root), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "classes_per_batch" not in err
    assert "test split" in err.splitlines()[-1] and "101–200 test" in err.splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make", [make_cub, make_cars, make_sop, make_inshop])
def test_missing_listed_image_is_found_at_build_time(tmp_path, make):
    name = {make_cub: "cub", make_cars: "cars", make_sop: "sop", make_inshop: "inshop"}[make]
    root = make(tmp_path)
    victim = build_dataset(name, root, "train").paths[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of the \d+ listed images do not exist, "
                                                rf"e.g. {victim}"):
        build_dataset(name, root, "train")


def test_image_checks(tmp_path):
    from bgf_pyg.checks import InputError
    from bgf_pyg.data import check_image_headers

    root = make_cub(tmp_path)
    dataset = CUB200(root, "train")
    for level in ("off", "header", "decode"):
        check_image_headers(dataset, level)
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(dataset.paths[0])
    data = dataset.paths[0].read_bytes()
    dataset.paths[0].write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    check_image_headers(dataset, "header")
    with pytest.raises(InputError, match=rf"cannot read 1 of the 4 images of the CUB-200-2011 "
                                         rf"train split .*{dataset.paths[0].name}"):
        check_image_headers(dataset, "decode")
    dataset.paths[1].write_bytes(b"<html>not an image</html>")
    with pytest.raises(InputError, match="cannot read 1 of the 4 images"):
        check_image_headers(dataset, "header")
    with pytest.raises(ValueError, match="level"):
        check_image_headers(dataset, "full")
