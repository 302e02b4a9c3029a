"""A client's own data: image folders, CSV and Parquet tables and .npz files, on real files."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedlearn.data.local import LocalData, check_labels, read_local, split_test
from fedlearn.errors import (
    ConfigError,
    DatasetCorruptError,
    DatasetError,
    DatasetNotFoundError,
)


def save_image(
    path: Path, size: tuple[int, int] = (4, 3), color: int | tuple[int, ...] = 0, mode: str = "L"
) -> Path:
    """Write a one-colour image; ``size`` is Pillow's (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def image_folder(root: Path) -> Path:
    """Two classes, three grayscale PNGs: cat/a (0), cat/b (255), dog/c (51)."""
    save_image(root / "cat" / "b.png", color=255)
    save_image(root / "cat" / "a.png", color=0)
    save_image(root / "dog" / "c.png", color=51)
    return root


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- image folders ------------------------------------------------------------------------


def test_image_folder_grayscale(tmp_path: Path) -> None:
    data = read_local(image_folder(tmp_path / "imgs"))
    assert isinstance(data, LocalData)
    assert len(data) == 3
    assert data.x.shape == (3, 1, 3, 4) and data.x.dtype == np.float32
    assert data.y.dtype == np.int64 and data.y.tolist() == [0, 0, 1]
    assert data.classes == ("cat", "dog")
    assert data.source == str(tmp_path / "imgs")
    # Sorted files: a.png (0) before b.png (255); (p/255 - 0.5) / 0.5.
    np.testing.assert_allclose(data.x[:, 0, 0, 0], [-1.0, 1.0, 51 / 255 * 2 - 1], rtol=1e-6)
    assert np.all(data.x[1] == data.x[1, 0, 0, 0])


def test_image_folder_rgb_per_channel_normalisation(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    save_image(root / "red" / "1.png", color=(255, 0, 51), mode="RGB")
    save_image(root / "blue" / "2.JPEG", color=(0, 0, 255), mode="RGB")
    data = read_local(root, mean=(0.0, 0.5, 0.2), std=(1.0, 0.5, 0.1))
    assert data.x.shape == (2, 3, 3, 4)
    assert data.classes == ("blue", "red") and data.y.tolist() == [0, 1]  # folder order
    red = data.x[1]
    np.testing.assert_allclose(red[:, 0, 0], [1.0, -1.0, 0.0], atol=1e-5)


def test_channels_from_first_image_and_forced(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    save_image(root / "a" / "1.png", color=(10, 20, 30), mode="RGB")
    save_image(root / "b" / "2.png", color=100, mode="L")
    assert read_local(root).x.shape == (2, 3, 3, 4)  # first image is RGB
    gray = read_local(root, channels=1)
    assert gray.x.shape == (2, 1, 3, 4)
    # Pillow's L = (299 R + 587 G + 114 B) / 1000, rounded.
    assert gray.x[0, 0, 0, 0] == pytest.approx(round((2990 + 11740 + 3420) / 1000) / 255 * 2 - 1)
    rgb = read_local(root, channels=3)
    np.testing.assert_allclose(rgb.x[1, :, 0, 0], 100 / 255 * 2 - 1, rtol=1e-6)


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    save_image(root / "a" / "1.png", size=(4, 3))
    save_image(root / "b" / "2.jpg", size=(8, 5), color=200)
    with pytest.raises(DatasetError, match="image size") as err:
        read_local(root)
    message = str(err.value)
    assert "1.png is 3x4" in message and "2.jpg is 5x8" in message
    data = read_local(root, image_size=(6, 7))
    assert data.x.shape == (2, 1, 6, 7)
    # A flat colour stays flat under bilinear resizing (JPEG is lossy, so roughly).
    np.testing.assert_allclose(data.x[1], 200 / 255 * 2 - 1, atol=0.05)


def test_image_size_resizes_bilinear(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    path = root / "a" / "1.png"
    path.parent.mkdir(parents=True)
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    image.save(path)
    data = read_local(root, image_size=(4, 2), mean=(0.0,), std=(1.0,))
    expected = np.asarray(image.resize((2, 4), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(data.x[0, 0], expected, rtol=1e-6)


def test_every_image_suffix_is_read_and_others_skipped(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    suffixes = [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".PNG"]
    for i, suffix in enumerate(suffixes):
        save_image(root / "c" / f"{i}{suffix}", color=7)
    write(root / "c" / "notes.txt", "not an image")
    write(root / "c" / ".hidden.png", "not read")
    write(root / "README", "loose files next to the class folders are ignored")
    (root / ".cache").mkdir()
    data = read_local(root)
    assert len(data) == len(suffixes) and data.classes == ("c",)


def test_fixed_classes_order_and_unknown_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    data = read_local(root, classes=["dog", "bird", "cat"])
    assert data.classes == ("dog", "bird", "cat")
    assert data.y.tolist() == [2, 2, 0]
    with pytest.raises(DatasetError, match="'dog'"):
        read_local(root, classes=["cat", "fish"])


def test_folder_labels_checked_against_num_classes(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    assert len(read_local(root, num_classes=2)) == 3
    with pytest.raises(DatasetError, match=r"labels 0\.\.1 .* outside the task's classes 0\.\.0"):
        read_local(root, num_classes=1)


def test_image_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        read_local(empty)
    flat = tmp_path / "flat"
    save_image(flat / "1.png")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        read_local(flat)
    hollow = image_folder(tmp_path / "hollow")
    (hollow / "zebra").mkdir()
    write(hollow / "zebra" / "list.txt", "x")
    with pytest.raises(DatasetError, match="zebra holds no images"):
        read_local(hollow)


def test_regression_refuses_image_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="regression"):
        read_local(image_folder(tmp_path / "imgs"), kind="regression")


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("junk.png", b"this is not an image"),
        ("empty.jpg", b""),
        ("half.png", "truncated"),
    ],
)
def test_corrupt_image_is_named(tmp_path: Path, name: str, payload: bytes | str) -> None:
    root = image_folder(tmp_path / "imgs")
    if payload == "truncated":
        buffer = io.BytesIO()
        Image.effect_noise((32, 32), 40).save(buffer, "PNG")
        payload = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    assert isinstance(payload, bytes)
    (root / "dog" / name).write_bytes(payload)
    with pytest.raises(DatasetCorruptError, match=name) as err:
        read_local(root)
    assert str(err.value).endswith("replace or delete it.")


def test_mean_std_must_fit_channels(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    with pytest.raises(ConfigError, match="3 values but the images have 1 channels"):
        read_local(root, mean=(0.1, 0.2, 0.3), std=(1.0,))


# --- tables -------------------------------------------------------------------------------

CSV = "a,flag,label,b\n1,true,0,0.5\n2,false,2,1.5\n3,true,1,-2\n"


def test_csv_classification(tmp_path: Path) -> None:
    data = read_local(write(tmp_path / "t.csv", CSV), label="label")
    assert data.x.dtype == np.float32 and data.x.shape == (3, 3)
    np.testing.assert_array_equal(data.x, [[1, 1, 0.5], [2, 0, 1.5], [3, 1, -2]])
    assert data.y.dtype == np.int64 and data.y.tolist() == [0, 2, 1]
    assert data.classes is None


def test_csv_whole_float_labels_are_classes(tmp_path: Path) -> None:
    data = read_local(write(tmp_path / "t.csv", "x,y\n1,1.0\n2,0.0\n"), label="y")
    assert data.y.dtype == np.int64 and data.y.tolist() == [1, 0]
    with pytest.raises(DatasetError, match=r"0\.5.*not a whole number"):
        read_local(write(tmp_path / "f.csv", "x,y\n1,1.0\n2,0.5\n"), label="y")


def test_csv_string_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "x,kind\n1,pear\n2,apple\n3,pear\n")
    data = read_local(path, label="kind")
    assert data.classes == ("apple", "pear") and data.y.tolist() == [1, 0, 1]
    fixed = read_local(path, label="kind", classes=["pear", "apple", "fig"])
    assert fixed.classes == ("pear", "apple", "fig") and fixed.y.tolist() == [0, 1, 0]
    with pytest.raises(DatasetError, match="'pear'"):
        read_local(path, label="kind", classes=["apple"])
    with pytest.raises(DatasetError, match="text"):
        read_local(path, label="kind", kind="regression")


def test_csv_regression(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "x,t\n1,0.25\n2,-3\n")
    data = read_local(path, label="t", kind="regression")
    assert data.y.dtype == np.float32 and data.y.tolist() == [0.25, -3.0]


def test_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {
            "f32": pa.array([1.5, 2.5], pa.float32()),
            "i8": pa.array([-1, 4], pa.int8()),
            "target": pa.array(["b", "a"]),
            "ok": pa.array([True, False]),
        }
    )
    for suffix in (".parquet", ".pq"):
        path = tmp_path / f"t{suffix}"
        pq.write_table(table, path)
        data = read_local(path, label="target")
        np.testing.assert_array_equal(data.x, [[1.5, -1, 1], [2.5, 4, 0]])
        assert data.y.tolist() == [1, 0] and data.classes == ("a", "b")


def test_parquet_dictionary_labels(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    labels = pa.array(["x", "y", "x"]).dictionary_encode()
    pq.write_table(pa.table({"v": [1, 2, 3], "c": labels}), path)
    assert read_local(path, label="c").y.tolist() == [0, 1, 0]


def test_table_needs_label(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", CSV)
    with pytest.raises(ConfigError, match="--label COLUMN") as err:
        read_local(path)
    assert "a, flag, label, b" in str(err.value)
    with pytest.raises(ConfigError, match="no label column 'target'") as err:
        read_local(path, label="target")
    assert "a, flag, label, b" in str(err.value)


def test_table_text_feature(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "city,x,y\nParis,1,0\nRome,2,1\n")
    with pytest.raises(DatasetError, match=r"'city'.*type string.*encode it"):
        read_local(path, label="y")


def test_table_nulls_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"'x'.*1 missing"):
        read_local(write(tmp_path / "a.csv", "x,y\n1,0\n,1\n"), label="y")
    with pytest.raises(DatasetError, match=r"'y'.*1 missing"):
        read_local(write(tmp_path / "b.csv", "x,y\n1,0\n2,\n"), label="y")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"x": pa.array([1.0, None]), "y": [0, 1]}), path)
    with pytest.raises(DatasetError, match=r"'x'.*missing"):
        read_local(path, label="y")


def test_table_non_finite_feature(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": [1.0, float("inf")], "y": [0, 1]}), path)
    with pytest.raises(DatasetError, match=r"'x'.*infinite"):
        read_local(path, label="y")


def test_table_zero_rows_and_no_features(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no rows"):
        read_local(write(tmp_path / "h.csv", "x,y\n"), label="y")
    with pytest.raises(DatasetError, match="no feature columns"):
        read_local(write(tmp_path / "y.csv", "y\n1\n"), label="y")


def test_corrupt_tables(tmp_path: Path) -> None:
    with pytest.raises(DatasetCorruptError, match=r"bad\.parquet"):
        read_local(write(tmp_path / "bad.parquet", "not parquet"), label="y")
    with pytest.raises(DatasetCorruptError, match=r"ragged\.csv"):
        read_local(write(tmp_path / "ragged.csv", "x,y\n1,2,3\n"), label="y")


def test_negative_and_out_of_range_table_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "x,y\n1,0\n2,12\n")
    with pytest.raises(DatasetError) as err:
        read_local(path, label="y", num_classes=10)
    assert str(err.value).startswith(f"labels 0..12 in {path} are outside the task's classes 0..9;")
    with pytest.raises(DatasetError, match="-1"):
        read_local(write(tmp_path / "n.csv", "x,y\n1,-1\n"), label="y")


# --- npz ----------------------------------------------------------------------------------


def test_npz_classification_and_regression(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x = np.arange(24, dtype=np.float64).reshape(3, 2, 4)
    np.savez(path, x=x, y=np.array([2, 0, 1], dtype=np.uint8))
    data = read_local(path)
    assert data.x.dtype == np.float32 and data.x.shape == (3, 2, 4)
    np.testing.assert_array_equal(data.x, x)
    assert data.y.dtype == np.int64 and data.y.tolist() == [2, 0, 1]
    reg = read_local(path, kind="regression")
    assert reg.y.dtype == np.float32
    np.savez(path, x=x, y=np.array([0.5, 1, 2]))
    assert read_local(path, kind="regression").y.tolist() == [0.5, 1, 2]
    with pytest.raises(DatasetError, match="not a whole number"):
        read_local(path)


def test_npz_integer_labels_with_named_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.array([0, 1, 1]))
    assert read_local(path, classes=["no", "yes"]).classes == ("no", "yes")
    with pytest.raises(DatasetError, match=r"labels 0\.\.1 .* classes 0\.\.0"):
        read_local(path, classes=["only"])


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, features=np.zeros((2, 2)), y=np.zeros(2))
    with pytest.raises(DatasetError, match=r"no array 'x'.*features, y"):
        read_local(path)
    np.savez(path, x=np.zeros((3, 2)), y=np.zeros(2))
    with pytest.raises(DatasetError, match=r"\(3, 2\).*\(2,\)"):
        read_local(path)
    np.savez(path, x=np.zeros((0, 2)), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(DatasetError, match="no rows"):
        read_local(path)
    np.savez(path, x=np.array([[1.0], [np.nan]]), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(DatasetError, match="NaN"):
        read_local(path)
    np.savez(path, x=np.array([1, 2], dtype=object), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(DatasetCorruptError, match="pickled"):
        read_local(path)
    write(path, "not a zip")
    with pytest.raises(DatasetCorruptError, match=r"d\.npz"):
        read_local(path)
    single = tmp_path / "single.npz"
    with single.open("wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(DatasetCorruptError, match="single array"):
        read_local(single)


# --- paths and arguments ------------------------------------------------------------------


def test_missing_path_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        read_local(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"unsupported suffix '\.json'"):
        read_local(write(tmp_path / "d.json", "{}"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "ranking"},
        {"image_size": (0, 4)},
        {"image_size": (4,)},
        {"channels": 2},
        {"std": (0.0,)},
        {"mean": (float("nan"),)},
        {"classes": ["a", "a"]},
        {"classes": []},
        {"num_classes": 0},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        read_local(image_folder(tmp_path / "imgs"), **kwargs)  # type: ignore[arg-type]


def test_check_labels() -> None:
    check_labels(np.array([0, 9]), 10, "here")
    check_labels(np.zeros(0, dtype=np.int64), 3, "here")
    with pytest.raises(DatasetError, match=r"labels -1\.\.2 in here .* classes 0\.\.1"):
        check_labels(np.array([-1, 2]), 2, "here")
    with pytest.raises(DatasetError, match="float32"):
        check_labels(np.zeros(2, dtype=np.float32), 2, "here")
    with pytest.raises(ConfigError):
        check_labels(np.zeros(2, dtype=np.int64), 0, "here")


# --- split_test ---------------------------------------------------------------------------


def toy(n: int) -> LocalData:
    return LocalData(
        x=np.arange(n, dtype=np.float32)[:, None], y=np.arange(n, dtype=np.int64), classes=None,
        source="toy",
    )


def test_split_test_sizes_and_determinism() -> None:
    data = toy(10)
    train, test = split_test(data, 0.25, seed=3)
    assert test is not None
    assert len(test) == 2 and len(train) == 8  # round(2.5) = 2
    joined = np.sort(np.concatenate([train.y, test.y]))
    np.testing.assert_array_equal(joined, np.arange(10))
    np.testing.assert_array_equal(train.x[:, 0], train.y)  # rows stay paired
    _, again_test = split_test(data, 0.25, seed=3)
    assert again_test is not None
    np.testing.assert_array_equal(again_test.y, test.y)
    assert any(
        not np.array_equal(t.y, test.y)
        for t in (split_test(data, 0.25, seed=s)[1] for s in range(4, 10))
        if t is not None
    )


def test_split_test_edges() -> None:
    data = toy(5)
    train, test = split_test(data, 0.0, seed=0)
    assert train is data and test is None
    _, tiny = split_test(data, 0.01, seed=0)
    assert tiny is not None and len(tiny) == 1  # at least one row
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ConfigError):
            split_test(data, bad, seed=0)
    with pytest.raises(ConfigError, match="leaves none for training"):
        split_test(toy(1), 0.5, seed=0)
    with pytest.raises(ConfigError):
        split_test(data, 0.2, seed=-1)


def test_local_data_rows_must_match() -> None:
    with pytest.raises(DatasetError, match="one label per row"):
        LocalData(x=np.zeros((3, 2)), y=np.zeros(2), classes=None, source="toy")


def test_readers_import_pillow_and_pyarrow_lazily() -> None:
    code = (
        "import sys, fedlearn.data.local\n"
        "print(','.join(m for m in ('PIL', 'pyarrow', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""
